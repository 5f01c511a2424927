"""Datasets as in-memory uint8 tensors, batched on-device augmentation and a reproducible loader.

Public API::

    splits = load_dataset("digits", root=None, val_fraction=0.1, seed=0, **options)  # -> DataSplits
    list_datasets()             # ['cifar10', 'cifar100', 'digits', 'fashion-mnist', ...]
    dataset_options("mnist")    # {option: default}
    @register_dataset("name")   # fn(root, *, option=default, ...) -> SourceData

    loader = BatchLoader(splits.train, 128, shuffle=True, augment=splits.augment,
                         mean=splits.mean, std=splits.std, device="cuda", seed=0)
    loader.set_epoch(epoch)
    for x, y in loader: ...     # float32 normalised N x C x H x W, int64 labels, on device

    augment_batch(x, Augment(crop_padding=4, hflip=True), generator)

User mistakes (unknown names/options, missing or corrupt files) raise
:class:`tandem.errors.DataError` naming what was expected where.
"""

from .augment import Augment, augment_batch
from .core import DataSplits, ImageSet, SourceData, channel_stats, make_splits, stratified_split
from .loader import BatchLoader, epoch_seed
from .registry import dataset_of, dataset_options, dataset_summary, list_datasets, load_dataset, register_dataset

# Importing the loaders registers them.
from . import digits, synthetic, idx, cifar_pickle, image_folder, tiny_imagenet, in_memory  # noqa: E402,F401  isort: skip

__all__ = [
    "Augment",
    "augment_batch",
    "BatchLoader",
    "epoch_seed",
    "DataSplits",
    "ImageSet",
    "SourceData",
    "channel_stats",
    "make_splits",
    "stratified_split",
    "load_dataset",
    "list_datasets",
    "register_dataset",
    "dataset_options",
    "dataset_summary",
]
