"""TIR kernels for sparse weights: BSR and N:M times a dense operand, for CPU and CUDA.

Every kernel computes out = W @ D + bias for a sparse W (rows × cols, `sparsefx.formats`)
and a dense D of shape (batch, cols, width): a Linear is D = xᵀ (width = tokens), a 1×1
conv is D = x viewed as (batch, in_channels, h·w), a k×k conv is D = im2col(x). Shapes and
the nonzero count are compile-time constants: weights are constants of the model.

CPU: parallel over (batch, column tile, block row), or over (column tile, block row) of D
copied to (cols, batch·width) where a batch's width is not whole vectors (7×7 or 14×14 convs,
`runs_flat`); the inner loop runs over a block row's nonzero blocks and is vectorised over a tile
of whole 16-lane vectors of D's columns (the last vector shifted back to end at the width),
so each weight is one broadcast and each D load feeds up to a whole block column of
accumulators. Width 1 (a GEMV, Linear at one token) vectorises over the block instead, with
several accumulators.
CUDA: one thread per output element (row, column), threads over columns so D loads coalesce.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm.script import tirx as T

from sparsefx.backends.tvm.build_config import build_context
from sparsefx.backends.tvm.tvmscript import parse

OPAQUE = 8  # relax OpPatternKind.kOpaque: FuseOps must not fuse into a hand-scheduled kernel
LANES = 16  # fp32 lanes of one AVX-512 register
VECS = 4  # D vectors (of LANES columns) per CPU tile
FLAT_VECS = 3  # the same for a batch run as one wide problem (`runs_flat`): 16×1 and 32×1 blocks then take 8-row
# tiles (24 accumulators, 3 D loads per 24 FMAs): 1.2-1.3× faster than 4 vectors on 512->2048 @7×7 at batch 8
ACCS = 24  # accumulator registers per CPU tile (of 32: the rest hold D vectors and a weight)
CHUNK = 256  # columns of D per N:M chunk (256 × 64 floats: 64 KiB, L2-resident)
UNROLL = 4  # independent accumulators of the GEMV kernel (hides FMA latency)
THREADS = 64  # CUDA threads per block
STACK = "global"  # scope of CPU scratch buffers: "global" ones small enough go on the stack, "local" ones
# become a TVMBackendAllocWorkspace call per loop iteration


@dataclass(frozen=True)
class KernelSpec:
    """One sparse kernel: format, weight shape, nonzeros and the dense operand's shape.

    fmt "bsr": `block` = (br, bc), `nnz` = stored blocks. fmt "nm": `block` = (n, m),
    `nnz` = values per row (cols·n/m). `transpose_out` writes (width, rows) instead of
    (batch, rows, width), the layout of a Linear's output (batch must be 1)."""

    fmt: str
    rows: int
    cols: int
    block: tuple[int, int]
    nnz: int
    batch: int
    width: int
    transpose_out: bool = False

    @property
    def out_shape(self) -> tuple[int, ...]:
        return (self.width, self.rows) if self.transpose_out else (self.batch, self.rows, self.width)

    @property
    def name(self) -> str:
        t = "t" if self.transpose_out else ""
        return f"sparse_{self.fmt}{self.block[0]}x{self.block[1]}_{self.rows}x{self.cols}_nz{self.nnz}_" \
               f"b{self.batch}w{self.width}{t}"


def kernel(spec: KernelSpec, target: tvm.target.Target) -> tvm.tirx.PrimFunc:
    """The scheduled PrimFunc of `spec` for `target` (marked scheduled and opaque)."""
    gpu = "gpu" in target.keys
    if spec.transpose_out and spec.batch != 1:
        raise ValueError("transpose_out needs batch 1")
    if spec.fmt == "bsr":
        make = bsr_cuda if gpu else (_bsr_gemv_cpu if spec.width == 1 else _bsr_spmm_cpu)
    else:
        make = nm_cuda if gpu else (_nm_gemv_cpu if spec.width == 1 else _nm_spmm_cpu)
    return make(spec).with_attr({"op_pattern": OPAQUE, "tirx.is_scheduled": True, "tirx.noalias": True})


def build(specs: list[KernelSpec], target: tvm.target.Target) -> tvm.runtime.Module:
    """One library holding the kernels of `specs` (one LLVM/NVCC build), each under its `name`."""
    funcs = {s.name: parse(kernel, s, target).with_attr("global_symbol", s.name) for s in dict.fromkeys(specs)}
    with build_context(target):
        return tvm.compile(tvm.IRModule(funcs), target)


def _row_tile(br: int, vectors: int) -> int:
    """Accumulator rows per pass over a block row: as many as fit ACCS registers, so each D
    vector load feeds several rows (a tall block re-walks its row's block list less often)."""
    return next(t for t in (32, 16, 8, 4, 2, 1) if br % t == 0 and t * vectors <= ACCS)


def _vectors(width: int, vecs: int = VECS) -> tuple[int, int, int, int]:
    """D's columns as whole vectors: lanes per vector (LANES, or `width` below that), vectors
    per CPU tile (at most `vecs`), full tiles and the vectors of the last, partial tile (0 if none)."""
    lanes = min(LANES, width)
    count = -(-width // lanes)
    per_tile = min(vecs, count)
    return lanes, per_tile, *divmod(count, per_tile)


def _column(vector, lanes: int, width: int):  # noqa: ANN001, ANN202 (TIR expressions)
    """First column of D vector `vector`: the last one is shifted back to end at `width` (it
    recomputes a few columns of the one before), so no vector is ragged."""
    return T.min(vector * lanes, width - lanes)


def _store(spec: KernelSpec):  # noqa: ANN202 (returns a TVMScript macro)
    """Where output (b, n, p) goes: the one place the two output layouts differ."""
    if spec.transpose_out:
        @T.macro
        def store(out, b, n, p, value):  # noqa: ANN001, ANN202
            out[p, n] = value
    else:
        @T.macro
        def store(out, b, n, p, value):  # noqa: ANN001, ANN202
            out[b, n, p] = value
    return store


def runs_flat(s: KernelSpec) -> bool:
    """Whether the CPU SpMM runs the batch as one wide problem: D repacked to (cols, batch·width)
    so that vectors run across images. Only where width is not whole vectors (a 7×7 or 14×14
    conv): width 49 is 4 vectors per image (64 columns computed for 49), 392 at batch 8 is 25."""
    return s.batch > 1 and s.width > 1 and s.width % LANES != 0 and not s.transpose_out


@T.macro
def _pack(D, P, s):  # noqa: ANN001, ANN202
    """P[0, c, b·width + w] = D[b, c, w]: one copy of D (8×512×49 floats is 0.8 MB)."""
    for c in T.parallel(s.cols):
        for b in range(s.batch):
            for w in T.vectorized(s.width):
                P[0, c, b * s.width + w] = D[b, c, w]


def _spread_store(s: KernelSpec, lanes: int):  # noqa: ANN202 (returns a TVMScript macro)
    """Store accumulator vector (r, v) of row n at flat column q of (batch·width): one vector
    store, or lane by lane where the vector spans two images (one vector per image boundary).
    A no-op where the kernel is not flat (its branch is dead, but must still parse)."""
    if not runs_flat(s):
        @T.macro
        def skip(out, n, q, acc, r, v):  # noqa: ANN001, ANN202
            T.evaluate(0)
        return skip

    @T.macro
    def spread(out, n, q, acc, r, v):  # noqa: ANN001, ANN202
        if q % s.width + lanes <= s.width:
            for p in T.vectorized(lanes):
                out[q // s.width, n, q % s.width + p] = acc[r, v * lanes + p]
        else:
            for p in T.unroll(lanes):
                out[(q + p) // s.width, n, (q + p) % s.width] = acc[r, v * lanes + p]

    return spread


def _group(s: KernelSpec, rows: int) -> int:
    """Output rows per CPU task: a transposed output is written a cache line (16 rows) at a
    time through a staging tile, since one column per row at the row stride (a multiple of
    4 KiB for sizes like 3072) would evict its own lines from the same cache set."""
    if not s.transpose_out:
        return rows
    group = rows * -(-LANES // rows)
    return group if s.rows % group == 0 else rows


def _bsr_spmm_cpu(s: KernelSpec) -> tvm.tirx.PrimFunc:
    """A task owns up to VECS whole vectors of D's columns (`_vectors`) and a group of block
    rows: a ragged vector (width 49 = 3·16 + 1 as one 49-lane vector) made LLVM split the
    accumulators into scalars and spill them to the stack on every step (5-10× slower). A batch
    whose width is not whole vectors runs as one problem of width batch·width (`runs_flat`): D is
    copied to (cols, batch·width) and a vector that spans two images is stored lane by lane."""
    (br, bc), nrb = s.block, s.rows // s.block[0]
    group = _group(s, br)
    bpg, ngroups = group // br, s.rows // group
    flat = runs_flat(s)
    width = s.batch * s.width if flat else s.width
    lanes, nv, ntiles, tailv = _vectors(width, FLAT_VECS if flat else VECS)
    staged = s.transpose_out
    store = _store(s)
    spread = _spread_store(s, lanes)

    @T.macro
    def tile(D, V, Id, R, bias, out, b, g, k0, vecs, rt):  # noqa: ANN001, ANN202
        stage = T.alloc_buffer((group, vecs * lanes) if staged else (1, 1), "float32", scope=STACK)
        for ib in range(bpg):
            i: T.let = g * bpg + ib
            for rs in range(br // rt):
                acc = T.alloc_buffer((rt, vecs * lanes), "float32", scope=STACK)
                for r in T.unroll(rt):
                    for v in T.unroll(vecs):
                        for p in T.vectorized(lanes):
                            acc[r, v * lanes + p] = bias[i * br + rs * rt + r]
                for j in range(R[i], R[i + 1]):
                    for c in T.unroll(bc):
                        for r in T.unroll(rt):
                            for v in T.unroll(vecs):
                                for p in T.vectorized(lanes):
                                    acc[r, v * lanes + p] = acc[r, v * lanes + p] + V[j, rs * rt + r, c] * \
                                        D[b, Id[j] * bc + c, _column(k0 + v, lanes, width) + p]
                for r in range(rt):
                    for v in T.unroll(vecs):
                        if T.bool(flat):
                            spread(out, i * br + rs * rt + r, _column(k0 + v, lanes, width), acc, r, v)
                        else:
                            for p in T.vectorized(lanes):
                                if T.bool(staged):
                                    stage[ib * br + rs * rt + r, v * lanes + p] = acc[r, v * lanes + p]
                                else:
                                    store(out, b, i * br + rs * rt + r, _column(k0 + v, lanes, s.width) + p,
                                          acc[r, v * lanes + p])
        if T.bool(staged):
            for v in range(vecs):
                for p in range(lanes):
                    for r in T.vectorized(group):
                        store(out, b, g * group + r, _column(k0 + v, lanes, s.width) + p,
                              stage[r, v * lanes + p])

    if flat:
        @T.prim_func(private=True)
        def f_flat(D: T.Buffer((s.batch, s.cols, s.width), "float32"), V: T.Buffer((s.nnz, br, bc), "float32"),
                   Id: T.Buffer((s.nnz,), "int32"), R: T.Buffer((nrb + 1,), "int32"),
                   bias: T.Buffer((s.rows,), "float32"), out: T.Buffer(s.out_shape, "float32")):
            P = T.alloc_buffer((1, s.cols, width), "float32")
            _pack(D, P, s)
            for t in T.parallel(ntiles * ngroups):
                tile(P, V, Id, R, bias, out, 0, t % ngroups, t // ngroups * nv, nv, _row_tile(br, nv))
            if T.bool(tailv > 0):
                for t in T.parallel(ngroups):
                    tile(P, V, Id, R, bias, out, 0, t, ntiles * nv, max(tailv, 1), _row_tile(br, max(tailv, 1)))

        return f_flat

    @T.prim_func(private=True)
    def f(D: T.Buffer((s.batch, s.cols, s.width), "float32"), V: T.Buffer((s.nnz, br, bc), "float32"),
          Id: T.Buffer((s.nnz,), "int32"), R: T.Buffer((nrb + 1,), "int32"), bias: T.Buffer((s.rows,), "float32"),
          out: T.Buffer(s.out_shape, "float32")):
        for t in T.parallel(s.batch * ntiles * ngroups):
            tile(D, V, Id, R, bias, out, t // (ntiles * ngroups), t % ngroups, t // ngroups % ntiles * nv, nv,
                 _row_tile(br, nv))
        if T.bool(tailv > 0):
            for t in T.parallel(s.batch * ngroups):
                tile(D, V, Id, R, bias, out, t // ngroups, t % ngroups, ntiles * nv, max(tailv, 1),
                     _row_tile(br, max(tailv, 1)))

    return f


def _bsr_gemv_cpu(s: KernelSpec) -> tvm.tirx.PrimFunc:
    (br, bc), nrb = s.block, s.rows // s.block[0]
    lanes = br * bc
    store = _store(s)

    @T.prim_func(private=True)
    def f(D: T.Buffer((s.batch, s.cols, 1), "float32"), V: T.Buffer((s.nnz, br, bc), "float32"),
          Id: T.Buffer((s.nnz,), "int32"), R: T.Buffer((nrb + 1,), "int32"), bias: T.Buffer((s.rows,), "float32"),
          out: T.Buffer(s.out_shape, "float32")):
        for t in T.parallel(s.batch * nrb):
            b: T.let = t // nrb
            i: T.let = t % nrb
            acc = T.alloc_buffer((UNROLL, lanes), "float32", scope=STACK)
            for u in T.unroll(UNROLL):
                for k in T.vectorized(lanes):
                    acc[u, k] = T.float32(0)
            start: T.let = R[i]
            count: T.let = R[i + 1] - R[i]
            for jo in range(count // UNROLL):
                for u in T.unroll(UNROLL):
                    for k in T.vectorized(lanes):
                        acc[u, k] = acc[u, k] + V[start + jo * UNROLL + u, k // bc, k % bc] * \
                            _block_input(D, b, Id[start + jo * UNROLL + u] * bc, k, bc, lanes)
            for j in range(start + count // UNROLL * UNROLL, start + count):
                for k in T.vectorized(lanes):
                    acc[0, k] = acc[0, k] + V[j, k // bc, k % bc] * _block_input(D, b, Id[j] * bc, k, bc, lanes)
            for u in range(1, UNROLL):
                for k in T.vectorized(lanes):
                    acc[0, k] = acc[0, k] + acc[u, k]
            for r in range(br):
                total = T.alloc_buffer((1,), "float32", scope=STACK)
                total[0] = bias[i * br + r]
                for c in range(bc):
                    total[0] = total[0] + acc[0, r * bc + c]
                store(out, b, i * br + r, 0, total[0])

    return f


def _nm_spmm_cpu(s: KernelSpec) -> tvm.tirx.PrimFunc:
    """A task owns `group` rows and walks the columns in chunks of CHUNK: the rows of D a
    chunk touches (CHUNK × tile floats) stay in L2 for every row of the group, where a
    whole-row walk would stream all of D from L3 once per row. D's columns are cut into whole
    vectors, and a batch run as one wide problem (`runs_flat`), as in `_bsr_spmm_cpu`."""
    n, m = s.block
    group = next(g for g in (LANES, 8, 4, 2, 1) if s.rows % g == 0)
    ngroups = s.rows // group
    per_chunk = next(c for c in range(max(1, CHUNK // m), 0, -1) if (s.cols // m) % c == 0)  # groups of m
    store = _store(s)
    flat = runs_flat(s)
    width = s.batch * s.width if flat else s.width
    lanes, nv, ntiles, tailv = _vectors(width)
    spread = _spread_store(s, lanes)

    @T.macro
    def tile(D, V, Id, bias, out, b, g, k0, vecs):  # noqa: ANN001, ANN202
        stage = T.alloc_buffer((group, vecs * lanes), "float32", scope=STACK)
        for r in range(group):
            for q in T.vectorized(vecs * lanes):
                stage[r, q] = bias[g * group + r]
        for kc in range(s.cols // m // per_chunk):
            for r in range(group):
                row: T.let = g * group + r
                acc = T.alloc_buffer((vecs * lanes,), "float32", scope=STACK)
                for q in T.vectorized(vecs * lanes):
                    acc[q] = stage[r, q]
                for k in range(kc * per_chunk, kc * per_chunk + per_chunk):
                    for e in T.unroll(n):
                        for v in T.unroll(vecs):
                            for p in T.vectorized(lanes):
                                acc[v * lanes + p] = acc[v * lanes + p] + V[row, k * n + e] * \
                                    D[b, k * m + T.Cast("int32", Id[row, k * n + e]), _column(k0 + v, lanes, width) + p]
                for q in T.vectorized(vecs * lanes):
                    stage[r, q] = acc[q]
        for v in T.unroll(vecs):
            if T.bool(s.transpose_out):
                for p in range(lanes):
                    for r in T.vectorized(group):
                        store(out, b, g * group + r, _column(k0 + v, lanes, s.width) + p, stage[r, v * lanes + p])
            elif T.bool(flat):
                for r in range(group):
                    spread(out, g * group + r, _column(k0 + v, lanes, width), stage, r, v)
            else:
                for r in range(group):
                    for p in T.vectorized(lanes):
                        store(out, b, g * group + r, _column(k0 + v, lanes, s.width) + p, stage[r, v * lanes + p])

    if flat:
        @T.prim_func(private=True)
        def f_flat(D: T.Buffer((s.batch, s.cols, s.width), "float32"), V: T.Buffer((s.rows, s.nnz), "float32"),
                   Id: T.Buffer((s.rows, s.nnz), "int8"), bias: T.Buffer((s.rows,), "float32"),
                   out: T.Buffer(s.out_shape, "float32")):
            P = T.alloc_buffer((1, s.cols, width), "float32")
            _pack(D, P, s)
            for t in T.parallel(ntiles * ngroups):
                tile(P, V, Id, bias, out, 0, t % ngroups, t // ngroups * nv, nv)
            if T.bool(tailv > 0):
                for t in T.parallel(ngroups):
                    tile(P, V, Id, bias, out, 0, t, ntiles * nv, max(tailv, 1))

        return f_flat

    @T.prim_func(private=True)
    def f(D: T.Buffer((s.batch, s.cols, s.width), "float32"), V: T.Buffer((s.rows, s.nnz), "float32"),
          Id: T.Buffer((s.rows, s.nnz), "int8"), bias: T.Buffer((s.rows,), "float32"),
          out: T.Buffer(s.out_shape, "float32")):
        for t in T.parallel(s.batch * ntiles * ngroups):
            tile(D, V, Id, bias, out, t // (ntiles * ngroups), t % ngroups, t // ngroups % ntiles * nv, nv)
        if T.bool(tailv > 0):
            for t in T.parallel(s.batch * ngroups):
                tile(D, V, Id, bias, out, t // ngroups, t % ngroups, ntiles * nv, max(tailv, 1))

    return f


def transposed_operands(spec: KernelSpec) -> bool:
    """Whether the kernel takes N:M values and indices transposed, (nnz, rows)."""
    return spec.fmt == "nm" and spec.width == 1


def _window(D, b, base, position, m):  # noqa: ANN001, ANN202
    """D[b, base + position, 0] for a vector of positions < m, as m - 1 selects between m
    broadcast loads: TVM's LLVM backend lowers a gather to one scalar load per lane."""
    value = D[b, base, 0]
    for e in range(1, m):
        value = tvm.tirx.Select(position == e, D[b, base + e, 0], value)
    return value


def _block_input(D, b, base, k, bc, lanes):  # noqa: ANN001, ANN202
    """D[b, base + k % bc, 0] for lane k of a flattened br × bc block: a contiguous load when
    the block is one row, else bc broadcasts blended by lane (no per-lane gather)."""
    if bc == lanes or bc == 1:
        return D[b, base + k % bc, 0]
    return _window(D, b, base, k % bc, bc)


def _nm_gemv_cpu(s: KernelSpec) -> tvm.tirx.PrimFunc:
    """Vectorised over rows (values stored transposed): every row reads from the same
    window of M inputs per group, so a lane picks its input with selects, not a gather."""
    n, m = s.block
    lanes = next(w for w in (LANES, 8, 4, 2, 1) if s.rows % w == 0)
    store = _store(s)

    @T.prim_func(private=True)
    def f(D: T.Buffer((s.batch, s.cols, 1), "float32"), V: T.Buffer((s.nnz, s.rows), "float32"),
          Id: T.Buffer((s.nnz, s.rows), "int8"), bias: T.Buffer((s.rows,), "float32"),
          out: T.Buffer(s.out_shape, "float32")):
        for t in T.parallel(s.batch * (s.rows // lanes)):
            b: T.let = t // (s.rows // lanes)
            r0: T.let = t % (s.rows // lanes) * lanes
            acc = T.alloc_buffer((lanes,), "float32", scope=STACK)
            for k in T.vectorized(lanes):
                acc[k] = bias[r0 + k]
            for j in range(s.nnz):
                for k in T.vectorized(lanes):
                    acc[k] = acc[k] + V[j, r0 + k] * _window(D, b, j // n * m, Id[j, r0 + k], m)
            for k in T.vectorized(lanes):
                store(out, b, r0 + k, 0, acc[k])

    return f


def _cuda_grid(s: KernelSpec, bind: bool):  # noqa: ANN202 (TVMScript loop makers)
    """One thread per (batch, row, column tile) output: threads per block, block count, the
    store macro and the two loop makers (bound to the GPU grid, or serial for CPU checks)."""
    threads = min(THREADS, s.width)
    blocks = (s.width + threads - 1) // threads
    outer = (lambda e: T.thread_binding(e, "blockIdx.x")) if bind else T.serial
    inner = (lambda e: T.thread_binding(e, "threadIdx.x")) if bind else T.serial
    return threads, blocks, _store(s), outer, inner


def bsr_cuda(s: KernelSpec, bind: bool = True) -> tvm.tirx.PrimFunc:
    """Thread (row, column): walks its block row. `bind=False` gives the same loops serial,
    which runs on the CPU so tests can check the CUDA kernel's indexing without a GPU."""
    (br, bc), nrb = s.block, s.rows // s.block[0]
    threads, blocks, store, outer, inner = _cuda_grid(s, bind)

    @T.prim_func(private=True)
    def f(D: T.Buffer((s.batch, s.cols, s.width), "float32"), V: T.Buffer((s.nnz, br, bc), "float32"),
          Id: T.Buffer((s.nnz,), "int32"), R: T.Buffer((nrb + 1,), "int32"), bias: T.Buffer((s.rows,), "float32"),
          out: T.Buffer(s.out_shape, "float32")):
        for bx in outer(s.batch * s.rows * blocks):
            for tx in inner(threads):
                b: T.let = bx // (s.rows * blocks)
                row: T.let = bx // blocks % s.rows
                p: T.let = bx % blocks * threads + tx
                if p < s.width:
                    acc = T.alloc_local((1,), "float32")
                    acc[0] = bias[row]
                    for j in range(R[row // br], R[row // br + 1]):
                        for c in range(bc):
                            acc[0] = acc[0] + V[j, row % br, c] * D[b, Id[j] * bc + c, p]
                    store(out, b, row, p, acc[0])

    return f


def nm_cuda(s: KernelSpec, bind: bool = True) -> tvm.tirx.PrimFunc:
    n, m = s.block
    threads, blocks, store, outer, inner = _cuda_grid(s, bind)

    @T.prim_func(private=True)
    def f(D: T.Buffer((s.batch, s.cols, s.width), "float32"), V: T.Buffer((s.rows, s.nnz), "float32"),
          Id: T.Buffer((s.rows, s.nnz), "int8"), bias: T.Buffer((s.rows,), "float32"),
          out: T.Buffer(s.out_shape, "float32")):
        for bx in outer(s.batch * s.rows * blocks):
            for tx in inner(threads):
                b: T.let = bx // (s.rows * blocks)
                row: T.let = bx // blocks % s.rows
                p: T.let = bx % blocks * threads + tx
                if p < s.width:
                    acc = T.alloc_local((1,), "float32")
                    acc[0] = bias[row]
                    for j in range(s.nnz):
                        acc[0] = acc[0] + V[row, j] * D[b, j // n * m + T.Cast("int32", Id[row, j]), p]
                    store(out, b, row, p, acc[0])

    return f
