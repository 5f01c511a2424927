"""``synthetic``: a deterministic, learnable toy image set for tests and smoke runs."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .augment import Augment
from .core import ImageSet, SourceData, check_int, parse_image_size
from .registry import register_dataset

_PROTOTYPE_SEED = 20240611
_TRAIN_SEED = 1
_TEST_SEED = 2


def _make(protos: torch.Tensor, n: int, seed: int) -> ImageSet:
    num_classes = protos.shape[0]
    gen = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=gen)]
    brightness = 0.15 * torch.randn(n, 1, 1, 1, generator=gen)
    noise = 0.12 * torch.randn((n,) + tuple(protos.shape[1:]), generator=gen)
    x = (0.2 + 0.6 * protos[labels] + brightness + noise).clamp(0.0, 1.0)
    return ImageSet(torch.round(x * 255.0).to(torch.uint8), labels)


@register_dataset("synthetic")
def load_synthetic_source(
    root: Path | None = None,
    *,
    num_classes: int = 10,
    channels: int = 3,
    image_size: int | tuple[int, int] = 32,
    train_size: int = 512,
    test_size: int = 128,
) -> SourceData:
    """Class prototypes (smooth random patterns) plus seeded noise; deterministic; ``root`` is ignored.

    Each class has a fixed low-frequency pattern; an image is its class pattern
    plus a random brightness shift and per-pixel Gaussian noise, so a small CNN
    learns it in a few epochs. Labels are balanced. Default augmentation: none.
    """
    num_classes = check_int("synthetic", "num_classes", num_classes, minimum=2)
    channels = check_int("synthetic", "channels", channels, minimum=1)
    h, w = parse_image_size("synthetic", image_size, allow_none=False)
    train_size = check_int("synthetic", "train_size", train_size, minimum=1)
    test_size = check_int("synthetic", "test_size", test_size, minimum=0)
    gen = torch.Generator().manual_seed(_PROTOTYPE_SEED)
    coarse = torch.rand(num_classes, channels, 4, 4, generator=gen)
    protos = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    return SourceData(
        train=_make(protos, train_size, _TRAIN_SEED),
        test=_make(protos, test_size, _TEST_SEED),
        num_classes=num_classes,
        class_names=[f"class{i}" for i in range(num_classes)],
        augment=Augment(),
    )
