"""Methods: each a short composition of the primitives, registered by name."""
from __future__ import annotations

from typing import Callable

from ..errors import TandemError

_METHODS: dict[str, Callable] = {}


def register_method(name: str):
    def deco(fn: Callable) -> Callable:
        _METHODS[name] = fn
        return fn
    return deco


def list_methods() -> list[str]:
    return sorted(_METHODS)


def get_method(name: str) -> Callable:
    if name not in _METHODS:
        raise TandemError(f"unknown method {name!r}; allowed: {', '.join(list_methods())}")
    return _METHODS[name]


from . import baseline  # noqa: E402,F401  (registers)
from . import pqkd  # noqa: E402,F401  (registers)
from . import prune  # noqa: E402,F401  (registers)
from . import quantize  # noqa: E402,F401  (registers)
from . import mutual  # noqa: E402,F401  (registers mutual and independent)
