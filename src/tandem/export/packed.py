"""safetensors with weights packed at their bit width, and the loader that restores the model.

The file holds four tensors: `codes` (every quantized weight's integer codes, bit-packed
layer after layer: a 4-bit weight takes half a byte), `grid` (what decodes them: per-channel
or per-tensor scales, k-means codebooks), `floats` and `ints` (every other entry of the
state dict, float32 and int32, concatenated in state-dict order). Names and shapes are not
stored: the header holds the model's config and transforms, the loader rebuilds the model
and reads the blobs in its state-dict order, so the file is the weights at their bits plus
the float parameters plus a few hundred bytes (which layers are packed, their bits and
scale shapes all follow from the rebuilt model). The rebuilt model's quantized layers hold
the decoded weights (the quantizer's own `decode`, the same float operations as its forward),
so it computes exactly what the fake-quant model computed.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from ..engine.checkpoint import _TRANSFORMS
from ..errors import CheckpointError
from ..files import atomic_write
from ..quant.layers import QUANT_LAYERS

FORMAT = "tandem-packed-1"
MAX_PACKED_BITS = 16


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Non-negative integer codes < 2^bits -> a little-endian bitstream as uint8."""
    c = codes.detach().cpu().flatten().numpy().astype(np.uint32)
    if c.size and int(c.max()) >= 2 ** bits:
        raise ValueError(f"a code does not fit in {bits} bits")
    bitplanes = (c[:, None] >> np.arange(bits, dtype=np.uint32)) & 1
    return torch.from_numpy(np.packbits(bitplanes.astype(np.uint8).ravel(), bitorder="little"))


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    raw = np.unpackbits(packed.numpy(), count=count * bits, bitorder="little").reshape(count, bits)
    return torch.from_numpy(raw.astype(np.int64) @ (1 << np.arange(bits, dtype=np.int64)))


def _packed_layers(model: nn.Module):
    for name, layer in model.named_modules():
        wq = getattr(layer, "weight_quantizer", None) if isinstance(layer, QUANT_LAYERS) else None
        if wq is not None and wq.bits <= MAX_PACKED_BITS:
            yield name, layer, wq


def _rest_of_state(model: nn.Module, packed_names: set):
    """State-dict entries that are not a packed weight or its quantizer's state, in order."""
    for k, v in model.state_dict().items():
        layer, _, leaf = k.rpartition(".")
        if (leaf == "weight" and layer in packed_names) or \
                any(k.startswith(f"{n}.weight_quantizer.") for n in packed_names if k.startswith(n)):
            continue
        yield k, v


def _param_shapes(wq, weight) -> dict:
    """Names and shapes of what `wq.encode` stores (derived, so the file need not list them)."""
    with torch.no_grad():
        _, params = wq.encode(weight.detach())
    return {k: tuple(v.shape) for k, v in params.items() if k != "nonzero"}


def save_packed(model: nn.Module, path, **metadata) -> dict:
    """Write `model` with packed low-bit weights and `metadata` (JSON, e.g. its dataset record);
    returns {'path', 'bytes', 'packed_layers'}."""
    path = Path(path)
    codes_parts, grid_parts, names, masked = [], [], set(), []
    for i, (name, layer, wq) in enumerate(_packed_layers(model)):
        with torch.no_grad():
            codes, params = wq.encode(layer.weight.detach())
        codes_parts.append(pack_bits(codes, wq.bits))
        if "nonzero" in params:           # k-means on a pruned layer: a 1-bit mask of kept weights
            codes_parts.append(pack_bits(params.pop("nonzero").long(), 1))
            masked.append(i)
        grid_parts += [v.detach().cpu().float().flatten() for v in params.values()]
        names.add(name)
    floats, ints = [], []
    for _, v in _rest_of_state(model, names):
        (floats if v.is_floating_point() else ints).append(v.detach().cpu().flatten())
    cat = lambda parts, dtype: torch.cat([p.to(dtype) for p in parts]) if parts else torch.zeros(0, dtype=dtype)
    ints = cat(ints, torch.int64)
    if ints.numel() and (ints.min() < -2 ** 31 or ints.max() >= 2 ** 31):
        raise ValueError("an integer buffer does not fit int32")
    tensors = {"codes": cat(codes_parts, torch.uint8), "grid": cat(grid_parts, torch.float32),
               "floats": cat(floats, torch.float32), "ints": ints.to(torch.int32)}
    compact = lambda v: json.dumps(v, separators=(",", ":"))
    meta = {"format": FORMAT, "config": compact(getattr(model, "config", None)),
            "transforms": compact(getattr(model, "tandem_transforms", [])), "masked": compact(masked),
            **{k: compact(v) for k, v in metadata.items()}}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return {"path": str(path), "bytes": path.stat().st_size, "packed_layers": len(names)}


class _Reader:
    def __init__(self, t: torch.Tensor):
        self.t, self.pos = t, 0

    def take(self, n: int) -> torch.Tensor:
        out = self.t[self.pos:self.pos + n]
        if out.numel() != n:
            raise CheckpointError("packed model file is shorter than the model it describes")
        self.pos += n
        return out


def load_packed(path) -> nn.Module:
    """Rebuild a model written by `save_packed`; its outputs equal the saved model's."""
    from ..models import create_model

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"packed model file {path} not found")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a tandem packed model file (format {meta.get('format')!r})")
    model = create_model(**json.loads(meta["config"]))
    for spec in json.loads(meta["transforms"]):
        if spec.get("kind") not in _TRANSFORMS:
            raise CheckpointError(f"{path} needs transform {spec.get('kind')!r}, unknown to this version of tandem")
        model = _TRANSFORMS[spec["kind"]](model, spec)
    codes, grid = _Reader(tensors["codes"]), _Reader(tensors["grid"])
    masked, names = set(json.loads(meta.get("masked", "[]"))), set()
    for i, (name, layer, wq) in enumerate(list(_packed_layers(model))):
        bits, n = wq.bits, layer.weight.numel()
        code = unpack_bits(codes.take((n * bits + 7) // 8), bits, n).reshape(layer.weight.shape)
        params = {k: grid.take(int(np.prod(shape))).reshape(shape)
                  for k, shape in _param_shapes(wq, layer.weight).items()}
        if i in masked:
            params["nonzero"] = unpack_bits(codes.take((n + 7) // 8), 1, n).reshape(layer.weight.shape).float()
        with torch.no_grad():
            layer.weight.copy_(wq.decode(code, **params))
        layer.weight_quantizer = None      # the weight is already on its grid
        layer.w_bits = bits
        names.add(name)
    floats, ints = _Reader(tensors["floats"]), _Reader(tensors["ints"])
    state = {}
    for k, v in _rest_of_state(model, names):
        src = floats if v.is_floating_point() else ints
        state[k] = src.take(v.numel()).reshape(v.shape).to(v.dtype)
    state.update({f"{n}.weight": model.get_submodule(n).weight.detach().clone() for n in names})
    model.load_state_dict(state)
    if floats.pos != floats.t.numel() or codes.pos != codes.t.numel():
        raise CheckpointError(f"{path} holds more data than the model it describes")
    return model
