"""IDX files (the original MNIST / Fashion-MNIST format) and the ``mnist`` / ``fashion-mnist`` datasets.

IDX layout: a 4-byte magic number ``0x00 0x00 <type code> <number of dims>``, then
one big-endian uint32 per dimension, then the data (big-endian for multi-byte
types). Files may be plain or gzip-compressed (detected from the content, not
the name).
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .augment import Augment
from .core import ImageSet, SourceData
from .registry import register_dataset

__all__ = ["read_idx", "IDX_IMAGES_MAGIC", "IDX_LABELS_MAGIC"]

_IDX_TYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
IDX_IMAGES_MAGIC = 0x00000803  # uint8, 3 dims
IDX_LABELS_MAGIC = 0x00000801  # uint8, 1 dim


def _read_maybe_gzip(path: Path, what: str) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{what}: cannot read {path} ({e.strerror or e})") from None
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as e:
        raise DataError(f"{what}: {path} is a corrupt or truncated gzip file ({e})") from None


def read_idx(path: str | Path, *, expect_magic: int | None = None, what: str = "idx") -> np.ndarray:
    """Read an IDX file (plain or .gz) into a native-endian numpy array, validating the header.

    ``expect_magic`` (e.g. ``IDX_IMAGES_MAGIC``) makes any other magic number a DataError.
    """
    path = Path(path)
    raw = _read_maybe_gzip(path, what)
    if len(raw) < 4:
        raise DataError(f"{what}: {path} is too short for an IDX header ({len(raw)} bytes)")
    magic = struct.unpack(">I", raw[:4])[0]
    code, ndim = raw[2], raw[3]
    if raw[0] != 0 or raw[1] != 0 or code not in _IDX_TYPES or ndim == 0:
        raise DataError(f"{what}: {path} has a bad IDX magic number 0x{magic:08x}; it is not an IDX file")
    if expect_magic is not None and magic != expect_magic:
        raise DataError(f"{what}: {path} has magic number 0x{magic:08x}, expected 0x{expect_magic:08x}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{what}: {path} is truncated inside its IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = _IDX_TYPES[code]
    count = math.prod(dims)
    expected = count * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{what}: {path} header says shape {tuple(dims)} ({expected} data bytes) "
            f"but the file holds {len(raw) - header} data bytes"
        )
    arr = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)  # native-endian and writable


def _find(dataset: str, root: Path, base: str, search: list[Path]) -> Path:
    for folder in search:
        for candidate in (folder / base, folder / f"{base}.gz"):
            if candidate.is_file():
                return candidate
    where = str(root)
    extra = [str(f) for f in search[1:] if f.is_dir()]
    if extra:
        where += f" (also looked in {', '.join(extra)})"
    raise DataError(f"{dataset}: expected {base}[.gz] in {where} (not found)")


def _load_idx_pair(dataset: str, root: Path, prefix: str, search: list[Path], num_classes: int) -> ImageSet:
    img_path = _find(dataset, root, f"{prefix}-images-idx3-ubyte", search)
    lbl_path = _find(dataset, root, f"{prefix}-labels-idx1-ubyte", search)
    images = read_idx(img_path, expect_magic=IDX_IMAGES_MAGIC, what=dataset)
    labels = read_idx(lbl_path, expect_magic=IDX_LABELS_MAGIC, what=dataset)
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{dataset}: {img_path} holds {images.shape[0]} images but {lbl_path} holds {labels.shape[0]} labels"
        )
    if labels.size and int(labels.max()) >= num_classes:
        raise DataError(f"{dataset}: {lbl_path} has label {int(labels.max())}, expected 0..{num_classes - 1}")
    return ImageSet(
        torch.from_numpy(np.ascontiguousarray(images[:, None, :, :])),
        torch.from_numpy(labels.astype(np.int64)),
    )


def _load_mnist_like(dataset: str, root: Path, raw_subdir: str, class_names: list[str], mean: float, std: float,
                     augment: Augment):
    if not root.is_dir():
        raise DataError(f"{dataset}: root {root} is not a folder")
    # The folder itself, or torchvision's layouts (<root>/raw, <root>/<MNIST>/raw).
    search = [root, root / "raw", root / raw_subdir / "raw"]
    return SourceData(
        train=_load_idx_pair(dataset, root, "train", search, len(class_names)),
        test=_load_idx_pair(dataset, root, "t10k", search, len(class_names)),
        num_classes=len(class_names),
        class_names=class_names,
        mean=(mean,),
        std=(std,),
        augment=augment,
    )


def _augment(dataset: str, crop_padding, hflip) -> Augment:
    try:
        return Augment(crop_padding=crop_padding, hflip=hflip)
    except ValueError as e:
        raise DataError(f"{dataset}: {e}".replace("Augment.", "option ")) from None


@register_dataset("mnist")
def load_mnist_source(root: Path, *, crop_padding: int = 0) -> SourceData:
    """MNIST from its 4 IDX files (plain or .gz) in ``root``: 60000 train / 10000 test, 28x28, 1 channel.

    Normalisation: the standard mean 0.1307, std 0.3081. Default augmentation: none; option
    ``crop_padding`` (e.g. 2) turns on random shifts. No flip option: a flip changes a digit.
    """
    return _load_mnist_like("mnist", root, "MNIST", [str(i) for i in range(10)], 0.1307, 0.3081,
                            _augment("mnist", crop_padding, False))


FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip


@register_dataset("fashion-mnist")
def load_fashion_mnist_source(root: Path, *, crop_padding: int = 0, hflip: bool = False) -> SourceData:
    """Fashion-MNIST from its 4 IDX files (plain or .gz) in ``root``: 60000 / 10000, 28x28, 1 channel.

    Normalisation: the standard mean 0.2860, std 0.3530. Default augmentation: none, like
    MNIST; options ``crop_padding`` (random shifts, e.g. 2) and ``hflip`` (clothes may be
    mirrored) turn it on.
    """
    return _load_mnist_like("fashion-mnist", root, "FashionMNIST", FASHION_CLASSES, 0.2860, 0.3530,
                            _augment("fashion-mnist", crop_padding, hflip))
