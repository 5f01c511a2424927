"""User-facing errors: the CLI prints them as one line and exits with status 2."""


class TandemError(Exception):
    """A mistake in what the user asked for (a recipe, a path, a name), not a bug."""


class RecipeError(TandemError):
    """A recipe key or value that is not allowed."""


class DataError(TandemError):
    """A dataset file that is missing, corrupt or of the wrong format."""


class CheckpointError(TandemError):
    """A checkpoint that is missing, corrupt or of another architecture."""


def one_of(value: str, allowed, what: str) -> str:
    """`value` if it is among `allowed`, else a ValueError naming them (recipe validators use it,
    and pydantic turns it into the one-line recipe error)."""
    allowed = list(allowed)
    if value not in allowed:
        raise ValueError(f"unknown {what}; allowed: {', '.join(allowed)}")
    return value
