"""Parse TVMScript on a short stack.

TVMScript's `T.prim_func` calls `inspect.stack()` and every `T.macro` call `inspect.getouterframes`,
both of which read the source line of every frame above them. Deep inside a planning run (CLI ->
planner -> cost model -> timer -> kernel) that is ~70 frames, and parsing one of sparsefx's conv
kernels took 0.43 s, 85% of it in `inspect`: 184 of the 282 s a small `sparsefx optimize` took.
Parsed in a worker thread the stack is a handful of frames deep and the parse itself is what is
left. The kernels' builders close over their spec (no outer-frame names), so nothing they resolve
is lost by the move.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None  # started on first use: importing sparsefx starts no thread


def on_short_stack(build: Callable[..., T], *args: object) -> T:
    """`build(*args)` run in sparsefx's TVMScript thread (one, so parses stay sequential), its result."""
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sparsefx-tvmscript")
    return _executor.submit(build, *args).result()


@functools.lru_cache(maxsize=4096)
def parsed(build: Callable[[object], T], spec: object) -> T:
    """`build(spec)` parsed once per (builder, spec): the cost model and the compiler ask for the
    same kernels again (a frozen, hashable spec)."""
    return on_short_stack(build, spec)
