"""Measured latency of the sparse kernels, for the cost model.

    measure_sparse_latency(spec: Sparsity, rows: int, cols: int, batch: int, target="cpu") -> float
        Milliseconds (best of several runs, timed as dense kernels are) of the TIR kernel computing a Linear layer's
        out (batch, rows) = x (batch, cols) @ Wᵀ + bias for a weight W with `spec`'s pattern
        and density; a 1×1 conv is the same kernel with batch = images × h × w.
    measure_sparse_latencies(queries: list[tuple[Sparsity, int, int, int]], target="cpu") -> list[float]
        The same for many layers at once: every kernel not yet measured goes into one module
        (one LLVM build), so a planner pays one build for all its candidates.

"block" runs BSR with the spec's block, "unstructured" CSR (BSR 1×1), "nm" N:M with
N = round(density · m). Timings are cached per host CPU in
`sparsefx.cache.cache_dir() / "sparse" / f"{arch}-{cores}.json"`, keyed by format, block,
density, shape and batch. Only the host CPU can be timed (CUDA targets raise).
"""

from __future__ import annotations

import functools

import numpy as np
import tvm

from sparsefx.backends.tvm.sparse.kernels import KernelSpec, build, transposed_operands
from sparsefx.cache import Table, cache_dir
from sparsefx.cost import timing
from sparsefx.errors import SparsefxError
from sparsefx.sparse.masks import Sparsity
from sparsefx.target import Target, resolve_target

TABLE_VERSION = 4  # bumped when how a kernel is timed changes: older tables are re-measured (v3: a copy per round, `cold_traffic`; v4: parallel loops on PyTorch's OpenMP pool)
REPEAT = 5  # timed repeats (the best counts: on a shared CPU the minimum is what the kernel can do)


def kernel_spec(spec: Sparsity, rows: int, cols: int, batch: int) -> KernelSpec:
    """The Linear-layer kernel the TVM backend emits for a weight with `spec`."""
    if not isinstance(spec, Sparsity):
        raise SparsefxError(f"spec must be a sparsefx.Sparsity, got {type(spec).__name__}")
    for name, value in (("rows", rows), ("cols", cols), ("batch", batch)):
        if not isinstance(value, int) or value < 1:
            raise SparsefxError(f"{name} must be a positive integer, got {value!r}")
    if spec.pattern == "nm":
        n = round(spec.density * spec.m)
        if n >= spec.m or cols % spec.m:
            raise SparsefxError(f"N:M needs N < M and M dividing cols: density {spec.density} with M={spec.m} "
                                f"keeps {n}, cols={cols}")
        return KernelSpec("nm", rows, cols, (n, spec.m), cols * n // spec.m, 1, batch, batch > 1)
    br, bc = spec.block if spec.pattern == "block" else (1, 1)
    if rows % br or cols % bc:
        raise SparsefxError(f"block {br}x{bc} does not divide the {rows}x{cols} weight; choose a block whose "
                            "sides divide both")
    blocks = rows // br * (cols // bc)
    return KernelSpec("bsr", rows, cols, (br, bc), max(1, round(spec.density * blocks)), 1, batch, batch > 1)


def random_operands(spec: KernelSpec, seed: int = 0) -> list[np.ndarray]:
    """Kernel arguments for `spec` (input, format arrays, bias), nonzeros spread at random."""
    rng = np.random.default_rng(seed)
    d = rng.standard_normal((spec.batch, spec.cols, spec.width), dtype=np.float32)
    bias = rng.standard_normal(spec.rows, dtype=np.float32)
    if spec.fmt == "nm":
        (n, m), groups = spec.block, spec.cols // spec.block[1]
        positions = np.sort(rng.random((spec.rows, groups, m)).argsort(axis=2)[:, :, :n], axis=2)
        values = rng.standard_normal((spec.rows, spec.nnz), dtype=np.float32)
        indices = positions.reshape(spec.rows, -1).astype(np.int8)
        if transposed_operands(spec):
            values, indices = np.ascontiguousarray(values.T), np.ascontiguousarray(indices.T)
        return [d, values, indices, bias]
    (br, bc), block_rows, block_cols = spec.block, spec.rows // spec.block[0], spec.cols // spec.block[1]
    chosen = np.sort(rng.choice(block_rows * block_cols, spec.nnz, replace=False))
    indptr = np.searchsorted(chosen // block_cols, np.arange(block_rows + 1)).astype(np.int32)
    values = rng.standard_normal((spec.nnz, br, bc), dtype=np.float32)
    return [d, values, (chosen % block_cols).astype(np.int32), indptr, bias]


def time_kernels(specs: list[KernelSpec], target: tvm.target.Target, repeat: int = REPEAT) -> list[float]:
    """Build all kernels in one module and time each as the cost model times the dense kernels they
    replace (`cost.timing.time_in_turn`: ms, best of at least `repeat` runs), the sparse weight (its
    format arrays and bias) cycled through a copy per round, made cold after their warm-up by as
    much other traffic as 256 copies would span (`cost.timing.cold_traffic`), so it is read from
    memory as in a model rather than from cache."""
    lib = build(specs, target)
    times = []
    for spec in specs:
        run = lib.mod[spec.name]  # looked up once: a lookup costs more than a small kernel
        x, *weight = random_operands(spec)
        nbytes = sum(a.nbytes for a in weight)
        rounds = (repeat, max(repeat, timing.ROUNDS[1]))
        count = min(rounds[1], max(2, timing.COLD_BYTES // nbytes))
        copies = [[tvm.runtime.tensor(a) for a in weight] for _ in range(count)]
        args = tvm.runtime.tensor(x), tvm.runtime.empty(spec.out_shape, "float32")
        runs = [functools.partial(run, args[0], *copy, args[1]) for copy in copies]
        between = timing.cold_traffic((max(1, nbytes // 4),), copies=0)  # the copies are TVM's, not the pool's
        times.append(timing.time_in_turn({"sparse": runs}, rounds=rounds, between=between)["sparse"])
    return times


def measure_sparse_latencies(queries: list[tuple[Sparsity, int, int, int]], target: object = "cpu") -> list[float]:
    spec_target = resolve_target(target)
    if spec_target.is_gpu:
        raise SparsefxError(f"sparse kernel latency is measured on the host CPU; {spec_target} cannot be timed here "
                            "(use target='cpu')")
    specs = [kernel_spec(*q) for q in queries]
    table = latency_table(spec_target)
    fresh = [s for s in dict.fromkeys(specs) if s.name not in table.entries]
    if fresh:
        for s, ms in zip(fresh, time_kernels(fresh, spec_target.to_tvm()), strict=True):
            table.entries[s.name] = ms
        table.save()
    return [table.entries[s.name] for s in specs]


def latency_table(target: Target) -> Table:
    """ms of each sparse kernel measured on the host CPU `target`, keyed by `KernelSpec.name`."""
    return Table(cache_dir() / "sparse" / f"{target.arch}-{target.cores}.json", TABLE_VERSION)


def measure_sparse_latency(spec: Sparsity, rows: int, cols: int, batch: int, target: object = "cpu") -> float:
    return measure_sparse_latencies([(spec, rows, cols, batch)], target)[0]
