"""Data a user holds in Python (a torch Dataset or DataLoader), as the splits a run trains on.

`tandem.compress` reads each split once into memory: uint8 images keep tandem's normalisation
(mean and std of the training split); float images are taken as the user's transforms left them
(already normalised: mean 0, std 1). Random transforms are therefore drawn once, not per epoch.
The `in-memory` dataset name records such a run; a recipe cannot load it.
"""
from __future__ import annotations

import torch

from ..errors import DataError
from .augment import Augment
from .core import DataSplits, ImageSet, channel_stats, stratified_split
from .registry import register_dataset

NAME = "in-memory"


@register_dataset(NAME)
def load_in_memory_source(root=None):
    """The data given to tandem.compress(...) in Python (not loadable from a recipe)."""
    raise DataError("dataset 'in-memory' is the data a tandem.compress(...) call was given in Python; a recipe or "
                    "`tandem eval` cannot load it: evaluate in Python, or use a registered dataset (tandem list)")


def _batches(data):
    """(x, y) batches of a DataLoader, or of a Dataset read 256 items at a time."""
    if isinstance(data, torch.utils.data.DataLoader):
        return data
    if not isinstance(data, torch.utils.data.Dataset):
        raise DataError(f"give a torch.utils.data.Dataset or DataLoader, not {type(data).__name__}")
    return torch.utils.data.DataLoader(data, batch_size=256, shuffle=False)


def to_imageset(data, what: str) -> ImageSet:
    """All of `data` as one ImageSet (images N x C x H x W, uint8 or float32; labels int64)."""
    xs, ys = [], []
    try:
        for batch in _batches(data):
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise DataError(f"{what}: each item must be (image, label); got {type(batch).__name__}")
            x, y = batch[0], batch[1]
            if not torch.is_tensor(x) or x.dim() != 4:
                raise DataError(f"{what}: images must be C x H x W tensors (batched N x C x H x W); got "
                                f"{type(x).__name__}{tuple(x.shape) if torch.is_tensor(x) else ''}")
            xs.append(x if x.dtype == torch.uint8 else x.float())
            ys.append(torch.as_tensor(y).long().flatten())
    except (TypeError, RuntimeError) as exc:   # default_collate on items that are not tensors
        raise DataError(f"{what}: cannot read it as (image tensor, label) items ({exc})") from None
    if not xs:
        raise DataError(f"{what} is empty")
    if len({x.dtype for x in xs}) > 1 or len({tuple(x.shape[1:]) for x in xs}) > 1:
        raise DataError(f"{what}: images differ in dtype or shape from batch to batch")
    return ImageSet(torch.cat(xs).contiguous(), torch.cat(ys))


def in_memory_splits(train, val, test, val_fraction: float, split_seed: int) -> DataSplits:
    """DataSplits of a user's data; without `val`, a stratified `val_fraction` of train is held
    out for model selection (the test split never selects anything)."""
    train_set, test_set = to_imageset(train, "train"), to_imageset(test, "test")
    if val is not None:
        val_set = to_imageset(val, "val")
    else:
        if not 0 < val_fraction < 1:
            raise DataError(f"val_fraction = {val_fraction}: give val=, or a fraction in (0, 1) of train to hold out")
        kept, held = stratified_split(train_set.labels, val_fraction, split_seed)
        train_set, val_set = train_set.subset(kept), train_set.subset(held)
    sets = {"train": train_set, "val": val_set, "test": test_set}
    shapes = {name: s.shape for name, s in sets.items()}
    if len(set(shapes.values())) > 1 or len({s.images.dtype for s in sets.values()}) > 1:
        raise DataError(f"train, val and test differ in image shape or dtype: {shapes}")
    classes = 1 + max(int(s.labels.max()) for s in sets.values() if len(s))   # the caller may widen it
    c, h, w = train_set.shape
    if train_set.images.dtype == torch.uint8:
        mean, std = channel_stats(train_set.images)
    else:
        mean, std = (0.0,) * c, (1.0,) * c
    return DataSplits(train=train_set, val=val_set, test=test_set, num_classes=classes,
                      in_channels=c, image_size=(h, w), mean=mean, std=std, augment=Augment(), name=NAME)
