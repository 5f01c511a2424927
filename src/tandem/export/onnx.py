"""Export a (fake-)quantized model to ONNX with int8 QuantizeLinear/DequantizeLinear, and
check it against the PyTorch model.

How: each quantized layer is traced in an export mode where its input goes through
Clip -> QuantizeLinear -> DequantizeLinear on its exact integer grid, and its weight through
QuantizeLinear -> DequantizeLinear per output channel; a graph pass then stores the weights
as int8 initializers (the QuantizeLinear of a constant is done once, here) and folds a
following BatchNormalization into the per-channel weight scales and the bias (exact: BN only
rescales each output channel, the int8 codes do not change).

Any grid of <= 8 bits fits int8 exactly: a b-bit code is an integer in [-2^(b-1), 2^(b-1)-1]
(signed) or [0, 2^b-1] (unsigned) on the same scale; the Clip before QuantizeLinear restores
the narrower range. Grids that do not fit (DoReFa weights at 8 bits: 256 odd multiples of
1/255; k-means codebooks; more than 8 bits) are exported as float constants of the exact
quantized values and listed in the report as such.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..errors import TandemError
from ..quant.layers import QUANT_LAYERS
from ..quant.quantizers import ActQuantizer


@dataclass
class OnnxExport:
    path: str
    bytes: int
    int8_weights: list[str] = field(default_factory=list)   # layers whose weights are int8 in the file
    float_weights: list[str] = field(default_factory=list)  # exact quantized values kept as float
    qdq_inputs: list[str] = field(default_factory=list)     # layers whose input is int8/uint8 QDQ
    qdq_tensors: list[str] = field(default_factory=list)    # deploy layout: tensor quantizers as QDQ
    bn_folded: int = 0
    notes: list[str] = field(default_factory=list)


def int_grid(wq, w: torch.Tensor):
    """(int codes, per-channel scale) with forward(w) == codes * scale exactly, or None when the
    weight quantizer's grid is not an int8 grid."""
    if wq is None or not wq.integer_grid:
        return None
    codes, scale, shift = wq.affine(w)
    c = w.shape[0]
    scale = torch.as_tensor(scale, dtype=torch.float64).expand(c) if torch.as_tensor(scale).dim() == 0 \
        else torch.as_tensor(scale, dtype=torch.float64)
    shift = torch.as_tensor(shift, dtype=torch.float64).expand(c) if torch.as_tensor(shift).dim() == 0 \
        else torch.as_tensor(shift, dtype=torch.float64)
    for m in (1, 2):   # DoReFa's grid is on odd multiples of scale/2
        z = shift * m / scale.clamp_min(1e-30)
        if torch.all((z - z.round()).abs() < 1e-3):
            view = (-1,) + (1,) * (w.dim() - 1)
            q = m * codes + z.round().long().view(view)
            if q.min() >= -128 and q.max() <= 127:
                return q.to(torch.int8), (scale / m).float()
    return None


def _int8_grid(aq):
    """(scale, zero point, lo, hi, (full int8/uint8 range)) of an activation quantizer whose grid
    fits int8 or uint8, else None."""
    qp = aq.qparams() if aq is not None else None
    if qp is None:
        return None
    s, zp, qmin, qmax = qp
    if not (qmin >= -128 and qmax <= 255 and (qmin >= 0 or qmax <= 127)):
        return None
    return s, zp, (qmin - zp) * s, (qmax - zp) * s, (0, 255) if qmin >= 0 else (-128, 127)


def _qdq(x, act):
    """Clip to the grid's range, then QuantizeLinear/DequantizeLinear on the full int8 range."""
    s, zp, lo, hi, (qmin, qmax) = act
    return torch.fake_quantize_per_tensor_affine(x.clamp(lo, hi), s, zp, qmin, qmax)


class _ExportMode:
    """Replaces one layer's quantizers while tracing: QDQ with the layer's exact grid."""

    def __init__(self, layer, report: OnnxExport, name: str):
        self.layer = layer
        wq = layer.weight_quantizer
        with torch.no_grad():
            grid = int_grid(wq, layer.weight) if wq is not None else None
            if grid is not None:
                q, scale = grid
                self.scale = scale
                self.w = (q.float() * scale.view((-1,) + (1,) * (q.dim() - 1)))
                report.int8_weights.append(name)
            else:
                self.scale = None
                self.w = layer.quantized_weight().detach().clone()
                if wq is not None:
                    report.float_weights.append(name)
        self.act = None
        # A float weight after a DequantizeLinear is re-quantized by onnxruntime (its
        # WeightBiasQuantization: per-tensor int8 of its own choosing): such a layer's input is
        # rounded with float ops (Div, Round, Mul) instead, the same function.
        self.float_input = self.scale is None and wq is not None
        aq = layer.input_quantizer
        self.act = _int8_grid(aq)
        if self.act is not None and not self.float_input:
            report.qdq_inputs.append(name)

    def input(self, x):
        aq = self.layer.input_quantizer
        if aq is None:
            return x
        if self.act is None:
            return aq(x)
        s, zp, lo, hi, _ = self.act
        if self.float_input:   # clamp(x) is on [lo, hi], so round(x / s) is an integer of the grid
            return torch.round(x.clamp(lo, hi) / s) * s
        return _qdq(x, self.act)

    def attach(self):
        """Buffers, so the tracer keeps them as initializers instead of folding them away."""
        self.layer.register_buffer("_export_w", self.w)
        if self.scale is not None:
            self.layer.register_buffer("_export_scale", self.scale)
            self.layer.register_buffer("_export_zp", torch.zeros(self.scale.numel(), dtype=torch.int32))

    def detach(self):
        for name in ("_export_w", "_export_scale", "_export_zp"):
            self.layer._buffers.pop(name, None)

    def weight(self):
        if self.scale is None:
            return self.layer._export_w
        return torch.fake_quantize_per_channel_affine(self.layer._export_w, self.layer._export_scale,
                                                      self.layer._export_zp, 0, -128, 127)


def export_onnx(model: nn.Module, path, input_shape, opset: int = 17, fold_bn: bool = True) -> OnnxExport:
    """Write `model` (float or quantized) as ONNX to `path` for inputs of `input_shape` (C, H, W);
    the batch dimension is dynamic. Returns what was exported how."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    report = OnnxExport(path=str(path), bytes=0)
    model = model.cpu().eval()
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QUANT_LAYERS)]
    for name, layer in layers:
        layer.export_mode = _ExportMode(layer, report, name)
        layer.export_mode.attach()
    own = {id(layer.input_quantizer) for _, layer in layers}
    standalone = [(n, q) for n, q in model.named_modules() if isinstance(q, ActQuantizer) and id(q) not in own]
    for name, q in standalone:   # the deploy layout's tensor quantizers
        grid = _int8_grid(q)
        if grid is not None:
            q.export_fn = lambda x, grid=grid: _qdq(x, grid)
            report.qdq_tensors.append(name)
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            # The TorchScript exporter: it maps fake_quantize_* to QuantizeLinear/DequantizeLinear;
            # the dynamo exporter (torch 2.13) cannot decompose them yet.
            torch.onnx.export(model, (torch.zeros(1, *input_shape),), buf, dynamo=False, opset_version=opset,
                              input_names=["input"], output_names=["logits"], do_constant_folding=False,
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    finally:
        for _, layer in layers:
            layer.export_mode.detach()
            layer.export_mode = None
        for _, q in standalone:
            q.export_fn = None
    graph = onnx.load_from_string(buf.getvalue())
    _weights_to_int8(graph)
    if fold_bn:
        report.bn_folded, clipped = _fold_bn(graph)
        if clipped:
            report.notes.append(f"{clipped} int8 weights of -128 in channels with a negative BN scale were "
                                f"clipped to -127 when folding BN")
    _bias_as_add(graph, {name for name, layer in layers if min(layer.w_bits, layer.a_bits) < 8})
    _requantize_after_pass_through(graph)
    onnx.checker.check_model(graph)
    onnx.save(graph, str(path))
    report.bytes = path.stat().st_size
    return report


# ---- graph passes ---------------------------------------------------------------------------
class _Graph:
    def __init__(self, model):
        from onnx import numpy_helper
        self.model, self.g, self.nh = model, model.graph, numpy_helper
        self.inits = {i.name: i for i in self.g.initializer}
        self.consts = {n.output[0]: n for n in self.g.node if n.op_type == "Constant"}
        self.made_by = {o: n for n in self.g.node for o in n.output}

    def value(self, name):
        """The constant value of `name` (initializer, Constant, or Identity/Cast of one), else None."""
        if name in self.inits:
            return self.nh.to_array(self.inits[name])
        if name in self.consts:
            return self.nh.to_array(self.consts[name].attribute[0].t)
        node = self.made_by.get(name)
        if node is not None and node.op_type in ("Identity", "Cast"):
            v = self.value(node.input[0])
            if v is None or node.op_type == "Identity":
                return v
            from onnx import helper
            return v.astype(helper.tensor_dtype_to_np_dtype(_attr(node, "to")))
        return None

    def consumers(self, name):
        return [n for n in self.g.node if name in n.input]

    def producer(self, name):
        return next((n for n in self.g.node if name in n.output), None)

    def add_init(self, array, name):
        t = self.nh.from_array(array, name)
        if name in self.inits:
            self.g.initializer.remove(self.inits[name])
        self.g.initializer.append(t)
        self.inits[name] = t
        return name

    def prune(self):
        """Drop constants and initializers nothing uses any more."""
        used = {i for n in self.g.node for i in n.input} | {o.name for o in self.g.output}
        for n in [n for n in self.g.node if n.op_type == "Constant" and n.output[0] not in used]:
            self.g.node.remove(n)
        for name in [k for k in self.inits if k not in used]:
            self.g.initializer.remove(self.inits.pop(name))


def _attr(node, name, default=None):
    from onnx import helper
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _weights_to_int8(model) -> None:
    """QuantizeLinear(float constant) -> an int8 initializer (what a runtime loads)."""
    g = _Graph(model)
    for node in [n for n in g.g.node if n.op_type == "QuantizeLinear"]:
        x = g.value(node.input[0])
        if x is None:
            continue
        scale, zp = g.value(node.input[1]), g.value(node.input[2])
        axis = _attr(node, "axis", 1)
        shape = [1] * x.ndim
        if scale.ndim == 1 and x.ndim > 1:
            shape[axis] = -1
        q = np.clip(np.rint(x / scale.reshape(shape)) + zp.reshape(shape).astype(np.float64), -128, 127)
        g.add_init(q.astype(zp.dtype), node.output[0])   # same name: consumers are unchanged
        g.g.node.remove(node)
    g.prune()


def _fold_bn(model) -> tuple[int, int]:
    """Conv(x, DQ(int8 w)) -> BatchNormalization  ==>  Conv(x, DQ(int8 w', scale')) with bias."""
    g = _Graph(model)
    folded = clipped = 0
    for bn in [n for n in g.g.node if n.op_type == "BatchNormalization"]:
        conv = g.producer(bn.input[0])
        if conv is None or conv.op_type != "Conv" or len(g.consumers(conv.output[0])) != 1:
            continue
        params = [g.value(i) for i in bn.input[1:5]]
        if any(v is None for v in params):
            continue
        gamma, beta, mean, var = (p.astype(np.float64) for p in params)
        factor = gamma / np.sqrt(var + _attr(bn, "epsilon", 1e-5))
        dq = g.producer(conv.input[1])
        w_float = g.value(conv.input[1]) if dq is None or dq.op_type != "DequantizeLinear" else None
        if w_float is not None:       # a float weight (k-means codebook, FP layer): scale it
            c = w_float.shape[0]
            base = conv.output[0]
            w_new = (w_float.astype(np.float64) * factor.reshape(-1, *([1] * (w_float.ndim - 1))))
            conv.input[1] = g.add_init(w_new.astype(np.float32), base + "_w_folded")
        elif dq is None or len(g.consumers(dq.output[0])) != 1:
            continue
        else:
            q, scale, zp = g.value(dq.input[0]), g.value(dq.input[1]), g.value(dq.input[2])
            if any(v is None for v in (q, scale, zp)) or np.any(zp != 0):
                continue
            clipped += _fold_into_dq(g, dq, q, scale, factor, conv.output[0])
        c = factor.shape[0]
        bias = g.value(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else np.zeros(c)
        new_bias = (bias.astype(np.float64) - mean) * factor + beta
        base = conv.output[0]
        b_name = g.add_init(new_bias.astype(np.float32), base + "_bias")
        if len(conv.input) > 2:
            conv.input[2] = b_name
        else:
            conv.input.append(b_name)
        for n in g.consumers(bn.output[0]):
            for i, name in enumerate(n.input):
                if name == bn.output[0]:
                    n.input[i] = conv.output[0]
        for o in g.g.output:
            if o.name == bn.output[0]:
                conv.output[0] = bn.output[0]
        g.g.node.remove(bn)
        folded += 1
    g.prune()
    return folded, clipped


def _fold_into_dq(g, dq, q, scale, factor, base) -> int:
    """Per-channel weight scale *= |factor|, codes negated where factor < 0; returns how many
    codes of -128 had to become -127 (a negated -128 does not fit int8)."""
    c = factor.shape[0]
    scale = np.broadcast_to(scale.astype(np.float64), (c,))
    flip = np.where(factor < 0, -1, 1).reshape(-1, *([1] * (q.ndim - 1)))
    q = q.astype(np.int32) * flip
    clipped = int(np.sum(q == 128))
    dq.input[0] = g.add_init(np.clip(q, -128, 127).astype(np.int8), base + "_w_int8")
    dq.input[1] = g.add_init((scale * np.abs(factor)).astype(np.float32), base + "_w_scale")
    dq.input[2] = g.add_init(np.zeros(c, np.int8), base + "_w_zp")
    _set_axis(dq, 0)
    return clipped


def _coarse_input(g, dq) -> bool:
    """The activation DequantizeLinear `dq` reads codes of a sub-8-bit grid (a Clip before its
    QuantizeLinear narrows the int8/uint8 range)."""
    q = g.producer(dq.input[0])
    clip = g.producer(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None
    if clip is None or clip.op_type != "Clip" or len(clip.input) < 3:
        return False
    lo, hi, scale = g.value(clip.input[1]), g.value(clip.input[2]), g.value(q.input[1])
    if lo is None or hi is None or scale is None:
        return False
    return float((hi - lo) / scale) + 1 < 255.5


def _bias_as_add(model, coarse_layers: set[str]) -> None:
    """Conv/Gemm(x, w, b) -> Add(Conv/Gemm(x, w), b) where the input or the weight is on a
    sub-8-bit grid (a layer of `coarse_layers`, found by the exporter's node name
    '/.../<layer>/Conv', or an input Clip narrower than int8). Why: onnxruntime rounds the bias of a Conv fed by DequantizeLinear to int32
    on the grid input scale * weight scale; with 2-4-bit scales that rounding moved outputs by up
    to half a step of the next quantizer (2-bit exports disagreed with PyTorch on up to 45% of
    the images). An Add keeps the bias exact; such a conv is not fused into an integer kernel
    anyway (the narrow Clip before the next QuantizeLinear stops the fusion)."""
    from onnx import helper
    g = _Graph(model)
    for node in [n for n in g.g.node if n.op_type in ("Conv", "Gemm") and len(n.input) > 2 and n.input[2]]:
        x_dq = g.producer(node.input[0])
        bias = g.value(node.input[2])
        if x_dq is None or x_dq.op_type != "DequantizeLinear" or bias is None:
            continue
        layer = node.name.split("/")[-2] if node.name.count("/") >= 2 else None
        if not (layer in coarse_layers or _coarse_input(g, x_dq)):
            continue
        if node.op_type == "Gemm" and (_attr(node, "beta", 1.0) != 1.0 or _attr(node, "transA", 0)):
            continue
        if node.op_type == "Conv":   # (C,) -> (C, 1, 1): broadcast over the spatial dimensions
            bias = bias.reshape(-1, *([1] * len(_attr(node, "kernel_shape", [1, 1]))))
        out = node.output[0]
        b_name = g.add_init(bias.astype(np.float32), out + "_bias_add")
        del node.input[2]
        node.output[0] = out + "_no_bias"
        add = helper.make_node("Add", [node.output[0], b_name], [out], name=(node.name or out) + "_bias")
        g.g.node.insert(list(g.g.node).index(node) + 1, add)
    g.prune()


_PASS_THROUGH = ("Slice", "Pad", "MaxPool", "Flatten", "Reshape", "Identity")


def _requantize_after_pass_through(model) -> None:
    """DequantizeLinear -> Slice/Pad/MaxPool/Flatten/Reshape  ==>  the same, then QuantizeLinear
    -> DequantizeLinear with the same scale and zero point. Exact: these ops make no new values
    (a constant Pad adds zeros, which every grid holds), so their output is on their input's grid;
    with the pair, an int8 runtime keeps the tensor in int8 through them and fuses the Add or
    conv after them (the option-A shortcut's Slice and Pad)."""
    from onnx import helper
    g = _Graph(model)
    for node in [n for n in g.g.node if n.op_type in _PASS_THROUGH]:
        dq = g.producer(node.input[0])
        if dq is None or dq.op_type != "DequantizeLinear" or g.value(dq.input[0]) is not None:
            continue   # not an activation's DequantizeLinear (a weight's reads a constant)
        if len(dq.input) > 1 and (g.value(dq.input[1]) is None or g.value(dq.input[1]).ndim != 0):
            continue
        if node.op_type == "Pad" and (_attr(node, "mode", b"constant") not in (b"constant", "constant")
                                      or (len(node.input) > 2 and node.input[2]
                                          and np.any(g.value(node.input[2]) != 0))):
            continue
        out = node.output[0]
        node.output[0] = out + "_pass"
        q = helper.make_node("QuantizeLinear", [node.output[0], *dq.input[1:]], [out + "_pass_q"],
                             name=(node.name or out) + "_requant")
        d = helper.make_node("DequantizeLinear", [out + "_pass_q", *dq.input[1:]], [out],
                             name=(node.name or out) + "_dequant")
        i = list(g.g.node).index(node)
        g.g.node.insert(i + 1, q)
        g.g.node.insert(i + 2, d)
        g.made_by = {o: n for n in g.g.node for o in n.output}


def _set_axis(node, axis: int) -> None:
    from onnx import helper
    for a in list(node.attribute):
        if a.name == "axis":
            node.attribute.remove(a)
    node.attribute.append(helper.make_attribute("axis", axis))


# ---- running and checking -------------------------------------------------------------------
def ort_session(path, threads: int | None = None):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@torch.no_grad()
def onnx_agreement(model: nn.Module, path, loader, runtime: str = "onnxruntime") -> dict:
    """Top-1 of the PyTorch model and of the ONNX file in `runtime` (tandem.export.runtime) on
    `loader`, and how often they agree; `runtime_config` says how the runtime was set up."""
    from .runtime import open_runtime
    rt = open_runtime(path, runtime)
    model = model.cpu().eval()
    n = agree = correct_t = correct_o = 0
    max_diff = 0.0
    for x, y in loader:
        x, y = x.cpu(), y.cpu()
        zt = model(x)
        zo = torch.from_numpy(rt(x.numpy()))
        pt, po = zt.argmax(1), zo.argmax(1)
        agree += int((pt == po).sum())
        correct_t += int((pt == y).sum())
        correct_o += int((po == y).sum())
        max_diff = max(max_diff, float((zt - zo).abs().max()))
        n += y.numel()
    if n == 0:
        raise TandemError("onnx_agreement: the loader gave no images")
    return {"n": n, "agreement": 100.0 * agree / n, "top1_torch": 100.0 * correct_t / n,
            "top1_onnx": 100.0 * correct_o / n, "max_logit_diff": max_diff, "runtime": rt.name,
            "runtime_config": rt.config}
