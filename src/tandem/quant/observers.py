"""Range observers for post-training quantization: min-max and percentile clipping."""
from __future__ import annotations

import torch

_MAX_SAMPLES = 1 << 20   # torch.quantile's input limit is 16M; a strided subsample is plenty


@torch.no_grad()
def percentile_range(x: torch.Tensor, percentile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The (100-p, p) percentiles of x, e.g. p = 99.99 clips the rarest outliers (one batch)."""
    flat = x.detach().flatten().float()
    if flat.numel() > _MAX_SAMPLES:
        flat = flat[:: flat.numel() // _MAX_SAMPLES + 1]
    q = torch.tensor([1 - percentile / 100, percentile / 100], device=flat.device)
    lo, hi = torch.quantile(flat, q)
    return lo, hi


def affine_qparams(lo: float, hi: float, bits: int) -> tuple[float, int]:
    """(scale, integer zero point) of an unsigned affine grid over [lo, hi], widened to hold 0
    so that zero (padding, ReLU output) is exact."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    qmax = 2 ** bits - 1
    scale = max((hi - lo) / qmax, 1e-8)
    zero_point = int(min(qmax, max(0, round(-lo / scale))))
    return scale, zero_point
