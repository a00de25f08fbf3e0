"""TVM backend: Relax import, measured kernel dispatch, default schedules, MetaSchedule tuning."""

import os

# Compiled models run most convolutions on PyTorch's OpenMP pool. TVM's pool workers spin after
# each TIR kernel and take the same cores from it: ResNet-18 at 2 threads went from 10.3 to 19.8
# ms once a second compiled model had run in the process. Workers that sleep at once (read when
# TVM's pool starts) cost nothing measurable there. A user's own setting wins.
os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")

from sparsefx.backends.tvm.compiler import CompiledModel, compile, load
from sparsefx.backends.tvm.parallel import share_openmp_pool
from sparsefx.backends.tvm.threads import pool_workers

# TIR kernels' parallel loops run on PyTorch's OpenMP pool, registered before any module loads.
share_openmp_pool()
# TVM's own pool (all of them where that pool cannot be shared, TVM's internal parallel work
# otherwise) starts now in the importing thread, a worker per core: left to TVM, its first use
# starts it with half the cores on x86 and pins this thread, and the PyTorch threads it starts
# later, to those cores (core 0 of 2 here). Workers sleep till used.
pool_workers()

__all__ = ["CompiledModel", "compile", "load"]
