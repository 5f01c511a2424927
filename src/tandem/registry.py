"""One registry idiom for everything a recipe names: models, datasets, methods, recipe
sections, pruning criteria, quantizers.

    METHODS = Registry("method")

    @METHODS.register("prune")
    def prune_method(ctx): ...

    METHODS.get("prune")        # unknown name -> one TandemError line naming what is allowed
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

from .errors import TandemError


class Registry:
    """name -> object; ``register(name)`` decorates (or ``register(name, obj)`` adds) once per
    name, ``get`` fails with the allowed names. ``canonical`` maps a spelling to its key (datasets
    accept 'fashion_mnist' for 'fashion-mnist'); ``error`` is the exception ``get`` raises."""

    def __init__(self, what: str, *, error: type[TandemError] = TandemError,
                 canonical: Callable[[str], str] = str):
        self.what, self.error, self.canonical = what, error, canonical
        self._items: dict[str, Any] = {}

    def register(self, name: str, obj: Any = None) -> Callable:
        key = self.canonical(name)

        def add(o):
            if key in self._items and self._items[key] is not o:
                raise ValueError(f"{self.what} {key!r} is registered twice")
            self._items[key] = o
            return o
        return add(obj) if obj is not None else add

    def replace(self, name: str, obj: Any) -> None:
        """Register ``obj`` under ``name`` whether or not the name is taken (a module reloaded)."""
        self._items[self.canonical(name)] = obj

    def unregister(self, name: str) -> None:
        self._items.pop(self.canonical(name), None)

    def get(self, name: str) -> Any:
        key = self.canonical(name)
        if key not in self._items:
            raise self.error(f"unknown {self.what} {name!r}; allowed: {', '.join(self.names())}")
        return self._items[key]

    def find(self, name: str) -> Any:
        """The object registered under ``name``, or None."""
        return self._items.get(self.canonical(name))

    def names(self) -> list[str]:
        return sorted(self._items)

    def items(self) -> Iterator[tuple[str, Any]]:
        return iter(sorted(self._items.items()))

    def __contains__(self, name: str) -> bool:
        return self.canonical(name) in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
