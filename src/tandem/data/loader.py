"""BatchLoader: device-resident batches, reproducible per epoch, shardable for DDP."""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch

from .augment import Augment, augment_batch
from .core import ImageSet

__all__ = ["BatchLoader", "epoch_seed"]

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def epoch_seed(seed: int, epoch: int, stream: int = 0) -> int:
    """A 63-bit generator seed that depends only on ``(seed, epoch, stream)``.

    Stream 0 is the epoch's shuffle permutation (shared by all ranks); stream
    ``1 + rank`` is that rank's augmentation.
    """
    h = _splitmix64(int(seed) & _MASK64)
    h = _splitmix64(h ^ (int(epoch) & _MASK64))
    h = _splitmix64(h ^ (int(stream) & _MASK64))
    return h & ((1 << 63) - 1)


class BatchLoader:
    """Iterate ``(x, y)`` batches of an :class:`ImageSet` on ``device``.

    The whole uint8 set is moved to ``device`` once, here; each batch is gathered
    by index, converted to float32, augmented (on the 0..255 scale, so crop padding
    is black) and normalised as ``(x / 255 - mean) / std``, all on the device.

    Reproducibility: an epoch's shuffle permutation comes from a CPU generator
    seeded with ``epoch_seed(seed, epoch, 0)`` (identical on every rank and every
    device) and batch ``b``'s augmentation from a generator on ``device`` seeded
    with a hash of ``(epoch_seed(seed, epoch, 1 + rank), b)``. Nothing else is
    used, so iterating an epoch again (e.g. after resuming at ``set_epoch(e)``,
    or mid-epoch with :meth:`batches` ``(start=b)``) gives exactly the same batches. As with ``DistributedSampler``, call :meth:`set_epoch` before each
    epoch; otherwise every pass repeats epoch 0.

    Sharding (``world_size > 1``): the epoch permutation is padded by wrapping
    around to a multiple of ``world_size`` (or, with ``drop_last``, cut to one)
    and rank ``r`` takes positions ``r, r + world_size, ...``, as
    ``DistributedSampler`` does. ``drop_last`` also drops a final short batch.
    """

    def __init__(
        self,
        imageset: ImageSet,
        batch_size: int,
        *,
        shuffle: bool = False,
        augment: Augment | None = None,
        mean: Sequence[float],
        std: Sequence[float],
        device: str | torch.device = "cpu",
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not (isinstance(world_size, int) and world_size >= 1):
            raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
        if not (isinstance(rank, int) and 0 <= rank < world_size):
            raise ValueError(f"rank must be in [0, {world_size}), got {rank!r}")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.shuffle = bool(shuffle)
        self.augment = augment if augment is not None and augment.active else None
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.num_images = len(imageset)
        channels = imageset.images.shape[1]
        mean_t = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std_t = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean_t.numel() != channels or std_t.numel() != channels:
            raise ValueError(
                f"mean/std need {channels} values (one per channel), got {mean_t.numel()}/{std_t.numel()}"
            )
        if bool((std_t <= 0).any()):
            raise ValueError(f"std must be positive, got {std_t.tolist()}")
        self.images = imageset.images.to(self.device)
        self.labels = imageset.labels.to(self.device)
        self.device = self.images.device  # resolved, e.g. cuda -> cuda:0
        # (x / 255 - mean) / std  ==  x * scale + shift (float images: (x - mean) / std)
        pixel = 255.0 if imageset.images.dtype == torch.uint8 else 1.0
        self._scale = (1.0 / (pixel * std_t)).view(1, channels, 1, 1).to(self.device)
        self._shift = (-mean_t / std_t).view(1, channels, 1, 1).to(self.device)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutation and augmentation the next iteration uses."""
        self.epoch = int(epoch)

    @property
    def num_samples(self) -> int:
        """Images this rank sees per epoch (before ``drop_last`` drops a short batch)."""
        n, ws = self.num_images, self.world_size
        if ws == 1:
            return n
        if self.drop_last and n % ws:
            return n // ws
        return math.ceil(n / ws)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def epoch_indices(self, epoch: int | None = None) -> torch.Tensor:
        """This rank's image indices for ``epoch`` (default: the current one), on the CPU, in batch order."""
        epoch = self.epoch if epoch is None else int(epoch)
        n = self.num_images
        if self.shuffle:
            gen = torch.Generator().manual_seed(epoch_seed(self.seed, epoch, 0))
            order = torch.randperm(n, generator=gen)
        else:
            order = torch.arange(n)
        if self.world_size > 1:
            total = self.num_samples * self.world_size
            if total > n and n > 0:
                reps = math.ceil(total / n)
                order = order.repeat(reps)
            order = order[:total][self.rank :: self.world_size]
        return order

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.batches()

    def batches(self, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The current epoch's batches from batch ``start`` on (to resume inside an epoch)."""
        order = self.epoch_indices().to(self.device)
        gen = None
        if self.augment is not None:
            gen = torch.Generator(device=self.device)
            aug_seed = epoch_seed(self.seed, self.epoch, 1 + self.rank)
        bs = self.batch_size
        for b in range(max(0, int(start)), len(self)):
            idx = order[b * bs : (b + 1) * bs]
            x = self.images.index_select(0, idx).to(torch.float32)
            if gen is not None:
                # Seeded per batch, so any batch is reproducible on its own.
                gen.manual_seed(_splitmix64(aug_seed ^ b) & ((1 << 63) - 1))
                x = augment_batch(x, self.augment, gen)
            x = x.mul_(self._scale).add_(self._shift)  # x is a fresh tensor: in place is safe
            yield x, self.labels.index_select(0, idx)
