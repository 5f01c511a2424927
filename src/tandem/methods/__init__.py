"""Methods: each a short composition of the primitives, registered by name, and the recipe
sections they own (a method registers its section's pydantic model; recipes.py has no list of
them)."""
from __future__ import annotations

import torch

from ..context import RunContext
from ..registry import Registry

METHODS = Registry("method")
SECTIONS = Registry("recipe section")   # name -> pydantic model of `name:` in a recipe

SECTIONS_USED: dict[str, tuple[str, ...]] = {}   # method -> the recipe sections it reads

get_method = METHODS.get
list_methods = METHODS.names


def register_method(name: str, sections: tuple[str, ...] = ()):
    """Register `method(ctx)` under `name`; `sections`: the recipe sections it reads (a recipe
    records them with their defaults, and refuses a section none of its methods reads)."""
    SECTIONS_USED[name] = tuple(sections)
    return METHODS.register(name)


def sections_used(methods) -> dict[str, list[str]]:
    """{section: the methods among `methods` that read it}."""
    used: dict[str, list[str]] = {}
    for m in methods:
        for section in SECTIONS_USED.get(m, ()):
            used.setdefault(section, []).append(m)
    return used


def preflight(ctx: RunContext, methods) -> None:
    """Each method's `preflight(ctx)` (an attribute of the method function, optional): checks
    that need the data or files (a teacher file's class count, a model the channel graph must
    trace), run before the run folder is written, so a bad input leaves nothing half-written."""
    for method in methods:
        check = getattr(method, "preflight", None)
        if check is not None:
            check(ctx)


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


def register_section(name: str, spec) -> None:
    """`name:` in a recipe is validated by `spec` (absent: None)."""
    SECTIONS.register(name, spec)


from . import baseline  # noqa: E402,F401  (registers)
from . import pqkd  # noqa: E402,F401  (registers)
from . import prune  # noqa: E402,F401  (registers)
from . import quantize  # noqa: E402,F401  (registers)
from . import mutual  # noqa: E402,F401  (registers mutual and independent)
from . import pdd  # noqa: E402,F401  (registers)
from . import picpq  # noqa: E402,F401  (registers)
from . import sbs  # noqa: E402,F401  (registers)
