"""BatchNorm folded into the conv before it, for eager PyTorch inference: what a deployed model
runs (tandem's ONNX export folds it too). Eager mode otherwise makes every BN its own pass over
the activations, whose cost falls with a pruned layer's width, not with its MACs."""
from __future__ import annotations

import copy

import torch.fx as fx
import torch.nn as nn

from ..errors import TandemError
from ..quant.layers import QUANT_LAYERS


class _Tracer(fx.Tracer):
    """Quantized layers stay whole (their quantizers branch on calibration state)."""

    def is_leaf_module(self, m: nn.Module, name: str) -> bool:
        return isinstance(m, QUANT_LAYERS) or super().is_leaf_module(m, name)


def fold_bn(model: nn.Module) -> nn.Module:
    """An eval-mode copy of `model` with each Conv2d -> BatchNorm2d pair folded into one conv
    (torch.fx's `fuse`). Quantized convs keep their BN (their grid is on the unfolded weight); the
    input model is unchanged. A model torch.fx cannot trace, or one with forward hooks (which
    a traced copy would drop: quant.layout deploy), is refused in one line."""
    from torch.fx.experimental.optimization import fuse
    name = type(model).__name__
    if any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
        raise TandemError(f"fold_bn: {name} has forward hooks (e.g. quant.layout deploy's quantizers), which a "
                          f"traced copy would drop; its ONNX export folds BN (tandem.export.export_onnx)")
    copied = copy.deepcopy(model).eval()
    try:
        traced = fx.GraphModule(copied, _Tracer().trace(copied))
    except Exception as exc:  # fx raises many types for untraceable control flow
        raise TandemError(f"fold_bn: torch.fx cannot trace {name} "
                          f"({type(exc).__name__}: {' '.join(str(exc).split())[:160]}); run it unfolded") from None
    return fuse(traced, inplace=True, no_trace=True)
