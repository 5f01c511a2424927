"""Methods: each a short composition of the primitives, registered by name, and the recipe
sections they own (a method registers its section's pydantic model; recipes.py has no list of
them)."""
from __future__ import annotations

from ..registry import Registry

METHODS = Registry("method")
SECTIONS = Registry("recipe section")   # name -> pydantic model of `name:` in a recipe

register_method = METHODS.register
get_method = METHODS.get
list_methods = METHODS.names


def register_section(name: str, spec) -> None:
    """`name:` in a recipe is validated by `spec` (absent: None)."""
    SECTIONS.register(name, spec)


from . import baseline  # noqa: E402,F401  (registers)
from . import pqkd  # noqa: E402,F401  (registers)
from . import prune  # noqa: E402,F401  (registers)
from . import quantize  # noqa: E402,F401  (registers)
from . import mutual  # noqa: E402,F401  (registers mutual and independent)
