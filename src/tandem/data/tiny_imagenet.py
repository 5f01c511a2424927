"""``tiny-imagenet``: the standard ``tiny-imagenet-200`` folder (or its .zip); official val = test split.

Layout: ``wnids.txt`` (the 200 class ids), ``train/<wnid>/images/*.JPEG`` and
``val/images/*.JPEG`` labelled by ``val/val_annotations.txt`` (tab-separated:
file name, wnid, box). The unlabelled ``test/`` folder is ignored. Decoding, caching and the
rest of loading are image-folder's (:func:`tandem.data.image_folder.load_folder`); this module
only lists the files.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from .core import SourceData
from .image_folder import FileSource, load_folder
from .registry import register_dataset

WHAT = "tiny-imagenet"


def _find_prefix(source: FileSource) -> str:
    for prefix in ("", "tiny-imagenet-200/"):
        if source.exists(prefix + "wnids.txt"):
            return prefix
    if source.is_zip:
        where = f"{source.path} (at its top or under tiny-imagenet-200/)"
    else:
        where = f"{source.path} or {source.path / 'tiny-imagenet-200'}"
    raise DataError(f"{WHAT}: expected wnids.txt in {where} (not found)")


def _read_text(source: FileSource, member: str) -> list[str]:
    if not source.exists(member):
        raise DataError(f"{WHAT}: expected {member} in {source.path} (not found)")
    try:
        text = source.read(member).decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{WHAT}: {source.describe(member)} is not UTF-8 text") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _plan(source: FileSource, limit: int | None):
    prefix = _find_prefix(source)
    wnids = _read_text(source, prefix + "wnids.txt")
    if len(set(wnids)) != len(wnids):
        raise DataError(f"{WHAT}: {source.describe(prefix + 'wnids.txt')} lists a class twice")
    classes = sorted(wnids)
    index = {w: i for i, w in enumerate(classes)}
    files = source.image_files()
    train: list[tuple[str, int]] = []
    per_class: dict[str, int] = {}
    train_prefix = prefix + "train/"
    for f in files:
        if not f.startswith(train_prefix):
            continue
        parts = f[len(train_prefix) :].split("/")
        if len(parts) != 3 or parts[1] != "images":
            continue
        wnid = parts[0]
        if wnid not in index:
            raise DataError(f"{WHAT}: {source.describe(f)}: class {wnid} is not listed in wnids.txt")
        if limit is not None and per_class.get(wnid, 0) >= limit:
            continue
        per_class[wnid] = per_class.get(wnid, 0) + 1
        train.append((f, index[wnid]))
    if not train:
        raise DataError(f"{WHAT}: expected images in {source.describe(train_prefix + '<wnid>/images/')} (none found)")
    ann_member = prefix + "val/val_annotations.txt"
    val_images = {f for f in files if f.startswith(prefix + "val/images/")}
    test: list[tuple[str, int]] = []
    per_class = {}
    for line in _read_text(source, ann_member):
        fields = line.split("\t") if "\t" in line else line.split()
        if len(fields) < 2:
            raise DataError(f"{WHAT}: {source.describe(ann_member)}: malformed line {line!r}")
        member, wnid = prefix + "val/images/" + fields[0], fields[1]
        if wnid not in index:
            raise DataError(f"{WHAT}: {source.describe(ann_member)}: class {wnid} is not listed in wnids.txt")
        if member not in val_images:
            raise DataError(f"{WHAT}: {source.describe(ann_member)} names {fields[0]}, but {source.describe(member)} is missing")
        val_images.discard(member)
        if limit is not None and per_class.get(wnid, 0) >= limit:
            continue
        per_class[wnid] = per_class.get(wnid, 0) + 1
        test.append((member, index[wnid]))
    if val_images:
        example = sorted(val_images)[0]
        raise DataError(f"{WHAT}: {source.describe(example)} has no line in {source.describe(ann_member)}")
    test.sort()
    return classes, {"train": train, "test": test}


@register_dataset("tiny-imagenet")
def load_tiny_imagenet_source(
    root: Path,
    *,
    channels: int = 3,
    image_size: int | tuple[int, int] | None = None,
    limit_per_class: int | None = None,
    cache: bool = True,
    workers: int | None = None,
) -> SourceData:
    """Tiny-ImageNet (200 classes, 64x64): ``tiny-imagenet-200`` folder, its parent, or a .zip of it.

    Class index = position in the sorted wnids (class_names are the wnids). The
    official val set is the test split. Options as for image-folder (channels,
    image_size, limit_per_class, cache, workers). Normalisation: mean/std of the
    train split. Default augmentation: crop padding min(H, W) // 8 and horizontal flip.
    """
    data = load_folder(WHAT, root, _plan, channels=channels, image_size=image_size, limit_per_class=limit_per_class,
                       cache=cache, workers=workers)
    if len(data.test) and data.test.shape[1:] != data.train.shape[1:]:
        raise DataError(f"{WHAT}: val images are {data.test.shape[2]}x{data.test.shape[1]} but train images are "
                        f"{data.train.shape[2]}x{data.train.shape[1]}; pass image_size")
    return data
