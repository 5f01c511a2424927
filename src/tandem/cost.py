"""Params, MACs, BOPs and bytes of a model, per layer and in total (methods.md §0.2-§0.3).

The convention is the one behind "ResNet-56: 125.49M FLOPs, 0.85M params": MACs of conv and
linear layers only (BN, activations and pooling are free), params = their weights and
biases. BOPs = MACs x weight bits x activation bits. Layers are found by forward hooks on
every nn.Conv2d / nn.Linear, subclasses included, so quantized wrappers are counted too;
a layer's ``w_bits`` / ``a_bits`` attributes, when set, give its bits.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from .modes import eval_mode

_LAYERS = (nn.Conv2d, nn.Linear)


@dataclass
class LayerCost:
    name: str
    kind: str  # 'conv' or 'linear'
    in_channels: int
    out_channels: int
    kernel: tuple[int, int]  # (1, 1) for linear
    groups: int
    out_shape: tuple[int, ...]  # without the batch dimension
    params: int
    macs: int
    bops: float  # 0 for a first conv left out by count_first_conv=False
    bytes: int
    w_bits: float
    a_bits: float
    nonzero_macs: float = 0.0


@dataclass
class CostReport:
    params: int
    macs: int
    bops: float
    bytes: int
    nonzero_macs: float
    layers: list[LayerCost] = field(default_factory=list)

    def to_dict(self) -> dict:
        out = asdict(self)
        for layer in out["layers"]:
            layer["kernel"], layer["out_shape"] = list(layer["kernel"]), list(layer["out_shape"])
        return out

    def table(self) -> str:
        head = (f"{'layer':<28} {'kind':<6} {'in':>5} {'out':>5} {'k':>5} {'g':>4} {'out_shape':<14}"
                f" {'params':>10} {'MACs(M)':>9} {'w/a':>6} {'BOPs(G)':>9} {'bytes':>10}")
        rows = [head, "-" * len(head)]
        for c in self.layers:
            rows.append(
                f"{c.name[-28:]:<28} {c.kind:<6} {c.in_channels:>5} {c.out_channels:>5}"
                f" {'x'.join(map(str, c.kernel)):>5} {c.groups:>4} {'x'.join(map(str, c.out_shape)):<14}"
                f" {c.params:>10,} {c.macs / 1e6:>9.3f} {_fmt(c.w_bits) + '/' + _fmt(c.a_bits):>6}"
                f" {c.bops / 1e9:>9.3f} {c.bytes:>10,}"
            )
        rows += ["-" * len(head),
                 f"{'total':<28} {'':<6} {'':>5} {'':>5} {'':>5} {'':>4} {'':<14} {self.params:>10,}"
                 f" {self.macs / 1e6:>9.3f} {'':>6} {self.bops / 1e9:>9.3f} {self.bytes:>10,}"]
        if self.nonzero_macs < self.macs:
            rows.append(f"nonzero MACs: {self.nonzero_macs / 1e6:.3f}M")
        rows.append("bytes total includes BN and other float parameters/buffers at 4 bytes")
        return "\n".join(rows)


def _fmt(bits: float) -> str:
    return str(int(bits)) if float(bits).is_integer() else f"{bits:g}"


def _bits(value, default):
    """A layer attribute (None or absent: the default) as an int when integral."""
    value = default if value is None else value
    value = float(value)
    return int(value) if value.is_integer() else value


def _layer_bytes(module: nn.Module, w_bits) -> int:
    bias = module.bias.numel() * 4 if getattr(module, "bias", None) is not None else 0
    return math.ceil(module.weight.numel() * w_bits / 8) + bias


def _model_bytes(model: nn.Module, layer_w_bits: dict, default_w_bits) -> int:
    """Conv/linear weights at their bits, biases and every other float tensor at 4 bytes."""
    total, seen = 0, set()
    for m in model.modules():
        if isinstance(m, _LAYERS) and id(m) not in seen:
            seen.add(id(m))
            w_bits = layer_w_bits.get(id(m))
            if w_bits is None:
                w_bits = _bits(getattr(m, "w_bits", None), default_w_bits)
            total += _layer_bytes(m, w_bits)
            seen.update({id(m.weight), id(getattr(m, "bias", None))})
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point() and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * 4
    return total


def model_bytes(model: nn.Module, w_bits: float = 32) -> int:
    """Bytes needed at inference: conv/linear weights at their ``w_bits`` attribute (or
    ``w_bits``), biases and other float parameters and buffers (BN) at 4 bytes each."""
    return _model_bytes(model, {}, w_bits)


def _run_hooked(model: nn.Module, input_size) -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    """(name, module, output shape) of every conv/linear call of one eval-mode forward pass."""
    names = {id(m): n for n, m in model.named_modules()}
    calls = []
    hooks = [m.register_forward_hook(lambda m, i, o: calls.append((names[id(m)], m, tuple(o.shape[1:]))))
             for m in model.modules() if isinstance(m, _LAYERS)]
    ref = next(iter(list(model.parameters()) + list(model.buffers())), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    try:
        with eval_mode(model), torch.no_grad():
            model(torch.zeros(1, *input_size, device=device, dtype=dtype))
    finally:
        for h in hooks:
            h.remove()
    return calls


def profile(model: nn.Module, input_size=(3, 32, 32), *, w_bits=32, a_bits=32,
            first_last_bits=None, count_first_conv=True) -> CostReport:
    """Count one forward pass of a zero input of shape (1, *input_size).

    ``first_last_bits`` sets both bits of the first conv and the last linear (it wins over their
    ``w_bits``/``a_bits`` attributes: it is the counting convention, e.g. SBS's 8/8);
    ``count_first_conv=False`` leaves the first conv out of BOPs (PIC-PQ's VGG counter).
    """
    calls = _run_hooked(model, input_size)
    convs = [i for i, (_, m, _) in enumerate(calls) if isinstance(m, nn.Conv2d)]
    linears = [i for i, (_, m, _) in enumerate(calls) if isinstance(m, nn.Linear)]
    first, last = (convs[0] if convs else None), (linears[-1] if linears else None)
    layers, layer_w_bits, counted = [], {}, set()
    params = 0
    for i, (name, m, shape) in enumerate(calls):
        conv = isinstance(m, nn.Conv2d)
        wb, ab = _bits(getattr(m, "w_bits", None), w_bits), _bits(getattr(m, "a_bits", None), a_bits)
        if first_last_bits is not None and i in (first, last):
            wb = ab = _bits(first_last_bits, None)
        # Each output element costs one MAC per weight of its filter (C_in/groups * k_h * k_w).
        macs = m.weight[0].numel() * math.prod(shape)
        nonzero = float((m.weight != 0).sum()) / m.weight.numel()
        layer_params = m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
        if id(m) not in counted:  # a module called twice costs MACs twice but params once
            counted.add(id(m))
            params += layer_params
            layer_w_bits[id(m)] = wb
        layers.append(LayerCost(
            name=name, kind="conv" if conv else "linear",
            in_channels=m.in_channels if conv else m.in_features,
            out_channels=m.out_channels if conv else m.out_features,
            kernel=tuple(m.kernel_size) if conv else (1, 1), groups=m.groups if conv else 1,
            out_shape=shape, params=layer_params, macs=macs,
            bops=0 if (i == first and not count_first_conv) else macs * wb * ab,
            bytes=_layer_bytes(m, wb), w_bits=wb, a_bits=ab, nonzero_macs=macs * nonzero,
        ))
    return CostReport(
        params=params, macs=sum(c.macs for c in layers), bops=sum(c.bops for c in layers),
        bytes=_model_bytes(model, layer_w_bits, w_bits), nonzero_macs=sum(c.nonzero_macs for c in layers),
        layers=layers,
    )


def bits_summary(report: CostReport) -> tuple:
    """(w_bits, a_bits) for a results row: MAC-weighted means over the conv/linear layers, so a
    mixed-precision model still gets a number that compares (an int when every layer agrees,
    else rounded to 2 decimals). Weighted by MACs because that is where the bits cost compute."""
    def mean(values):
        values = [(float(v), m) for v, m in values]
        if not values:
            return None
        if len({v for v, _ in values}) == 1:
            v = values[0][0]
            return int(v) if v.is_integer() else round(v, 2)
        total = sum(m for _, m in values)
        if total == 0:  # no MACs at all: a plain mean
            return round(sum(v for v, _ in values) / len(values), 2)
        return round(sum(v * m for v, m in values) / total, 2)
    return (mean((c.w_bits, c.macs) for c in report.layers),
            mean((c.a_bits, c.macs) for c in report.layers))


def layer_summary(report: CostReport) -> list[dict]:
    """One small dict per conv/linear call for results.json: enough to see where the MACs and
    the bits are without re-profiling the saved model (their ``macs`` sum to ``report.macs``)."""
    return [{"name": c.name, "in_channels": c.in_channels, "out_channels": c.out_channels,
             "macs": c.macs, "w_bits": c.w_bits, "a_bits": c.a_bits} for c in report.layers]
