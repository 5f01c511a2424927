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
    name, ``get`` fails with the allowed names."""

    def __init__(self, what: str):
        self.what = what
        self._items: dict[str, Any] = {}

    def register(self, name: str, obj: Any = None) -> Callable:
        def add(o):
            if name in self._items and self._items[name] is not o:
                raise ValueError(f"{self.what} {name!r} is registered twice")
            self._items[name] = o
            return o
        return add(obj) if obj is not None else add

    def get(self, name: str) -> Any:
        if name not in self._items:
            raise TandemError(f"unknown {self.what} {name!r}; allowed: {', '.join(self.names())}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def items(self) -> Iterator[tuple[str, Any]]:
        return iter(sorted(self._items.items()))

    def __contains__(self, name: str) -> bool:
        return name in self._items
