"""Quantized Conv2d and Linear: subclasses of the float layers, so cost counting, pruning
surgery and `isinstance` checks still see a conv or a linear.

Each carries `w_bits` / `a_bits` (32 = full precision) and two submodules:
`weight_quantizer` (applied to the weight at every forward) and `input_quantizer` (applied to
the layer's input). Either may be None (that side stays in float).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch.nn as nn
import torch.nn.functional as F


class _QuantMixin:
    @classmethod
    def from_float(cls, layer: nn.Module, weight_quantizer, input_quantizer):
        """The quantized twin of `layer`, sharing its Parameter objects (no copy)."""
        q = cls.__new__(cls)
        nn.Module.__init__(q)
        q.__dict__.update({k: v for k, v in layer.__dict__.items()
                           if k not in ("_parameters", "_buffers", "_modules")})
        q._parameters = dict(layer._parameters)
        q._buffers = dict(layer._buffers)
        q._modules = dict(layer._modules)
        q._init_quant(weight_quantizer, input_quantizer)
        return q

    def _init_quant(self, weight_quantizer, input_quantizer):
        self.weight_quantizer = weight_quantizer
        self.input_quantizer = input_quantizer
        self.w_bits = weight_quantizer.bits if weight_quantizer is not None else 32
        self.a_bits = input_quantizer.bits if input_quantizer is not None else 32
        self.export_mode = None   # set by tandem.export while tracing to ONNX

    def quantized_weight(self):
        return self.weight if self.weight_quantizer is None else self.weight_quantizer(self.weight)

    def _quant_input(self, x):
        if self.export_mode is not None:
            return self.export_mode.input(x)
        return x if self.input_quantizer is None else self.input_quantizer(x)

    def _weight(self):
        return self.export_mode.weight() if self.export_mode is not None else self.quantized_weight()

    def extra_repr(self):
        return f"{super().extra_repr()}, w_bits={self.w_bits}, a_bits={self.a_bits}"


class QuantConv2d(_QuantMixin, nn.Conv2d):
    """nn.Conv2d (any groups, depthwise included) with a quantized weight and input."""

    def forward(self, x):
        return self._conv_forward(self._quant_input(x), self._weight(), self.bias)


class QuantLinear(_QuantMixin, nn.Linear):
    """nn.Linear with a quantized weight and input."""


    def forward(self, x):
        return F.linear(self._quant_input(x), self._weight(), self.bias)


QUANT_LAYERS = (QuantConv2d, QuantLinear)


class _FloatPath:
    """`export_mode` that leaves a layer's input and weight in float."""

    def __init__(self, layer: nn.Module):
        self.layer = layer

    def input(self, x):
        return x

    def weight(self):
        return self.layer.weight


@contextmanager
def float_path(model: nn.Module):
    """Inside the block the quantized layers compute in float: what needs only shapes (the
    channel graph's shape pass) neither needs calibrated quantizers (a model being rebuilt from
    its file has none yet) nor changes their state (SBS's bit choices)."""
    layers = [m for m in model.modules() if isinstance(m, QUANT_LAYERS)]
    before = [m.export_mode for m in layers]
    for m in layers:
        m.export_mode = _FloatPath(m)
    try:
        yield
    finally:
        for m, mode in zip(layers, before):
            m.export_mode = mode
