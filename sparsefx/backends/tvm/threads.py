"""The cores a compiled model runs on: PyTorch's intra-op pool and TVM's pool set alike, per call.

A compiled model runs TIR kernels and dispatched convolutions/matmuls one after the other in the
calling thread; the TIR kernels' parallel loops run on PyTorch's OpenMP pool (`parallel`), so
PyTorch's thread count, set to the model's while it runs and put back as it was after, is all
there is to set: using sparsefx changes no PyTorch setting the caller sees.

Where that pool cannot be shared, TIR kernels run on TVM's own pool (its count stays at the last
model's: see `running_with`). TVM sizes its
pool once per calling thread, when first used, from TVM_NUM_THREADS, and without it from half the
logical cores on x86 (it assumes hyper-threading); on a 2-core machine that pool had one worker,
TIR kernels ran on one core whatever PyTorch was given, and starting it pinned the calling thread,
and so the PyTorch threads it starts later, to core 0. So the first run in a thread starts that
pool with a worker per core (TVM_NUM_THREADS set just for that moment, unless the user set it),
and each call picks how many workers it uses with `runtime.config_threadpool` in the mode whose
workers share every allowed core (no pinning, given the cores explicitly so TVM's core count is
not consulted again; about 4 us, and only when the count changes).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Iterator

import torch
import tvm

from sparsefx.backends.tvm.parallel import share_openmp_pool
from sparsefx.log import get_logger

SHARE_ALL_CORES = -3  # TVM's affinity mode: every worker may run on any of the cores given
ALLOWED_CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
LOG = get_logger("tvm")
_started = threading.local()  # per thread: its TVM pool sized here (done), short of workers (warned)


@functools.cache
def runtime_function(name: str) -> object:
    return tvm.get_global_func(name)  # looked up once: every call of a compiled model asks


def pool_workers() -> int:
    """Workers TVM's pool of the calling thread uses now (starts the pool, one per core, if new)."""
    if not getattr(_started, "done", False):
        _started.done = True
        with _environment("TVM_NUM_THREADS", str(len(ALLOWED_CPUS))):
            return int(runtime_function("runtime.NumThreads")())
    return int(runtime_function("runtime.NumThreads")())


def tir_threads() -> int:
    """Threads a TIR kernel's parallel loop gets when run now from the calling thread."""
    return torch.get_num_threads() if share_openmp_pool() else pool_workers()


def set_pool_workers(threads: int) -> None:
    runtime_function("runtime.config_threadpool")(SHARE_ALL_CORES, threads, [str(c) for c in ALLOWED_CPUS])


@contextlib.contextmanager
def running_with(threads: int) -> Iterator[None]:
    """PyTorch's intra-op threads at `threads` inside and as they were after; TVM's pool of this
    thread at `threads` from then on. TVM's pool is not put back: only TVM kernels use it, every
    sparsefx call sets it again, and putting it back took two `config_threadpool` calls (~8 us of
    the ~19 us a one-kernel model's call took here)."""
    torch_before = torch.get_num_threads()
    if torch_before != threads:
        torch.set_num_threads(threads)  # TIR kernels' parallel loops take it too, on PyTorch's pool (`parallel`)
    if not share_openmp_pool() and pool_workers() != threads:
        set_pool_workers(threads)
        if pool_workers() < threads and not getattr(_started, "warned", False):
            _started.warned = True
            LOG.warning(f"TVM's thread pool in this thread was started with {pool_workers()} worker(s) before "
                        f"sparsefx ran, fewer than threads={threads}; set TVM_NUM_THREADS={threads} before TVM first runs")
    try:
        yield
    finally:
        if torch.get_num_threads() != torch_before:
            torch.set_num_threads(torch_before)


@contextlib.contextmanager
def _environment(name: str, value: str) -> Iterator[None]:
    """`name` set to `value` inside unless already set; the environment as it was after."""
    if name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        del os.environ[name]
