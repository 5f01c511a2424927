"""tandem: compress CNNs by pruning, quantizing and distilling them together."""
from .errors import CheckpointError, DataError, RecipeError, TandemError
from .models import create_model, list_models
from .quant import quantize_  # also registers the "quantize" model-file transform for load_model
from . import prune  # noqa: E402  a callable package: tandem.prune(model, example_input, ...)
from .api import Compressed, compress

__version__ = "0.1.0"


def run(recipe=None, out=None, resume: bool = False, **overrides):
    """Run a recipe (a path, a Recipe, or None for the default job); `train__epochs=5`-style
    keyword overrides use `__` for the dots of the command line's `train.epochs=5`."""
    from .recipes import Recipe, load_recipe
    from .runner import run as _run

    items = [f"{k.replace('__', '.')}={v}" for k, v in overrides.items()]
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, items)
    elif items:
        raise TypeError("pass overrides with a recipe path, or edit the Recipe object")
    return _run(recipe, out, resume=resume)


__all__ = ["compress", "Compressed", "create_model", "list_models", "run", "quantize_", "prune", "TandemError", "RecipeError", "DataError", "CheckpointError"]
