"""Straight-through estimators: a hard function forward, a chosen gradient backward. Shared by
the quantizers (rounding), the channel gates (signs, thresholds) and bit sharing; a leaf module,
so that quant and prune need not import each other."""
from __future__ import annotations

import torch


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward (bit-exact), identity backward."""
    return x.round().detach() + (x - x.detach())


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """x forward (bit-exact), gradient multiplied by g backward (LSQ's step-size gradient scale)."""
    y = x * g
    return x.detach() + (y - y.detach())


def approx_sign(m: torch.Tensor) -> torch.Tensor:
    """sign(m) forward (+1 for m > 0, else -1), the ApproxSign polynomial's gradient backward."""
    surrogate = torch.where(m < -1, -torch.ones_like(m),
                            torch.where(m < 0, m * m + 2 * m, torch.where(m < 1, -m * m + 2 * m, torch.ones_like(m))))
    hard = torch.where(m > 0, 1.0, -1.0).to(m.dtype)
    return hard - surrogate.detach() + surrogate


def threshold_ste(score: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """1[score > threshold] forward, the gradient of sigmoid(score - threshold) backward (SBS's gates)."""
    soft = torch.sigmoid(score - threshold)
    return (score > threshold).to(soft.dtype) - soft.detach() + soft
