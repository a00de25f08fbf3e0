"""TIR kernels' parallel loops on PyTorch's OpenMP pool instead of TVM's own.

A compiled model alternates kernels dispatched to PyTorch (oneDNN, on PyTorch's OpenMP threads)
and TIR kernels (parallel loops run by `TVMBackendParallelLaunch`, by default on TVM's thread
pool). Two pools on the same cores fight: after each PyTorch kernel its OpenMP workers spin
waiting for the next parallel region and hold the cores TVM's workers then need. Measured on a
2-core AMD EPYC, ResNet-50 at 2 threads: its 1x1-conv TIR kernels took 39.5 ms in all, as at one
thread, and the model 67-77 ms; with the loops on PyTorch's OpenMP pool the kernels take 22 ms and
the model 48.5 ms (88.5 at one thread). Making OpenMP sleep at once (OMP_WAIT_POLICY=PASSIVE)
costs PyTorch itself: eager MobileNetV2 went from 13-18 to 27-31 ms.

TVM looks the launcher up through a context symbol that every module it loads afterwards takes
(`TVMFFIEnvModRegisterContextSymbol`); this module compiles a launcher and barrier that run the
loop's tasks in an `omp parallel` region (C, with the compiler TVM itself links libraries with),
linked against the libgomp PyTorch has loaded, and registers them once, when the TVM backend is
first imported. So every TVM module loaded in the process from then on runs its parallel loops
on PyTorch's pool, with the thread count PyTorch's `set_num_threads` gives the calling thread
(`threads.running_with` sets it per call). Where that cannot be done (no C compiler, PyTorch not
on GNU OpenMP) TVM's pool stays, with one warning.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import tvm  # noqa: F401  (registers TVM's own launcher first: a later registration wins)
from tvm_ffi.libinfo import find_libtvm_ffi

from sparsefx.cache import cache_dir
from sparsefx.log import get_logger

LOG = get_logger("tvm")

SOURCE = r"""
#include <omp.h>
#include <stdint.h>
typedef struct { void* sync_handle; int32_t num_task; } TVMParallelGroupEnv;
typedef int (*FTVMParallelLambda)(int task_id, TVMParallelGroupEnv* penv, void* cdata);

int sparsefx_parallel_launch(FTVMParallelLambda flambda, void* cdata, int num_task) {
  int wanted = num_task > 0 ? num_task : omp_get_max_threads();
  int failed = 0;
  if (wanted <= 1) {
    TVMParallelGroupEnv env = {0, 1};
    return flambda(0, &env, cdata) != 0 ? -1 : 0;
  }
#pragma omp parallel num_threads(wanted)
  {
    TVMParallelGroupEnv env = {0, omp_get_num_threads()};
    if (flambda(omp_get_thread_num(), &env, cdata) != 0) {
#pragma omp atomic write
      failed = 1;
    }
  }
  return failed ? -1 : 0;
}

int sparsefx_parallel_barrier(int task_id, TVMParallelGroupEnv* penv) {
#pragma omp barrier
  return 0;
}
"""
SYMBOLS = {"__TVMBackendParallelLaunch": "sparsefx_parallel_launch",
           "__TVMBackendParallelBarrier": "sparsefx_parallel_barrier"}


def loaded_openmp() -> list[str]:
    """Paths of the OpenMP runtimes mapped into this process (Linux; empty elsewhere)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    names = ("libgomp", "libiomp", "libomp")
    return sorted({line.split()[-1] for line in maps.splitlines() if any(n in line.rsplit("/", 1)[-1] for n in names)})


def build_launcher() -> Path:
    """The launcher library, compiled once per source and kept in the cache (re-built if unreadable)."""
    digest = hashlib.sha256(SOURCE.encode()).hexdigest()[:16]
    path = cache_dir() / "parallel" / f"launch-{digest}.so"
    if path.is_file() and path.stat().st_size > 0:
        return path
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc or gcc) on PATH")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        source, built = Path(tmp) / "launch.c", Path(tmp) / "launch.so"
        source.write_text(SOURCE)
        result = subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-fopenmp", str(source), "-o", str(built)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise OSError(f"{compiler} failed: {result.stderr.strip()[:200]}")
        os.replace(built, path)  # whole or not at all: another process may be loading it
    return path


def load_launcher() -> ctypes.CDLL:
    """The launcher library loaded; a cached one that does not load is built again, once."""
    path = build_launcher()
    try:
        return ctypes.CDLL(str(path))
    except OSError:
        path.unlink(missing_ok=True)
        return ctypes.CDLL(str(build_launcher()))


def share_openmp_pool() -> bool:
    """Whether TIR kernels' parallel loops run on PyTorch's OpenMP pool (registered on first call)."""
    return openmp_launcher() is not None


@functools.cache
def openmp_launcher() -> ctypes.CDLL | None:
    """The launcher, registered for every TVM module loaded from now on; None (TVM's pool stays)
    where it cannot be built or would bring a second OpenMP runtime into the process."""
    before = loaded_openmp()
    if not any("libgomp" in path for path in before):
        LOG.warning("PyTorch runs on no GNU OpenMP here: TIR kernels keep TVM's thread pool, which competes "
                    "with PyTorch's for the cores (multi-threaded compiled models scale less)")
        return None
    try:
        library = load_launcher()
    except OSError as error:
        LOG.warning(f"TIR kernels keep TVM's thread pool, which competes with PyTorch's for the cores "
                    f"(could not build the OpenMP launcher: {error}); install a C compiler to share one pool")
        return None
    if loaded_openmp() != before:  # the launcher bound to another libgomp: two pools again, so do not use it
        LOG.warning("the OpenMP launcher loaded a second OpenMP runtime; TIR kernels keep TVM's thread pool")
        return None
    register = ctypes.CDLL(find_libtvm_ffi()).TVMFFIEnvModRegisterContextSymbol
    register.argtypes, register.restype = [ctypes.c_char_p, ctypes.c_void_p], ctypes.c_int
    for context, symbol in SYMBOLS.items():
        if register(context.encode(), ctypes.cast(getattr(library, symbol), ctypes.c_void_p)) != 0:
            raise RuntimeError(f"TVM refused the context symbol {context}")
    return library
