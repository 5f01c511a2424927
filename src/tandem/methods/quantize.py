"""quantize: quantization-aware training (or post-training calibration) of a pretrained network.

    method: quantize
    quant: {method: lsq, w_bits: 4, a_bits: 4, mode: qat}

The full-precision start is `ctx.pretrained()` (the recipe's `model.checkpoint`, or a baseline
this run trains first). A copy is quantized (`quantize_`), calibrated on training images, then
trained (qat) or only evaluated (ptq). Both networks are recorded; bits come from the layers.
"""
from __future__ import annotations

import copy
from typing import Literal, Optional

from pydantic import Field

from ..context import RunContext
from ..quant import QuantSpec, calibrate, quantize_
from . import best_val, register_method


class QuantSection(QuantSpec):
    """A recipe's `quant:` section: the quantization policy (what `quantize_` takes) and how a
    run applies it (QAT or PTQ, calibration batches, the QAT schedule)."""
    mode: Literal["qat", "ptq"] = "qat"
    calib_batches: int = Field(4, ge=1)
    epochs: Optional[int] = Field(None, ge=0)   # QAT epochs (None: train.epochs)
    lr: Optional[float] = Field(None, gt=0)      # QAT learning rate (None: train.lr)



def quant_name(spec: QuantSection) -> str:
    return f"{spec.method}-w{spec.w_bits}a{spec.a_bits}" + ("-ptq" if spec.mode == "ptq" else "")


def build_quantized(ctx: RunContext, spec: QuantSection, base=None):
    """A quantized, calibrated copy of `base` (default `ctx.pretrained()`; shared with mutual /
    independent)."""
    net = quantize_(copy.deepcopy(base if base is not None else ctx.pretrained()), spec)
    calibrate(net, ctx.eval_loader("train"), num_batches=spec.calib_batches)
    return net


@register_method("quantize", sections={"quant": QuantSection})
def quantize(ctx: RunContext) -> None:
    spec = ctx.recipe.quant or QuantSection()   # no quant: section: the defaults (LSQ W4A4)
    net = build_quantized(ctx, spec)
    name = quant_name(spec)
    if spec.mode == "ptq":
        ctx.record(name, net)
        return
    ctx.record_init("quantize/init", net, stage="qat")
    best = ctx.train_stage("qat", {name: net}, cfg=ctx.recipe.train.for_stage(spec.epochs, spec.lr))
    ctx.record(name, net, best_val(best, name))
