"""Dataset registry: ``load_dataset(name, root, ...)``, ``list_datasets()``, ``register_dataset``.

A dataset loader is a function ``fn(root, *, option=default, ...) -> SourceData``.
Its keyword-only parameters are the dataset's options (their defaults are the
defaults); ``root`` is a :class:`pathlib.Path` or None. If ``root`` has no
default, the dataset needs a path and ``load_dataset`` says so when none is given.
The registry validates option names, calls the loader, and holds the validation
split out of the training set (:func:`tandem.data.core.make_splits`).
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import DataError
from ..registry import Registry
from .core import DataSplits, SourceData, limit_source, make_splits

__all__ = ["register_dataset", "list_datasets", "load_dataset", "dataset_of", "dataset_options", "dataset_summary"]


@dataclass(frozen=True)
class _Entry:
    name: str
    fn: Callable[..., SourceData]
    options: dict[str, Any]
    needs_root: bool
    summary: str


def _canonical(name: str) -> str:
    return str(name).strip().lower().replace("_", "-")


DATASETS = Registry("dataset", error=DataError, canonical=_canonical)   # name -> _Entry


def register_dataset(name: str) -> Callable[[Callable[..., SourceData]], Callable[..., SourceData]]:
    """Decorator registering ``fn(root, *, **options) -> SourceData`` under ``name``."""
    key = _canonical(name)

    def deco(fn: Callable[..., SourceData]) -> Callable[..., SourceData]:
        params = list(inspect.signature(fn).parameters.values())
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(positional) != 1:
            raise TypeError(f"dataset loader {fn.__name__} must take exactly one positional argument (root)")
        options = {p.name: p.default for p in params if p.kind == p.KEYWORD_ONLY}
        for opt, default in options.items():
            if default is inspect.Parameter.empty:
                raise TypeError(f"dataset loader {fn.__name__}: option {opt} needs a default")
        old = DATASETS.find(key)
        if old is not None and old.fn.__qualname__ != fn.__qualname__:
            raise ValueError(f"dataset {key!r} is already registered (by {old.fn.__module__}.{old.fn.__qualname__})")
        doc = inspect.getdoc(fn) or ""
        DATASETS.replace(key, _Entry(
            name=key,
            fn=fn,
            options=options,
            needs_root=positional[0].default is inspect.Parameter.empty,
            summary=doc.splitlines()[0] if doc else "",
        ))
        return fn

    return deco


def list_datasets() -> list[str]:
    """Names of the registered datasets, sorted."""
    return DATASETS.names()


def _entry(name: str) -> _Entry:
    return DATASETS.get(name)


def dataset_options(name: str) -> dict[str, Any]:
    """The options a dataset accepts, with their defaults."""
    return dict(_entry(name).options)


def dataset_summary(name: str) -> str:
    """A one-line description of a dataset (the first line of its loader's docstring)."""
    return _entry(name).summary


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    train_limit: int | None = None,
    test_limit: int | None = None,
    **options: Any,
) -> DataSplits:
    """Load dataset ``name`` (from ``root`` where it needs files) as train / val / test splits.

    ``val_fraction`` of each class of the training set is held out as the
    validation split, chosen by ``seed``; the test split never depends on ``seed``.
    ``train_limit`` / ``test_limit`` keep a fixed stratified subset of that many images of the
    training / test set (the same for every seed; cpu-small runs on large datasets).
    ``options`` are the dataset's own (see :func:`dataset_options`).
    """
    entry = _entry(name)
    unknown = sorted(set(options) - set(entry.options))
    if unknown:
        allowed = ", ".join(sorted(entry.options)) or "none"
        raise DataError(f"{entry.name}: unknown option(s) {', '.join(unknown)}; allowed options: {allowed}")
    if root is None and entry.needs_root:
        raise DataError(f"{entry.name}: needs a root (the folder or file holding the dataset); none was given")
    root_path = Path(root).expanduser() if root is not None else None
    if root_path is not None and not root_path.exists():
        where = "" if root_path.is_absolute() else f" (resolved to {root_path.resolve()} from the current directory {Path.cwd()})"
        raise DataError(f"{entry.name}: root {root} does not exist{where}")
    source = entry.fn(root_path, **options)
    source = limit_source(entry.name, source, train_limit, test_limit)
    return make_splits(entry.name, source, val_fraction=val_fraction, seed=seed)


def dataset_of(meta: dict, data_root=None, source: str = "the model file") -> DataSplits:
    """The dataset a model file's metadata records, split as its run split it (its test split
    is the one the run measured); `data_root` where the data moved since."""
    spec = meta.get("dataset") or {}
    if not spec:
        raise DataError(f"{source} does not say which dataset it was trained on; it was not written by a run")
    return load_dataset(spec["name"], data_root or spec.get("root"), val_fraction=spec.get("val_fraction", 0.1),
                        seed=spec.get("split_seed", meta.get("seed", 0)), train_limit=spec.get("train_limit"),
                        test_limit=spec.get("test_limit"), **spec.get("options", {}))
