"""User-facing errors: one line that names the problem and the fix."""


class SparsefxError(ValueError):
    """Base of every error sparsefx raises for bad input."""


class TraceError(SparsefxError):
    """The model could not be captured as a graph."""


class PruneError(SparsefxError):
    """A pruning request that cannot be carried out."""
