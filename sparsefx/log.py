"""Status lines go to the `sparsefx` logger (children: `sparsefx.cli`, `sparsefx.tvm`, ...).

Importing sparsefx adds a NullHandler to its own logger and touches no other: a library
says nothing unless the application configures logging. The command line does, through
`to_stderr`. Progress bars (tqdm) are not log lines and stay as they are.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

ROOT = "sparsefx"
logging.getLogger(ROOT).addHandler(logging.NullHandler())


def get_logger(name: str = "") -> logging.Logger:
    """The package logger, or its child `sparsefx.<name>`."""
    return logging.getLogger(f"{ROOT}.{name}" if name else ROOT)


@contextlib.contextmanager
def to_stderr(level: int = logging.INFO) -> Iterator[logging.Handler]:
    """Print sparsefx's records at `level` and above to stderr as '[sparsefx] message' while the
    block runs (stderr so that stdout stays a clean report); the logger is restored after."""
    logger = get_logger()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[sparsefx] %(message)s"))
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False  # an application's root handler would print every line twice
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


@contextlib.contextmanager
def quiet(*names: str, level: int = logging.ERROR) -> Iterator[None]:
    """Raise other libraries' loggers to `level` for the block only, then restore their levels
    (a warning that is not actionable from sparsefx, without silencing it for the user's process)."""
    loggers = [logging.getLogger(name) for name in names]
    saved = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, old in zip(loggers, saved):
            logger.setLevel(old)
