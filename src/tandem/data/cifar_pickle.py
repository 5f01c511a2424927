"""CIFAR-10 / CIFAR-100 in their original python-pickle form, read with a restricted unpickler.

The pickles were written by someone else, so they are never given the power to
import or call arbitrary code: :class:`RestrictedUnpickler` resolves only the few
globals that a pickled dict of numpy arrays needs, and refuses everything else
with a DataError naming the file.
"""

from __future__ import annotations

import codecs
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError
from .augment import Augment
from .core import ImageSet, SourceData
from .registry import register_dataset

__all__ = ["RestrictedUnpickler", "load_pickle", "CIFAR10_CLASSES", "CIFAR100_CLASSES"]


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    # Python 3 pickles of bytes at protocol <= 2 are written as _codecs.encode(text, "latin1").
    if codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"refused _codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, "latin1")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    reconstruct = np.ndarray((0,)).__reduce__()[0]  # numpy's _reconstruct, whatever its module
    scalar = np.int64(0).__reduce__()[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]  # numpy's _frombuffer (protocol-5 pickles)
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
        ("builtins", "bytearray"): bytearray,
        ("__builtin__", "bytearray"): bytearray,
    }
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only numpy array/dtype reconstruction and latin-1 bytes.

    Any other global (``os.system``, ``builtins.eval``, ...) raises a DataError naming ``path``.
    Strings written by Python 2 come back as bytes (``encoding="bytes"``).
    """

    _ALLOWED: dict[tuple[str, str], Any] | None = None

    def __init__(self, file, path: str | Path, what: str = "pickle") -> None:
        super().__init__(file, encoding="bytes")
        self._path = path
        self._what = what
        if RestrictedUnpickler._ALLOWED is None:
            RestrictedUnpickler._ALLOWED = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        obj = self._ALLOWED.get((module, name))  # type: ignore[union-attr]
        if obj is None:
            raise DataError(
                f"{self._what}: refused to load {self._path}: it asks for {module}.{name}, "
                "which a CIFAR pickle never needs (the file may be malicious)"
            )
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise DataError(f"{self._what}: refused to load {self._path}: it uses persistent ids")


def load_pickle(path: str | Path, what: str = "pickle") -> Any:
    """Unpickle ``path`` with :class:`RestrictedUnpickler`; DataError if it is missing, corrupt or refused."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{what}: cannot read {path} ({e.strerror or e})") from None
    try:
        return RestrictedUnpickler(io.BytesIO(raw), path, what).load()
    except DataError:
        raise
    except Exception as e:  # truncated or corrupt pickles raise many different types
        raise DataError(f"{what}: {path} is not a valid pickle ({type(e).__name__}: {e})") from None


def _str_keys(d: Any, path: Path, what: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise DataError(f"{what}: {path} does not hold a dict (got {type(d).__name__}); not a CIFAR batch")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in d.items()}


def _parse_batch(path: Path, label_key: str, what: str) -> tuple[np.ndarray, np.ndarray]:
    d = _str_keys(load_pickle(path, what), path, what)
    if "data" not in d or label_key not in d:
        raise DataError(f"{what}: {path} lacks the keys 'data' and {label_key!r}; keys are {sorted(d)}")
    data, labels = d["data"], d[label_key]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{what}: {path}: 'data' must be a uint8 array of N x 3072, got {desc}")
    try:
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        raise DataError(f"{what}: {path}: {label_key!r} is not a list of integers") from None
    if labels.shape[0] != data.shape[0]:
        raise DataError(f"{what}: {path} holds {data.shape[0]} images but {labels.shape[0]} labels")
    return data.reshape(-1, 3, 32, 32), labels


def _to_set(parts: list[tuple[np.ndarray, np.ndarray]]) -> ImageSet:
    images = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    labels = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    return ImageSet(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels.astype(np.int64)))


def _resolve(root: Path, folder: str, marker: str, what: str) -> Path:
    if not root.is_dir():
        raise DataError(f"{what}: root {root} is not a folder")
    if (root / marker).is_file():
        return root
    if (root / folder / marker).is_file():
        return root / folder
    raise DataError(f"{what}: expected {marker} in {root} or {root / folder} (not found)")


def _need(folder: Path, name: str, what: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise DataError(f"{what}: expected {name} in {folder} (not found)")
    return path


def _names_from_meta(folder: Path, meta: str, key: str, default: list[str], what: str) -> list[str]:
    path = folder / meta
    if not path.is_file():
        return default
    d = _str_keys(load_pickle(path, what), path, what)
    names = d.get(key)
    if not isinstance(names, list) or len(names) != len(default):
        return default
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

CIFAR100_CLASSES = [
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
]  # fmt: skip

CIFAR100_COARSE_CLASSES = [
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables",
    "household_electrical_devices", "household_furniture", "insects", "large_carnivores",
    "large_man-made_outdoor_things", "large_natural_outdoor_scenes", "large_omnivores_and_herbivores",
    "medium_mammals", "non-insect_invertebrates", "people", "reptiles", "small_mammals", "trees",
    "vehicles_1", "vehicles_2",
]  # fmt: skip


@register_dataset("cifar10")
def load_cifar10_source(root: Path) -> SourceData:
    """CIFAR-10 python pickles (``cifar-10-batches-py``: data_batch_1..5, test_batch); root is that folder or its parent.

    Normalisation: the standard CIFAR-10 mean/std. Default augmentation: random
    crop with padding 4 and horizontal flip.
    """
    what = "cifar10"
    folder = _resolve(root, "cifar-10-batches-py", "data_batch_1", what)
    train = [_parse_batch(_need(folder, f"data_batch_{i}", what), "labels", what) for i in range(1, 6)]
    test = [_parse_batch(_need(folder, "test_batch", what), "labels", what)]
    return SourceData(
        train=_to_set(train),
        test=_to_set(test),
        num_classes=10,
        class_names=_names_from_meta(folder, "batches.meta", "label_names", CIFAR10_CLASSES, what),
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        augment=Augment(crop_padding=4, hflip=True),
    )


@register_dataset("cifar100")
def load_cifar100_source(root: Path, *, label_type: str = "fine") -> SourceData:
    """CIFAR-100 python pickles (``cifar-100-python``: train, test); root is that folder or its parent.

    ``label_type``: ``fine`` (100 classes, the usual) or ``coarse`` (20 superclasses).
    Normalisation: the standard CIFAR-100 mean/std. Default augmentation: random
    crop with padding 4 and horizontal flip.
    """
    what = "cifar100"
    if label_type not in ("fine", "coarse"):
        raise DataError(f"{what}: option label_type must be 'fine' or 'coarse', got {label_type!r}")
    folder = _resolve(root, "cifar-100-python", "train", what)
    key = f"{label_type}_labels"
    train = [_parse_batch(_need(folder, "train", what), key, what)]
    test = [_parse_batch(_need(folder, "test", what), key, what)]
    default = CIFAR100_CLASSES if label_type == "fine" else CIFAR100_COARSE_CLASSES
    return SourceData(
        train=_to_set(train),
        test=_to_set(test),
        num_classes=len(default),
        class_names=_names_from_meta(folder, "meta", f"{label_type}_label_names", default, what),
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        augment=Augment(crop_padding=4, hflip=True),
    )
