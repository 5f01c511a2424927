"""`tandem.compress`: run a method on a model and data a user already holds in Python.

    result = tandem.compress(net, "pqkd", train=train_set, test=test_set,
                             prune={"macs_target": 0.5}, quant={"w_bits": 4, "a_bits": 4},
                             schedule={"epochs": 5})
    result.models["pqkd/distilled"], result.results["models"], result.out

It builds the same recipe a file would hold (model: the network's factory path, dataset:
`in-memory`) and writes the same run folder as `tandem run`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .errors import TandemError


@dataclass
class Compressed:
    models: dict[str, nn.Module]   # row name (as in results.json) -> the network
    results: dict                  # what results.json holds
    out: Path                      # the run folder

    @property
    def rows(self) -> dict[str, dict]:
        """Row name -> its results row (top1, macs, bops, bits, ...)."""
        return {row["name"]: row for row in self.results["models"]}


def _model_section(net: nn.Module) -> dict:
    """The recipe's `model:` of a network: its tandem config, or its class as the factory (a
    fresh process rebuilds the saved files by importing it and calling it)."""
    config = getattr(net, "config", None)
    if config is not None:
        section = {"name": config["name"], "options": dict(config.get("kwargs") or {})}
        if config.get("widths"):
            section["widths"] = list(config["widths"])
        return section
    return {"factory": importable_name(type(net))}


def importable_name(cls: type) -> str:
    """'module:Class' a fresh process can import. A class of the script being run is named
    `__main__:Class`, which no other process can import: under `python -m pkg.mod` the module's
    real name is used; otherwise one warning line says how to make it importable."""
    module = cls.__module__
    if module == "__main__":
        import sys
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        if spec is not None and spec.name and spec.name != "__main__":
            module = spec.name
        else:
            print(f"tandem: warning: {cls.__qualname__} is defined in the script being run, so the model files "
                  f"record '__main__:{cls.__qualname__}', which tandem eval/export/profile cannot import; move it "
                  f"into a module (e.g. nets.py, then `from nets import {cls.__qualname__}`), or give those "
                  f"commands --factory MODULE:{cls.__qualname__}", file=sys.stderr)
    return f"{module}:{cls.__qualname__}"


def compress(model: nn.Module, method: str | list[str] = "pqkd", *, train, test, val=None,
             out: str | Path | None = None, val_fraction: float = 0.1, schedule: dict | None = None,
             overrides: list[str] = (), **sections) -> Compressed:
    """Compress `model` (trained, full precision) with `method` (one or a list, as a recipe's
    `method:`). `train` / `val` / `test`: torch Datasets or DataLoaders of (image, label); without
    `val`, `val_fraction` of train is held out for model selection. `schedule`: the recipe's
    `train:` section (epochs, lr, batch_size, ...); `sections`: the others by name (prune=...,
    quant=..., distill=..., seed=..., device=...); `overrides`: `key=value` strings as on the
    command line. The model is not changed; the compressed networks come back in `models`."""
    from .data.in_memory import NAME, in_memory_splits
    from .recipes import parse_overrides, set_dotted, validate
    from .runner import execute

    if not isinstance(model, nn.Module):
        raise TandemError(f"compress: model must be a torch.nn.Module, not {type(model).__name__}")
    for reserved in ("model", "dataset", "method"):
        if reserved in sections:
            raise TandemError(f"compress: {reserved}= is given by the call itself (the model argument, the data, "
                              f"method=); drop it")
    net = copy.deepcopy(model).cpu().eval()
    name = f"{type(model).__name__.lower()}-{'-'.join([method] if isinstance(method, str) else method)}"
    raw = {"name": name, "method": method, "model": _model_section(net), **sections,
           "dataset": {"name": NAME, "val_fraction": val_fraction}}
    if schedule is not None:
        raw["train"] = dict(schedule)
    for key, value in parse_overrides(list(overrides)):
        set_dotted(raw, key, value)
    recipe = validate(raw)
    data = in_memory_splits(train, val, test, val_fraction, recipe.dataset.split_seed)
    with torch.no_grad():
        outputs = net(data.train.images[:2].float())
    num_classes = outputs.shape[-1]
    if data.num_classes > num_classes:   # the splits' labels go up to num_classes - 1
        raise TandemError(f"compress: the labels go up to {data.num_classes - 1} but the model has "
                          f"{num_classes} outputs")
    data.num_classes = num_classes
    if getattr(net, "config", None) is None:
        net.config = {"name": recipe.model.name, "num_classes": num_classes, "in_channels": data.in_channels,
                      "widths": [], "kwargs": {}}
    results, ctx = execute(recipe, out, data=data, model=net)
    return Compressed(models=dict(ctx.models), results=results, out=ctx.out_dir)
