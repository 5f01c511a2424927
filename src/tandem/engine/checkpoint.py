"""Checkpoints that are never half-written, and model files that rebuild themselves.

Two formats, each for one job:
- the resume checkpoint (`last.ckpt`): everything needed to continue a stage (weights,
  optimiser and schedule state, best-so-far, history); `torch.save` written to a temporary
  file and renamed into place, read back with `weights_only=True` (no pickled code).
- the model file (`*.safetensors`): the weights plus, in the metadata, the model's
  `config` (name, widths, ...) so `load_model` rebuilds the architecture, pruned ones
  included, without the recipe that made it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from ..files import atomic_write


def save_checkpoint(state: dict, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a file that is not a checkpoint
        raise CheckpointError(f"{path} is not a tandem checkpoint ({type(exc).__name__}: {exc})") from None


_TRANSFORMS: dict = {}


def register_transform(kind: str):
    """Register `fn(model, spec) -> model`, re-applied by `load_model` to rebuild a model that was
    changed after `create_model` (e.g. `quantize_` swapping layers). A transform records itself by
    appending `{"kind": kind, ...}` to the model's `tandem_transforms` list."""
    def deco(fn):
        _TRANSFORMS[kind] = fn
        return fn
    return deco


def record_transform(model: torch.nn.Module, record: dict) -> None:
    """Append `record` ({"kind": ..., ...}) to the model's transforms, which its file keeps."""
    model.tandem_transforms = [*getattr(model, "tandem_transforms", []), record]


def replay_transforms(model: torch.nn.Module, transforms: list, source: str = "the model") -> torch.nn.Module:
    """Apply recorded transforms (in order) to a freshly built model: the architecture they made."""
    for spec in transforms:
        if spec.get("kind") not in _TRANSFORMS:
            raise CheckpointError(f"{source} needs transform {spec.get('kind')!r}, which this version of tandem "
                                  f"does not have (known: {', '.join(sorted(_TRANSFORMS)) or 'none'})")
        model = _TRANSFORMS[spec["kind"]](model, spec)
    return model


def save_model(model: torch.nn.Module, path: Path, **metadata) -> None:
    """Weights as safetensors; `model.config`, its transforms and extra metadata as JSON in the header."""
    meta = {"config": json.dumps(getattr(model, "config", None)),
            "transforms": json.dumps(getattr(model, "tandem_transforms", [])),
            **{k: json.dumps(v) for k, v in metadata.items()}}
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_model_file(path: Path) -> tuple[dict, dict]:
    """(state_dict, metadata) of a model file, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model file {path} not found")
    try:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a safetensors model file ({exc})") from None
    return state, meta


def load_state(model: torch.nn.Module, state: dict, source: str) -> None:
    """load_state_dict with an error that names the file and the first mismatches."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} (file {tuple(state[k].shape)}, model {tuple(own[k].shape)})"
             for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        detail = "; ".join(f"{label} {len(keys)}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                           for label, keys in (("missing", missing), ("unexpected", unexpected),
                                               ("shape differs", wrong)) if keys)
        raise CheckpointError(f"{source} holds weights of another architecture ({detail})")
    model.load_state_dict(state)


_WRAPPERS = ("state_dict", "model_state_dict", "model", "net")   # training scripts' usual containers


def read_state_dict(path: Path) -> tuple[dict, dict]:
    """(state_dict, metadata) of a weights file: a safetensors file (a tandem model file or a
    plain state dict) or a PyTorch `.pt`/`.pth`/`.bin` state dict (read with weights_only=True:
    no pickled code runs). A dict holding the state dict under one of `_WRAPPERS` is unwrapped,
    and a `module.` (DDP) or `_orig_mod.` (torch.compile) prefix on every key is dropped."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} not found")
    if path.suffix == ".safetensors":
        state, meta = read_model_file(path)
    else:
        try:
            state, meta = torch.load(path, map_location="cpu", weights_only=True), {}
        except Exception as exc:   # torch raises several types for files it cannot unpickle safely
            raise CheckpointError(f"{path} is not a PyTorch state dict loadable with weights_only=True "
                                  f"({type(exc).__name__}: {' '.join(str(exc).split())[:160]}); save "
                                  f"model.state_dict() with torch.save, or as safetensors") from None
        for key in _WRAPPERS:
            if isinstance(state, dict) and isinstance(state.get(key), dict) and \
                    all(torch.is_tensor(v) for v in state[key].values()):
                state = state[key]
                break
        if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
            raise CheckpointError(f"{path} holds a {type(state).__name__} that is not a state dict "
                                  f"(name -> tensor); save model.state_dict()")
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state, meta


def load_model(path: Path, build=None, source: str | None = None,
               factory: str | None = None) -> tuple[torch.nn.Module, dict]:
    """The model a weights file holds; returns (model, metadata). A tandem model file rebuilds
    its own architecture (config and transforms); a plain state dict (`read_state_dict`) is
    loaded into `build()`, the architecture it belongs to. `source` names the file in errors.
    `factory` ('module:fn') replaces the factory a file of a user's model recorded (one written
    from a script records '__main__:Net', which no other process can import)."""
    from ..models import create_model
    from ..models.registry import is_factory

    source = source or str(path)
    state, meta = read_state_dict(path)
    config = meta.get("config")
    if factory is not None:
        if not config or not is_factory(config.get("name", "")):
            raise CheckpointError(f"{source}: --factory replaces the factory of a user's model, but this file holds "
                                  f"{'the registered model ' + repr(config['name']) if config else 'no model config'}")
        config = {**config, "name": factory}
    if config:
        model = replay_transforms(create_model(**config), meta.get("transforms") or [], source=source)
    elif build is not None:
        model = build()
    else:
        raise CheckpointError(f"{source} has no model config in its metadata (a plain state dict, not a tandem model "
                              f"file): its architecture is unknown")
    load_state(model, state, source)
    return model, meta
