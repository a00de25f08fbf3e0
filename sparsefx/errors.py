"""User-facing errors: one line that names the problem and the fix."""


def one_line(error: BaseException) -> str:
    """An exception as 'Type: first line of its message' (at most 300 characters)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


class SparsefxError(ValueError):
    """Base of every error sparsefx raises for bad input."""


class TraceError(SparsefxError):
    """The model could not be captured as a graph."""


class PruneError(SparsefxError):
    """A pruning request that cannot be carried out."""
