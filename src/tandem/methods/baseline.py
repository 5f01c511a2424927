"""baseline: train the recipe's model with cross-entropy (or evaluate `model.checkpoint`);
the reference every method compares to."""
from __future__ import annotations

from ..context import RunContext
from . import register_method


@register_method("baseline")
def baseline(ctx: RunContext) -> None:
    ctx.pretrained()
