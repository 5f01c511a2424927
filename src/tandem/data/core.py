"""In-memory datasets: :class:`ImageSet`, :class:`DataSplits` and the split helpers.

Every dataset ends up as uint8 ``N x C x H x W`` tensors plus int64 labels. Loaders
(one per format) return a :class:`SourceData` (train and test sets as the files
give them); :func:`make_splits` then holds a seeded, stratified validation split
out of the training set and computes the normalisation statistics.
"""

from __future__ import annotations


import math
from dataclasses import dataclass, field, replace
from typing import Sequence

import torch

from ..errors import DataError
from .augment import Augment

__all__ = [
    "ImageSet",
    "DataSplits",
    "SourceData",
    "stratified_split",
    "channel_stats",
    "make_splits",
    "parse_image_size",
    "check_int",
]


@dataclass
class ImageSet:
    """Images as a contiguous uint8 ``N x C x H x W`` tensor and int64 labels of length N; or
    float32 images a user's own Dataset already normalised (``tandem.compress``), which loaders
    pass on unchanged (mean 0, std 1)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.images, torch.Tensor) or self.images.dtype not in (torch.uint8, torch.float32):
            raise TypeError("ImageSet.images must be a torch.uint8 (or already normalised float32) tensor")
        if self.images.dim() != 4:
            raise ValueError(f"ImageSet.images must be N x C x H x W, got shape {tuple(self.images.shape)}")
        if not isinstance(self.labels, torch.Tensor):
            raise TypeError("ImageSet.labels must be a tensor")
        if self.labels.dtype != torch.int64:
            self.labels = self.labels.to(torch.int64)
        if self.labels.dim() != 1 or self.labels.shape[0] != self.images.shape[0]:
            raise ValueError(
                f"ImageSet: {self.images.shape[0]} images but labels of shape {tuple(self.labels.shape)}"
            )
        self.images = self.images.contiguous()
        self.labels = self.labels.contiguous()

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, indices: torch.Tensor | Sequence[int]) -> "ImageSet":
        """A new ImageSet holding copies of the given rows, in the given order."""
        idx = torch.as_tensor(indices, dtype=torch.int64, device=self.images.device)
        return ImageSet(self.images.index_select(0, idx), self.labels.index_select(0, idx.to(self.labels.device)))

    @classmethod
    def empty(cls, channels: int, height: int, width: int) -> "ImageSet":
        return cls(torch.empty(0, channels, height, width, dtype=torch.uint8), torch.empty(0, dtype=torch.int64))


@dataclass
class SourceData:
    """What a registered dataset loader returns: the dataset as its files define it.

    ``mean``/``std`` are the dataset's standard normalisation constants (per channel,
    in [0, 1] pixel units) or None to have them computed from the train split.
    """

    train: ImageSet
    test: ImageSet
    num_classes: int
    class_names: list[str] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    augment: Augment = field(default_factory=Augment)


@dataclass
class DataSplits:
    """A dataset ready for training: train / val / test splits plus what a model needs to know."""

    train: ImageSet
    val: ImageSet
    test: ImageSet
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: Augment = field(default_factory=Augment)
    name: str = ""
    class_names: list[str] | None = None

    def describe(self) -> str:
        """One line for logs, e.g. ``digits: 1293/144/360 train/val/test, 10 classes, 1x8x8``."""
        h, w = self.image_size
        return (
            f"{self.name}: {len(self.train)}/{len(self.val)}/{len(self.test)} train/val/test, "
            f"{self.num_classes} classes, {self.in_channels}x{h}x{w}"
        )


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices ``0..N-1`` into ``(kept, held_out)``, holding out ``fraction`` of each class.

    Per class, ``round(fraction * n_class)`` indices (half rounded up) are held out,
    chosen by a permutation from a torch.Generator seeded with ``seed``; the same
    labels, fraction and seed always give the same split. Both index tensors are
    sorted ascending, so the original order is kept within each split.
    """
    if not 0.0 <= fraction <= 1.0:
        raise DataError(f"split fraction must be in [0, 1], got {fraction}")
    labels = torch.as_tensor(labels).to("cpu", torch.int64)
    n = labels.shape[0]
    if fraction == 0.0 or n == 0:
        return torch.arange(n), torch.empty(0, dtype=torch.int64)
    gen = torch.Generator().manual_seed(int(seed))
    held = []
    sorted_labels, order = torch.sort(labels, stable=True)
    counts = torch.unique_consecutive(sorted_labels, return_counts=True)[1].tolist()
    for members in torch.split(order, counts):  # one group per class, ascending class, ascending index
        k = min(len(members), int(math.floor(fraction * len(members) + 0.5)))
        perm = torch.randperm(len(members), generator=gen)
        held.append(members[perm[:k]])
    held_idx = torch.sort(torch.cat(held)).values
    mask = torch.ones(n, dtype=torch.bool)
    mask[held_idx] = False
    return torch.nonzero(mask, as_tuple=False).flatten(), held_idx


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of a uint8 ``N x C x H x W`` tensor, in [0, 1] pixel units.

    Works in chunks (float32 values, float64 sums), so it needs little extra memory.
    A channel with zero spread gets std 1.0 so that normalising never divides by 0.
    """
    n, c, h, w = images.shape
    if n == 0:
        raise DataError("cannot compute mean/std of an empty training set")
    chunk = max(1, (1 << 22) // max(1, c * h * w))
    s = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    ones = torch.ones(h * w, 1)
    for i in range(0, n, chunk):
        # Per (image, channel): the sum and the sum of squares of its H*W values as
        # BLAS products (float32, relative error ~1e-7; about 2x faster than
        # elementwise ops), then accumulated across images in float64.
        x = images[i : i + chunk].to("cpu", torch.float32).view(-1, 1, h * w)
        s += (x.view(-1, h * w) @ ones).view(-1, c).sum(0, dtype=torch.float64)
        s2 += torch.bmm(x, x.transpose(1, 2)).view(-1, c).sum(0, dtype=torch.float64)
    count = float(n * h * w)
    mean = s / count
    var = (s2 / count - mean * mean).clamp_min(0.0)
    std = var.sqrt() / 255.0
    mean = mean / 255.0
    std = torch.where(std > 1e-8, std, torch.ones_like(std))
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)


_LIMIT_SEED = 0   # fixed: a limited dataset is the same subset for every run seed


def limit_source(name: str, source: SourceData, train_limit: int | None, test_limit: int | None) -> SourceData:
    """Keep a fixed stratified subset of about ``train_limit`` training and ``test_limit`` test
    images (per class, rounded)."""
    splits = {}
    for split, limit in (("train", train_limit), ("test", test_limit)):
        images = getattr(source, split)
        if limit is None or limit >= len(images):
            splits[split] = images
            continue
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise DataError(f"{name}: {split}_limit must be a positive integer, got {limit!r}")
        kept, _ = stratified_split(images.labels, 1.0 - limit / len(images), _LIMIT_SEED)
        splits[split] = images.subset(kept)
    return replace(source, **splits)


def make_splits(name: str, source: SourceData, *, val_fraction: float = 0.1, seed: int = 0) -> DataSplits:
    """Hold a seeded stratified validation split out of ``source.train`` and assemble DataSplits."""
    try:
        val_fraction = float(val_fraction)
    except (TypeError, ValueError):
        raise DataError(f"{name}: val_fraction must be a number in [0, 1), got {val_fraction!r}") from None
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"{name}: val_fraction must be in [0, 1), got {val_fraction}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DataError(f"{name}: seed must be an integer, got {seed!r}")
    full = source.train
    if len(full) == 0:
        raise DataError(f"{name}: the training set is empty")
    c, h, w = full.shape
    if len(source.test) and source.test.shape != full.shape:
        raise DataError(f"{name}: test images are {source.test.shape} but train images are {full.shape}")
    for split_name, split in (("train", full), ("test", source.test)):
        if len(split):
            lo, hi = int(split.labels.min()), int(split.labels.max())
            if lo < 0 or hi >= source.num_classes:
                raise DataError(
                    f"{name}: {split_name} labels span {lo}..{hi}, outside 0..{source.num_classes - 1}"
                )
    if source.class_names is not None and len(source.class_names) != source.num_classes:
        raise DataError(f"{name}: {len(source.class_names)} class names for {source.num_classes} classes")
    keep, held = stratified_split(full.labels, val_fraction, seed)
    if len(keep) == 0:
        raise DataError(f"{name}: val_fraction={val_fraction} leaves no training images")
    train = full.subset(keep) if len(held) else full
    val = full.subset(held) if len(held) else ImageSet.empty(c, h, w)
    if source.mean is not None and source.std is not None:
        mean, std = tuple(float(v) for v in source.mean), tuple(float(v) for v in source.std)
        if len(mean) != c or len(std) != c:
            raise DataError(f"{name}: mean/std have {len(mean)}/{len(std)} entries for {c} channels")
    else:
        mean, std = channel_stats(train.images)
    return DataSplits(
        train=train,
        val=val,
        test=source.test,
        num_classes=int(source.num_classes),
        in_channels=c,
        image_size=(h, w),
        mean=mean,
        std=std,
        augment=source.augment,
        name=name,
        class_names=list(source.class_names) if source.class_names is not None else None,
    )


# --- small validators shared by the loaders' options -------------------------------------------


def check_int(dataset: str, option: str, value, *, minimum: int = 0, allow_none: bool = False):
    """Return ``value`` as an int >= minimum (or None when allowed); DataError otherwise."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DataError(f"{dataset}: option {option} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def parse_image_size(dataset: str, value, *, allow_none: bool = True) -> tuple[int, int] | None:
    """``32`` -> ``(32, 32)``; ``[h, w]`` -> ``(h, w)``; None stays None (when allowed)."""
    if value is None and allow_none:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return (value, value)
    if (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        return (int(value[0]), int(value[1]))
    raise DataError(f"{dataset}: option image_size must be a positive int or [height, width], got {value!r}")
