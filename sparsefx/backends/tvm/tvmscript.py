"""Parse TVMScript without TVM's per-frame source lookups.

TVMScript's `T.prim_func` calls `inspect.stack()` and every `T.macro` call `inspect.getouterframes`;
TVM uses only each frame's locals and globals and, for one frame, its source line. `inspect` also
finds each frame's module, scanning `sys.modules` (thousands of entries once torch and TVM are
loaded) for every frame, and the parser recurses deeply. Measured on a 2-core machine with torch, TVM
and sparsefx loaded: importing `tvm.s_tir.tensor_intrin.cuda` (DLight's fp16 tensor-core rule
imports it) 323 s without this and 4 s with it; one of sparsefx's conv kernels took 0.43 s to parse
~70 frames deep in a planning run, 85% of it in `inspect`.

`cheap_frames()` gives TVM's parser modules, for the duration, an `inspect` whose `stack` and
`getouterframes` build the same FrameInfo records from the frames alone (source lines from
`linecache`). Nested and concurrent uses share one installation (counted under a lock), so
the modules get their own `inspect` back when the last one leaves.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import linecache
import threading
import types
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")
# the modules of TVM 0.27 that call inspect.stack / inspect.getouterframes while parsing
PARSER_MODULES = ("tvm.script.parser.core.parser", "tvm.script.parser.ir.entry", "tvm.tirx.script.parser.entry",
                  "tvm.tirx.script.builder.ir", "tvm.relax.script.parser.entry")
_lock = threading.Lock()
_users = 0


def frame_infos(frame: types.FrameType | None) -> list[inspect.FrameInfo]:
    """What `inspect.getouterframes(frame)` returns, without looking up each frame's module."""
    infos = []
    while frame is not None:
        filename, lineno = frame.f_code.co_filename, frame.f_lineno
        line = linecache.getline(filename, lineno, frame.f_globals)
        infos.append(inspect.FrameInfo(frame, filename, lineno, frame.f_code.co_name, [line] if line else None,
                                       0 if line else None))
        frame = frame.f_back
    return infos


class CheapFramesInspect(types.SimpleNamespace):
    """`inspect` for TVM's parser: the two stack walks replaced, everything else the real module's."""

    def __getattr__(self, name: str) -> object:
        return getattr(inspect, name)

    @staticmethod
    def getouterframes(frame: types.FrameType, context: int = 1) -> list[inspect.FrameInfo]:  # noqa: ARG004
        return frame_infos(frame)

    @staticmethod
    def stack(context: int = 1) -> list[inspect.FrameInfo]:  # noqa: ARG004
        return frame_infos(inspect.currentframe().f_back)


@contextlib.contextmanager
def cheap_frames() -> Iterator[None]:
    """TVM's TVMScript parser walks the stack cheaply inside this block (see the module docstring)."""
    global _users
    with _lock:
        if _users == 0:
            for name in PARSER_MODULES:
                with contextlib.suppress(ImportError):
                    importlib.import_module(name).inspect = CheapFramesInspect()
        _users += 1
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                for name in PARSER_MODULES:
                    with contextlib.suppress(ImportError):
                        importlib.import_module(name).inspect = inspect


def parse(build: Callable[..., T], *args: object) -> T:
    """`build(*args)`, a function that parses TVMScript, run under `cheap_frames`."""
    with cheap_frames():
        return build(*args)


@functools.lru_cache(maxsize=4096)
def parsed(build: Callable[[object], T], spec: object) -> T:
    """`build(spec)` parsed once per (builder, spec): the cost model and the compiler ask for the
    same kernels again (a frozen, hashable spec)."""
    return parse(build, spec)
