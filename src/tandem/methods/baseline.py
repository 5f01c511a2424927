"""baseline: train the recipe's model with cross-entropy; the reference every method compares to."""
from __future__ import annotations

from . import register_method


@register_method("baseline")
def baseline(ctx) -> None:
    net = ctx.create_model()
    best = ctx.train_stage("baseline", {"baseline": net})
    ctx.record("baseline", net, best["baseline"]["val_top1"])
