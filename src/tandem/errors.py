"""User-facing errors: the CLI prints them as one line and exits with status 2."""


class TandemError(Exception):
    """A mistake in what the user asked for (a recipe, a path, a name), not a bug."""


class RecipeError(TandemError):
    """A recipe key or value that is not allowed."""


class DataError(TandemError):
    """A dataset file that is missing, corrupt or of the wrong format."""


class CheckpointError(TandemError):
    """A checkpoint that is missing, corrupt or of another architecture."""
