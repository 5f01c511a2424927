"""The quantizer registry: the name a recipe gives (`quant.method`) -> the weight and input
quantizer classes it builds. Each entry is registered where its classes are defined
(quantizers.py, kmeans.py, bit_sharing.py, or a user's own module), so adding a quantizer is one
file:

    class MyWeight(WeightQuantizer): ...          # forward, affine/encode/decode, flags
    register_quantizer("mine", weight=MyWeight, act=LSQAct, description="...")

Everything else asks the classes: how to build one from the policy (`from_spec`), whether its
weight grid is an integer grid (export), holds 0 (pruned weights stay 0), freezes the float
weight (only a codebook learns), and whether its activations can be placed once per tensor
(`quant.layout: deploy`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..registry import Registry

QUANTIZERS = Registry("quantizer")


@dataclass(frozen=True)
class QuantMethod:
    name: str
    weight: type            # a WeightQuantizer subclass
    act: type               # an ActQuantizer subclass
    description: str
    options: Optional[type] = None   # a pydantic model of `quant.options` (None: it takes none)
    deploy_layout: bool = True       # False: its input quantizers cannot move to the tensors' producers


def register_quantizer(name: str, *, weight: type, act: type, description: str, options: Optional[type] = None,
                       deploy_layout: bool = True) -> QuantMethod:
    """Register `name` (replacing an entry of the same name, as a reloaded module does)."""
    method = QuantMethod(name, weight, act, description, options, deploy_layout)
    QUANTIZERS.replace(name, method)
    return method


def list_quantizers() -> list[str]:
    return QUANTIZERS.names()


def zero_keeping() -> list[str]:
    """The quantizers whose weight grid holds an exact 0 (pruned weights stay pruned)."""
    return [n for n, m in QUANTIZERS.items() if m.weight.zero_in_grid]
