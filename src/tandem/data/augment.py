"""Batched tensor augmentation: pad-and-random-crop and horizontal flip, on any device.

Everything is done for the whole batch at once with tensor indexing (no Python loop
over images), on the batch's own device, with randomness drawn only from the
``torch.Generator`` passed in, so that a batch is reproducible from that generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["Augment", "augment_batch"]


@dataclass(frozen=True)
class Augment:
    """Training-time augmentation of a dataset.

    ``crop_padding``: pad each side with ``p`` zero pixels, then crop back to the
    original size at a random offset (the CIFAR "random crop, padding 4"); 0 = off.
    ``hflip``: mirror each image left-right with probability 1/2.
    """

    crop_padding: int = 0
    hflip: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.crop_padding, bool) or not isinstance(self.crop_padding, int) or self.crop_padding < 0:
            raise ValueError(f"Augment.crop_padding must be an integer >= 0, got {self.crop_padding!r}")
        if not isinstance(self.hflip, bool):
            raise ValueError(f"Augment.hflip must be a bool, got {self.hflip!r}")

    @property
    def active(self) -> bool:
        """Whether this augmentation changes anything."""
        return self.crop_padding > 0 or self.hflip


def augment_batch(x: torch.Tensor, aug: Augment | None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Augment a float ``N x C x H x W`` batch; returns a new tensor (``x`` itself when there is nothing to do).

    Random draws, in this order, all from ``generator`` on ``x.device``:

    1. if ``crop_padding = p > 0``: ``torch.randint(0, 2p + 1, (2, N))``: row 0 is each
       image's vertical offset ``dy``, row 1 its horizontal offset ``dx``; output image
       ``i`` is ``pad(x[i], p)[:, dy:dy + H, dx:dx + W]`` (zero padding);
    2. if ``hflip``: ``torch.rand(N) < 0.5`` marks the images that are mirrored
       (after the crop).
    """
    if aug is None or not aug.active or x.shape[0] == 0:
        return x
    if x.dim() != 4:
        raise ValueError(f"augment_batch expects an N x C x H x W batch, got shape {tuple(x.shape)}")
    device = x.device
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"augment_batch: generator is on {generator.device} but the batch is on {device}")
    n, c, h, w = x.shape
    p = aug.crop_padding
    if p == 0:
        flip = torch.rand(n, generator=generator, device=device) < 0.5
        return torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
    offsets = torch.randint(0, 2 * p + 1, (2, n), generator=generator, device=device)
    rows = offsets[0].view(n, 1) + torch.arange(h, device=device)  # N x H, indices into the padded image
    cols_fwd = torch.arange(w, device=device)
    if aug.hflip:
        flip = torch.rand(n, generator=generator, device=device) < 0.5
        # A flipped crop reads the same window right to left: one gather does both.
        cols_fwd = torch.where(flip.view(n, 1), cols_fwd.flip(0), cols_fwd)
    cols = offsets[1].view(n, 1) + cols_fwd  # N x W
    padded = F.pad(x, (p, p, p, p))
    batch_idx = torch.arange(n, device=device).view(n, 1, 1, 1)
    chan_idx = torch.arange(c, device=device).view(1, c, 1, 1)
    return padded[batch_idx, chan_idx, rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]
