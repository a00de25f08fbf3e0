"""The `sparsefx` command line (`cli.main`); a `plan` or `compile` command answered by what the same
command kept runs without importing PyTorch (`cli.recipe`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from sparsefx.cli import recipe


def console(argv: Sequence[str] | None = None) -> int:
    """The `sparsefx` console script (named apart from the `main` module it falls back to)."""
    words = list(sys.argv[1:] if argv is None else argv)
    answered = recipe.answer(words)
    if answered is not None:
        return answered
    from sparsefx.cli.main import main as run

    return run(words)
