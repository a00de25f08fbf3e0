"""TIR kernels' parallel loops on PyTorch's OpenMP pool: one pool for both kinds of kernel."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import tvm
from tvm.script import tirx as T

from sparsefx.backends.tvm import parallel
from sparsefx.backends.tvm.threads import running_with

pytestmark = pytest.mark.skipif(not parallel.share_openmp_pool(), reason="PyTorch's OpenMP pool cannot be shared here")
N = 1 << 16


@T.prim_func
def task_ids(out: T.Buffer((N,), "int32")):  # noqa: ANN201
    for i in T.parallel(N):
        out[i] = i * 3 + 1


def test_modules_take_the_openmp_launcher_and_compute_the_same(tmp_path) -> None:
    library = tvm.compile(tvm.IRModule({"main": task_ids.with_attr("global_symbol", "main")}), target="llvm")
    path = tmp_path / "kernel.so"
    library.export_library(str(path))
    loaded = tvm.runtime.load_module(str(path))
    launcher = ctypes.cast(parallel.openmp_launcher().sparsefx_parallel_launch, ctypes.c_void_p).value
    assert ctypes.c_void_p.in_dll(ctypes.CDLL(str(path)), "__TVMBackendParallelLaunch").value == launcher
    for threads in (1, 2):
        out = tvm.runtime.tensor(np.zeros(N, "int32"))
        with running_with(threads):
            loaded["main"](out)
        assert np.array_equal(out.numpy(), np.arange(N, dtype="int32") * 3 + 1)


def test_one_openmp_runtime_in_the_process() -> None:
    assert len(parallel.loaded_openmp()) == 1


def test_a_corrupt_cached_launcher_is_built_again(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SPARSEFX_CACHE", str(tmp_path))
    path = parallel.build_launcher()
    path.write_bytes(b"not a shared library")
    library = parallel.load_launcher()
    assert hasattr(library, "sparsefx_parallel_launch") and path.stat().st_size > 1000
