"""sparsefx's own kernels built for timing in forked worker processes, their shares in parallel.

Making one kernel is TVMScript parsing (pure Python), an LLVM build and code generation: 70-100
ms on a 2-core AMD EPYC, and planning ResNet-50 on a fresh cache makes ~450 of them. In one
process none of it overlaps (code generation holds the GIL: two threads looked kernels up no
faster than one). Workers forked from this process, with TVM and the kernel modules already
imported, each build their share into a shared library as a compiled model is saved
(`export_library`: the system C compiler links it), and this process loads them. The caller
waits for every worker before it times anything, so no build runs beside a timing; between
batches the workers wait, idle, for the next (one pool per process: a cold plan of ResNet-50
builds ~50 batches, and forking a process with torch and TVM loaded for each cost ~0.1 s a batch).
Where forking is unavailable, or a worker fails, the kernels are built here.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import tvm

from sparsefx.backends.tvm.build_config import build_context
from sparsefx.backends.tvm.kernels.registry import kernel_module
from sparsefx.errors import one_line
from sparsefx.log import get_logger

LOG = get_logger("tvm")
PER_WORKER = 1  # fewer kernels than this per worker are built here (3 blocked convs: 0.65 s in two workers, 0.94 in one)
# a dense conv over a k x k window (k > 1) took 2-4x as long to make as a 1x1 one (blocked, ResNet-50's
# shapes, 2-core AMD EPYC: 3x3 0.45-1.1 s, 1x1 0.14-0.41 s; depthwise ones as cheap as 1x1): dealt
# round-robin in model order, a bottleneck's 3x3s all went to one worker (a cold plan's first batch of
# 24 kernels: 6.9 s in one worker, 3.6 in the other; 15 of a cold plan's 61 s of building idled so)
WINDOW_WEIGHT = 3
_pools: dict[tuple[int, int], ProcessPoolExecutor] = {}  # (pid, workers) -> a pool: a forked child makes its own


def build_kernels(pairs: list[tuple[str, object]], target: tvm.target.Target) -> dict[str, Callable[..., object]]:
    """{spec name: the built kernel} for these (kind, spec) pairs, built by as many workers as
    this process may run on (see the module doc)."""
    unique = list({spec.name: (kind, spec) for kind, spec in pairs}.values())
    workers = min(usable_cores(), len(unique) // PER_WORKER)
    if workers >= 2 and "fork" in multiprocessing.get_all_start_methods():
        try:
            return build_in_workers(unique, target, workers)
        except Exception as error:  # noqa: BLE001 - any worker failure: build here, as without workers
            broken = _pools.pop((os.getpid(), workers), None)  # made afresh next time
            if broken is not None:
                broken.shutdown(cancel_futures=True)
            LOG.warning("building kernels in worker processes failed (%s); building them here", one_line(error))
    with build_context(target):
        library = tvm.compile(kernel_module(unique), target)
    return {spec.name: library[spec.name] for _, spec in unique}


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def build_in_workers(pairs: list[tuple[str, object]], target: tvm.target.Target,
                workers: int) -> dict[str, Callable[..., object]]:
    shares = dealt(pairs, workers)
    with tempfile.TemporaryDirectory(prefix="sfx-kernels-") as tmp:
        paths = [str(Path(tmp) / f"share{i}.so") for i in range(workers)]
        list(pool(workers).map(build_share, shares, [target.export()] * workers, paths))
        kernels = {}
        for share, path in zip(shares, paths, strict=True):
            library = tvm.runtime.load_module(path)  # loaded: the file may go
            kernels.update({spec.name: library[spec.name] for _, spec in share})
    return kernels


def dealt(pairs: list[tuple[str, object]], workers: int) -> list[list[tuple[str, object]]]:
    """`pairs` in `workers` shares of about equal build time: heaviest first, each to the lightest
    share so far (weights: `build_weight`)."""
    shares: list[list[tuple[str, object]]] = [[] for _ in range(workers)]
    loads = [0] * workers
    for pair in sorted(pairs, key=lambda pair: -build_weight(pair[1])):
        lightest = loads.index(min(loads))
        shares[lightest].append(pair)
        loads[lightest] += build_weight(pair[1])
    return shares


def build_weight(spec: object) -> int:
    """A kernel's build time, relative: `WINDOW_WEIGHT` for a dense conv over a window, else 1."""
    depthwise = hasattr(spec, "channels")
    return WINDOW_WEIGHT if getattr(spec, "kernel", 1) > 1 and not depthwise else 1


def pool(workers: int) -> ProcessPoolExecutor:
    """This process's pool of `workers` forked workers, made on first use (see the module doc);
    Python's exit handler stops them with the process."""
    key = (os.getpid(), workers)
    if key not in _pools:
        _pools[key] = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
    return _pools[key]


def build_share(pairs: list[tuple[str, object]], target: dict, path: str) -> str:
    target = tvm.target.Target(target)
    with build_context(target):
        tvm.compile(kernel_module(pairs), target).export_library(path)
    return path
