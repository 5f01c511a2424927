"""Deep Compression weight sharing (Han et al. 2016; methods.md §2.3).

Each layer's weights become b-bit indices into a table of 2^b shared values (centroids):
linear initialisation between min(W) and max(W), then 1-D k-means. In training only the
centroids learn; the gradient of a centroid is the sum of the gradients of the weights that
share it, which is exactly what autograd gives for ``centroids[index]``. Weights that are
exactly zero (pruned) stay zero and are not clustered.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import TandemError
from .quantizers import ObserverAct, WeightQuantizer
from .registry import register_quantizer


@torch.no_grad()
def kmeans_1d(values: torch.Tensor, k: int, iters: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """(centroids sorted ascending, index per value): Lloyd's algorithm in 1-D from a linear
    initialisation. Assignment is a bucketize against the midpoints (no N x k distance matrix)."""
    v = values.detach().flatten().float()
    lo, hi = float(v.min()), float(v.max())
    centroids = torch.linspace(lo, hi, k, device=v.device) if hi > lo else torch.full((k,), lo, device=v.device)
    for _ in range(iters):
        idx = torch.bucketize(v, (centroids[1:] + centroids[:-1]) / 2)
        sums = torch.zeros(k, device=v.device).index_add_(0, idx, v)
        counts = torch.bincount(idx, minlength=k).float()
        new = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)   # empty cluster: keep
        new, _ = new.sort()
        if torch.equal(new, centroids):
            break
        centroids = new
    idx = torch.bucketize(v, (centroids[1:] + centroids[:-1]) / 2)
    return centroids, idx


class KMeansWeight(WeightQuantizer):
    """w_q = centroids[index] (0 where w == 0). The layer's own weight is frozen after
    calibration; `centroids` (2^b values, per tensor) is the learnable parameter."""

    kind = "kmeans"
    integer_grid = False    # the codebook's values are floats: export keeps the exact weights in float
    frozen_weight = True    # only the centroids learn

    def __init__(self, bits, per_channel=False, channels=1, shape=(1,), iters: int = 30):
        super().__init__(bits, per_channel, channels)
        if not 1 <= self.bits <= 8:
            raise TandemError(f"kmeans weight sharing supports 1..8 bits (a uint8 index), got {self.bits}")
        if per_channel:
            raise TandemError("kmeans weight sharing is per tensor (one codebook per layer); set per_channel=false")
        self.iters = iters
        self.centroids = nn.Parameter(torch.zeros(2 ** self.bits))
        self.register_buffer("index", torch.zeros(tuple(shape), dtype=torch.uint8))

    @classmethod
    def from_spec(cls, bits, layer, spec):
        return cls(bits, spec.per_channel, layer.weight.shape[0], shape=layer.weight.shape, iters=spec.kmeans_iters)

    @torch.no_grad()
    def calibrate_weight(self, w):
        nonzero = w != 0
        if not nonzero.any():
            raise TandemError("kmeans: a layer whose weights are all zero cannot be clustered")
        centroids, idx = kmeans_1d(w[nonzero], 2 ** self.bits, self.iters)
        full = torch.zeros(w.shape, dtype=torch.uint8, device=w.device)
        full[nonzero] = idx.to(torch.uint8)
        self.centroids.copy_(centroids)
        self.index.copy_(full)
        self.set_flags(calibrated=True)

    @torch.no_grad()
    def keep_channels(self, out_keep, in_keep):
        """Each weight keeps its codebook index: slice the index like the weight."""
        for dim, keep in ((0, out_keep), (1, in_keep)):
            if keep is not None:
                self.index = self.index.index_select(dim, keep.to(self.index.device)).clone()

    def forward(self, w):
        if not self.calibrated:
            self._need_calibration()
        shared = self.centroids[self.index.long()]
        return torch.where(w == 0, torch.zeros_like(shared), shared)

    @torch.no_grad()
    def encode(self, w):
        """(codes, {'table'}, plus a 0/1 'nonzero' mask when some weights are exactly 0)."""
        params = {"table": self.centroids.detach().float().clone()}
        if (w == 0).any():
            params["nonzero"] = (w != 0).float()
        return self.index.long(), params

    def decode(self, codes, table, nonzero=None):
        shared = table[codes]
        return shared if nonzero is None else torch.where(nonzero == 0, torch.zeros_like(shared), shared)


register_quantizer("kmeans", weight=KMeansWeight, act=ObserverAct,
                   description="Deep Compression weight sharing: 2^b k-means centroids; min-max activations")
