"""Parse TVMScript without TVM's per-frame source lookups, and parse a kernel once per machine.

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
import hashlib
import importlib
import inspect
import linecache
import logging
import threading
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import tvm
from tvm_ffi.serialization import from_json_graph_str, to_json_graph_str

from sparsefx.cache import Table, cache_dir

T = TypeVar("T")
log = logging.getLogger("sparsefx.cache")
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
    same kernels again (a frozen, hashable spec). The parsed function is kept on disk as well
    (`cache_dir()/tvmscript`, TVM's JSON, re-parsed when the backend's source or TVM changes, or the
    file is damaged): parsing a conv kernel takes 40-60 ms, loading it 7 ms, and a warm compile of
    ResNet-50 at 2 threads parsed 43 of them (2.7 s of the 4.4 s it took)."""
    key = hashlib.sha1(f"{build.__module__}.{build.__qualname__}|{spec!r}".encode()).hexdigest()[:32]
    table = Table(cache_dir() / "tvmscript" / f"{key}.json", backend_source_version(), stale_is_routine=True)
    if isinstance(table.entries.get("func"), str):
        try:
            return from_json_graph_str(table.entries["func"])  # written by this TVM: no upgrade pass
        except Exception as error:  # noqa: BLE001 (any damage: parse again)
            log.warning("cached kernel %s cannot be loaded (%s): parsing it again", table.path, error)
    func = parse(build, spec)
    table.entries["func"] = to_json_graph_str(func)
    table.save()
    return func


@functools.cache
def backend_source_version() -> str:
    """A hash of TVM's version and every source file of this backend: parsed kernels from other
    sources are parsed again."""
    digest = hashlib.sha1(tvm.__version__.encode())
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
