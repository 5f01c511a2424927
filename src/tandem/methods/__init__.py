"""Methods: each a short composition of the primitives, registered by name, and the recipe
sections they own (a method registers its section's pydantic model; recipes.py has no list of
them)."""
from __future__ import annotations

import torch

from ..registry import Registry

METHODS = Registry("method")
SECTIONS = Registry("recipe section")   # name -> pydantic model of `name:` in a recipe

register_method = METHODS.register
get_method = METHODS.get
list_methods = METHODS.names


def preflight(ctx, methods) -> None:
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


def traced_graph(ctx, method: str, what: str = "the model"):
    """The recipe's model, built and traced by the channel graph; a model it cannot trace is
    one line naming the method and the model (preflight of the methods that prune)."""
    from ..prune import ChannelGraph
    from ..errors import TandemError
    model = ctx.create_model().to(ctx.device)
    try:
        return ChannelGraph(model, torch.zeros(1, *ctx.input_size, device=ctx.device))
    except TandemError as exc:
        raise TandemError(f"{method}: {what} {ctx.recipe.model.name!r}: {exc}") from None


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
