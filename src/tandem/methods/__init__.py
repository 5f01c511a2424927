"""Methods: each a short composition of the primitives, registered by name with its whole
contract in one decorator (the recipe sections it reads with their pydantic models, its
preflight, its recipe-level checks), so recipes.py and the runner name no method.

    @register_method("prune", sections={"prune": PruneSpec}, preflight=channel_pruning_preflight("prune"))
    def prune_method(ctx: RunContext) -> None: ...
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from pydantic import BaseModel

from ..context import RunContext
from ..registry import Registry

METHODS = Registry("method")            # name -> Method
SECTIONS = Registry("recipe section")   # name -> pydantic model of `name:` in a recipe (from the methods' contracts)


@dataclass(frozen=True)
class Method:
    """A registered method: calling it runs it (`method(ctx)`); the rest is its contract."""
    name: str
    run: Callable[[RunContext], None]
    sections: dict[str, type[BaseModel]]
    preflight: Optional[Callable[[RunContext], None]] = None
    checks: Optional[Callable[[Any], None]] = None   # checks(recipe)

    def __call__(self, ctx: RunContext) -> None:
        self.run(ctx)


def register_method(name: str, sections: dict[str, type[BaseModel]] | None = None,
                    preflight: Callable[[RunContext], None] | None = None,
                    checks: Callable[[Any], None] | None = None):
    """Register `method(ctx)` under `name`, with its contract:

    - `sections`: {section: pydantic model} of the recipe sections it reads; a recipe validates
      `section:` by that model, records it with its defaults, and refuses a section none of its
      methods reads. Two methods may register the same model under one name (prune, quant).
    - `preflight(ctx)`: checks that need the data or files (a teacher file's class count, a
      model the channel graph must trace), run before the run folder is written, so a bad input
      leaves nothing half-written.
    - `checks(recipe)`: settings valid alone but not together, refused (RecipeError) when the
      recipe is validated, before anything runs.

    Returns the function unchanged."""
    sections = dict(sections or {})

    def add(fn):
        taken = [s for s, model in sections.items() if SECTIONS.find(s) not in (None, model)]
        if taken:   # checked first, so a refused method leaves nothing registered
            raise ValueError(f"recipe section {taken[0]!r} is registered twice (by another method, with another model)")
        METHODS.register(name, Method(name, fn, sections, preflight, checks))
        for section, model in sections.items():
            SECTIONS.register(section, model)
        return fn
    return add


def unregister_method(name: str) -> None:
    """Remove a method (a test's own) and the sections no remaining method reads."""
    method = METHODS.find(name)
    METHODS.unregister(name)
    still_read = sections_used(list_methods())
    for section in method.sections if method else ():
        if section not in still_read:
            SECTIONS.unregister(section)


get_method = METHODS.get
list_methods = METHODS.names


def sections_used(methods) -> dict[str, list[str]]:
    """{section: the methods among `methods` that read it} (names not registered read none)."""
    used: dict[str, list[str]] = {}
    for m in methods:
        method = METHODS.find(m) if isinstance(m, str) else None
        for section in method.sections if method else ():
            used.setdefault(section, []).append(m)
    return used


def preflight(ctx: RunContext, methods) -> None:
    """Each method's preflight (`methods`: Method records, in the recipe's order)."""
    for method in methods:
        if method.preflight is not None:
            method.preflight(ctx)


def check_recipe(recipe) -> None:
    """The recipe-level checks of the recipe's methods, each once (mutual and independent share
    theirs), in the recipe's order."""
    for check in dict.fromkeys(get_method(m).checks for m in recipe.methods):
        if check is not None:
            check(recipe)


def best_val(best: dict, name: str) -> float | None:
    """A net's best validation top-1 from `train_stage`'s result; None when the stage trained no
    epoch or had no validation split (`ctx.record` then measures it)."""
    v = best[name]["val_top1"]
    return v if v is not None and v >= 0 else None


def traced_graph(ctx: RunContext, method: str, what: str = "the model"):
    """The recipe's model, built and traced by the channel graph; a model it cannot trace is
    one line naming the method and the model (preflight of the methods that prune)."""
    from ..prune import ChannelGraph
    from ..errors import TandemError
    if ctx.recipe.model.checkpoint:
        model = ctx.checkpoint_model()
    else:
        model = (ctx.user_model or ctx.create_model()).to(ctx.device)
    try:
        return ChannelGraph(model, torch.zeros(1, *ctx.input_size, device=ctx.device))
    except TandemError as exc:
        raise TandemError(f"{method}: {what} {ctx.recipe.model.name!r}: {exc}") from None


def channel_pruning_preflight(method: str):
    """The preflight of a method that prunes with the `prune:` section: unless it prunes single
    weights (an unstructured criterion: magnitude), the model must trace, before the run folder
    is written."""
    def check(ctx: RunContext) -> None:
        from ..prune import criterion_class
        if ctx.recipe.prune is not None and criterion_class(ctx.recipe.prune.criterion).structured:
            traced_graph(ctx, method)
    return check


from . import baseline  # noqa: E402,F401  (registers)
from . import pqkd  # noqa: E402,F401  (registers)
from . import prune  # noqa: E402,F401  (registers)
from . import quantize  # noqa: E402,F401  (registers)
from . import mutual  # noqa: E402,F401  (registers mutual and independent)
from . import pdd  # noqa: E402,F401  (registers)
from . import picpq  # noqa: E402,F401  (registers)
from . import sbs  # noqa: E402,F401  (registers)
