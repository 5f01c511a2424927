"""``digits``: scikit-learn's bundled 8x8 handwritten digits (no download needed; the default)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .augment import Augment
from .core import ImageSet, SourceData, stratified_split
from .registry import register_dataset

TEST_FRACTION = 0.2
TEST_SEED = 0  # fixed: the test split never depends on the run's seed


def _read_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 x 64 pixel values (0..16) and the labels, as scikit-learn's ``load_digits`` gives them.

    Reads scikit-learn's bundled ``digits.csv.gz`` directly when it is where it
    always has been: importing ``sklearn.datasets`` costs about a second.
    """
    spec = importlib.util.find_spec("sklearn")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            table = np.loadtxt(path, delimiter=",")
            if table.shape == (1797, 65):
                return table[:, :-1], table[:, -1].astype(np.int64)
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("digits: needs scikit-learn (pip install scikit-learn)") from None
    bunch = load_digits()
    return bunch.data, bunch.target


@register_dataset("digits")
def load_digits_source(root: Path | None = None) -> SourceData:
    """scikit-learn's 8x8 digits: 1797 images, 1 channel, 10 classes; a fixed stratified 20% is the test split.

    Pixel values 0..16 become uint8 as ``round(v * 255 / 16)``. ``root`` is ignored.
    Default augmentation: none (8x8 digits are too small to crop, and flips change digits).
    """
    values, targets = _read_digits()
    images = np.rint(values.reshape(-1, 1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)
    full = ImageSet(torch.from_numpy(images), torch.from_numpy(targets.astype(np.int64)))
    train_idx, test_idx = stratified_split(full.labels, TEST_FRACTION, TEST_SEED)
    return SourceData(
        train=full.subset(train_idx),
        test=full.subset(test_idx),
        num_classes=10,
        class_names=[str(i) for i in range(10)],
        augment=Augment(),
    )
