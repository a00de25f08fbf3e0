"""2:4 sparse GEMM on NVIDIA sparse tensor cores (`mma.sp`, sm_80+), written in TIR.

What TVM 0.27 offers. There is no `T.ptx_mma_sp` / `tirx.ptx_mma_sp` builtin any more (older TVM
had one; `T.ptx_legacy` here only keeps `mma` and `ldmatrix`), and no tensor intrinsic or
MetaSchedule rule for sparse tensor cores. What it has is the table-driven `T.ptx` dialect
(`tvm/backend/cuda/ptx/table.py`): every PTX ISA syntax line becomes an op `tirx.ptx.<name>` that
renders an inline-asm helper. `mma.sp` / `mma.sp::ordered_metadata` are registered for
`.m16n8k16` (f16/bf16/tf32, selector 0..3), `.m16n8k32` (f16/bf16, selector 0..1, the shape
CUTLASS uses), `.m16n8k64` (e4m3/e5m2), f16 accumulators and the integer shapes; the operands
are the raw registers (d: 4 × f32, a: 4 × b32, b: 4 × b32, c: 4 × f32, e: b32, f: immediate).
So the instruction is reachable, but everything around it is by hand: packing the 2:4 values
and metadata, giving each lane its fragment registers, tiling, shared memory and the epilogue.

The kernel: out (N, M) = x (N, K) @ Wᵀ + bias for a 2:4 weight W (M × K), fp16 inputs, fp32
accumulation, output fp16 or fp32. W is operand A of `mma.sp.sync.aligned.m16n8k32.row.col.
f32.f16.f16.f32` (the sparse operand must be A), xᵀ is B in its `.col` layout, which is x's own
row-major layout, so neither operand is transposed. The single-buffered kernel (`stages` 0, the
default): a block of 128 threads (4 warps, 2 × 2) owns a
BM × BN tile of Wx (BM, BN ∈ {128, 64}); each warp a (BM/2) × (BN/2) tile of m16n8 accumulators.
Per BK = 64 columns of K it stages the compressed values (BM × 32 fp16), x (BN × 64 fp16) and the
metadata in shared memory (128-bit loads, rows padded so fragment reads are conflict-free), then
each warp runs two k32 steps of (BM/32) × (BN/16) `mma.sp`. Single-buffered, no cp.async or
ldmatrix: correctness first. The fragment and metadata layouts are the PTX ISA's (9.7.16.6.2,
the same as upstream TVM's `tests/python/tir-base/test_tir_ptx_mma_sp.py`); `sparsefx.formats.
mma24_pack` documents the metadata words. Variant `sp::ordered_metadata` (indices sorted, which
`NM` guarantees) when nvcc is 12.5 or newer, else plain `sp`.

The pipelined kernel (`MmaSpec.stages` >= 2; `candidates(spec)` lists the configs worth timing
per shape, the single-buffered one first as the fallback). A bm × bn block tile of warps_m ×
warps_n warps (e.g. 128 × 128 on 2 × 4), `stages` copies of the three BK tiles in one dynamic
shared-memory pool (`shared.dyn`, up to `MAX_SMEM`; TVM's CUDA runtime raises the per-kernel
limit above 48 KiB at launch). Global → shared by `cp.async.cg.shared.global` (16 bytes, one
commit group per K step, the load of step ko + stages - 1 issued right after the one barrier of
step ko so it overlaps that step's mma.sp), fragments by `ldmatrix.sync.aligned.m8n8.x4` for both
operands: the m16n8k32 A and B registers are four 8 × 8 b16 matrices each (A: rows g / g + 8 ×
word columns 0-3 / 4-7 of a k32 step, B: token rows × k8 blocks), so one x4 per m16 or n8 tile,
and the padded row strides (80 and 144 bytes) keep each 8-row phase on distinct banks. The
buffers are views of the one pool: a buffer of its own is compacted to the elements the TIR
indexes, and the 16-byte copies and ldmatrix rows index only each row's first word. Epilogue:
straight from the accumulators (2-byte stores, four 16-byte pieces per warp store), or with
`staged_out` through the pool (fp32, token-major) and out in coalesced half4 / float4 rows.
Not done: split-K (the small-grid shapes at 128 tokens rely on the 64-wide tiles), swizzled
instead of padded shared layouts, fragment double-buffering across the two k32 steps.

Verified here (no GPU): the packing round trip, the TIR kernels compile to CUDA for sm_80 and
sm_90, nvcc / nvrtc accept them (no spills), and `emulate` (numpy) — which walks the kernel's
own index functions lane by lane through a model of `mma.sp` written from the PTX ISA fragment
tables, and for the pipelined kernel through models of ldmatrix.x4 and of cp.async groups that
land only at their `wait_group` — matches the dense product. Verified on an H200
(`benchmarks/gpu_backend.py`), single-buffered kernel only: the output matches the fp32 product
within 4e-4 (fp16 output) on 4096³ and BERT-base's MLP shapes; speed is 0.35-0.44x cuBLAS dense
fp16, about even (0.99-1.46x) on 3072x768 at 128 tokens. The pipelined kernel has not run on a
GPU yet. The emulation could not catch that binding `r, c = _a_copy(...)` inside a vectorized
loop left a scalar index (one word staged of every four); the copies now index inline.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import tvm
from tvm.script import tirx as T

from sparsefx.backends.tvm.tvmscript import parse
from sparsefx.errors import SparsefxError

OPAQUE = 8  # relax OpPatternKind.kOpaque
THREADS = 128  # 4 warps, 2 × 2 over the block tile
BK = 64  # dense K per shared-memory stage (two k32 mma.sp steps)
A_LD = BK // 4 + 4  # uint32 row stride of the staged values: 16 + 4 pad, conflict-free fragment reads
B_LD = BK // 2 + 4  # uint32 row stride of the staged x rows: 32 + 4 pad
MAX_SMEM = 160 * 1024  # dynamic shared memory per block an A100 (163 KiB) and an H100/H200 (227 KiB) both grant
COPY = "cp.async.cg.shared.global"  # 16 bytes, global -> shared, bypassing L1
LDMATRIX = "ldmatrix.sync.aligned.m8n8.x4.shared.b16"
OUT_LANES = 4  # staged output: one 16-byte shared load and one 8 (fp16) or 16-byte store per chunk (TVM renders
# an 8-lane uint32 vector as a broken ulonglong4, so 8 fp16 per store is not on offer)


@dataclass(frozen=True)
class MmaSpec:
    """out (tokens, rows) = x (tokens, cols) @ Wᵀ + bias, W 2:4 along cols. `stages` 0 is the
    single-buffered kernel (its own tile rule; bm, bn, warps ignored); 2 or more the cp.async /
    ldmatrix pipeline on a bm × bn block tile of warps_m × warps_n warps. Flat ints, so the
    Relax pass can carry the spec as JSON."""

    rows: int
    cols: int
    tokens: int
    out_dtype: str = "float16"
    bm: int = 128
    bn: int = 128
    warps_m: int = 2
    warps_n: int = 2
    stages: int = 0
    staged_out: bool = False  # pipelined only: the tile goes out through shared memory, coalesced

    @property
    def tile(self) -> tuple[int, int]:
        if self.stages:
            return self.bm, self.bn
        return (128 if self.rows % 128 == 0 else 64), (128 if self.tokens % 128 == 0 else 64)

    @property
    def name(self) -> str:
        base = f"sparse_mma24_{self.rows}x{self.cols}_t{self.tokens}_{self.out_dtype}"
        if not self.stages:
            return base
        out = "_so" if self.staged_out else ""
        return f"{base}_b{self.bm}x{self.bn}_w{self.warps_m}x{self.warps_n}_s{self.stages}{out}"

    @property
    def threads(self) -> int:
        return 32 * self.warps_m * self.warps_n if self.stages else THREADS

    @property
    def smem_bytes(self) -> int:
        """Shared memory of the pipelined kernel: `stages` copies of the values, x and metadata tiles."""
        bm, bn = self.tile
        return 4 * max(self.stages, 1) * (bm * A_LD + bn * B_LD + bm // 16 * (BK // 32) * 16)


class UnsupportedMmaShape(SparsefxError):
    """The mma.sp kernel cannot tile this shape with this configuration."""


def refusal(s: MmaSpec) -> str | None:
    """Why `s` cannot be built (one line), or None."""
    bm, bn = s.tile
    if min(s.rows, s.cols, s.tokens) <= 0 or s.cols % BK:
        return f"mma.sp kernel needs cols % {BK} == 0 and positive sizes, got {s.rows}x{s.cols} at {s.tokens} tokens"
    if s.rows % bm or s.tokens % bn:
        fix = "pick a config from candidates(spec)" if s.stages else "pad rows and tokens to multiples of 64"
        return f"mma.sp tile {bm}x{bn} does not divide rows {s.rows} x tokens {s.tokens}; {fix}"
    if s.stages:
        wm, wn = bm // s.warps_m, bn // s.warps_n
        if s.stages < 2 or bm % s.warps_m or bn % s.warps_n or wm % 16 or wn % 8 or s.threads > 1024:
            return f"mma.sp config {s.name} is malformed: stages >= 2, warp tile a multiple of 16 x 8"
        if s.smem_bytes > MAX_SMEM:
            return f"mma.sp config {s.name} needs {s.smem_bytes} B of shared memory (> {MAX_SMEM}); fewer stages"
        if s.staged_out and (bn * (bm + 4) * 4 > s.smem_bytes or bm * bn // OUT_LANES % s.threads):
            return f"mma.sp config {s.name}: the output tile does not fit the stages' pool; staged_out=False"
    elif s.staged_out:
        return "mma.sp staged_out needs the pipelined kernel (stages >= 2)"
    return None


def supported(rows: int, cols: int, tokens: int) -> bool:
    """Whether the single-buffered kernel covers these shapes: whole 64 × 64 tiles and whole BK stages."""
    return rows % 64 == 0 and tokens % 64 == 0 and cols % BK == 0 and min(rows, cols, tokens) > 0


def candidates(s: MmaSpec) -> list[MmaSpec]:
    """Configs worth timing for `s`'s shape, the single-buffered kernel first (the fallback);
    only those that tile the shape. Big tiles for big grids, smaller ones where the grid would
    leave SMs idle (132 on an H200)."""
    configs = [(128, 128, 2, 2, 3), (128, 128, 2, 4, 3), (128, 256, 2, 4, 3), (256, 128, 4, 2, 3),
               (128, 128, 2, 2, 4), (64, 128, 2, 2, 4), (128, 64, 2, 2, 4), (64, 64, 2, 2, 4)]
    found = [replace(s, stages=0, staged_out=False)] if supported(s.rows, s.cols, s.tokens) else []
    staged = [(128, 128, 2, 4, 3), (128, 256, 2, 4, 3), (128, 128, 2, 2, 3)]
    for bm, bn, wm, wn, stages in configs:
        for out in (False, True) if (bm, bn, wm, wn, stages) in staged else (False,):
            spec = replace(s, bm=bm, bn=bn, warps_m=wm, warps_n=wn, stages=stages, staged_out=out)
            if refusal(spec) is None:
                found.append(spec)
    return found


def _variant() -> str:
    """`sp::ordered_metadata` (what ptxas advises from CUDA 12.5 on; our indices are sorted)
    where the local nvcc is 12.5 or newer, else plain `sp` (CUDA 11+)."""
    from tvm.support import nvcc

    try:
        version = tuple(int(p) for p in nvcc.get_cuda_version()[:2])
    except Exception:  # noqa: BLE001 (no CUDA toolkit here: the plain form assembles everywhere)
        return "sp"
    return "sp::ordered_metadata" if version >= (12, 5) else "sp"


def instruction(variant: str | None = None) -> str:
    return f"mma.{variant or _variant()}.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32"


# Index functions shared by the TIR kernel and `emulate` (they take TIR vars or numpy ints).
def _a_copy(q, v):  # noqa: ANN001, ANN202 — staged values (row, u32 col) of quad q, lane v
    return q // 4, q % 4 * 4 + v


def _b_copy(q, v):  # noqa: ANN001, ANN202 — staged x (row, u32 col)
    return q // 8, q % 8 * 4 + v


def _e_copy(q):  # noqa: ANN001, ANN202 — staged metadata (m16 tile, k32 step, word)
    return q // 32, q // 16 % 2, q % 16


def _offset(index, rows, cols):  # noqa: ANN001, ANN202 — a staged (row, col) in the global buffer
    return index[0] + rows, index[1] + cols


def _a_frag(wrow, mi, g, t, ks, j):  # noqa: ANN001, ANN202 — A register j of m16 tile mi
    return wrow + mi * 16 + g + j % 2 * 8, ks * 8 + j // 2 * 4 + t


def _b_frag(wcol, ni, g, t, ks, j):  # noqa: ANN001, ANN202 — B register j of n8 tile ni
    return wcol + ni * 8 + g, ks * 16 + j * 4 + t


def _e_frag(wrow, mi, g, t, ks):  # noqa: ANN001, ANN202 — metadata word (selector 0: lanes t = 0, 1)
    return wrow // 16 + mi, ks, g * 2 + t % 2


def _c_frag(wrow, wcol, mi, ni, g, t, i):  # noqa: ANN001, ANN202 — accumulator i → (row of W, token)
    return wrow + mi * 16 + g + i // 2 * 8, wcol + ni * 8 + t * 2 + i % 2


def _e_quad(q):  # noqa: ANN001, ANN202 — pipelined kernel: metadata quad q → (m16 tile, k32 step, first word)
    return q // 8, q // 4 % 2, q % 4 * 4


def _staged(stage, index):  # noqa: ANN001, ANN202 — a tile index in pipeline stage `stage`
    return (stage, *index)


def _a_ldm(wrow, mi, lane, ks):  # noqa: ANN001, ANN202 — row address lane gives ldmatrix.x4 for A (matrix lane // 8)
    return wrow + mi * 16 + lane % 8 + lane // 8 % 2 * 8, ks * 8 + lane // 16 * 4


def _b_ldm(wcol, ni, lane, ks):  # noqa: ANN001, ANN202 — row address lane gives ldmatrix.x4 for B
    return wcol + ni * 8 + lane % 8, ks * 16 + lane // 8 * 4


def _out_chunk(q, bm, lanes):  # noqa: ANN001, ANN202 — staged output: chunk q → (token, first row of W)
    return q // (bm // lanes), q % (bm // lanes) * lanes


def _warp_origin(warp, s):  # noqa: ANN001, ANN202 — (first W row, first token) of a warp's tile in the block tile
    bm, bn = s.tile
    return warp // s.warps_n * (bm // s.warps_m), warp % s.warps_n * (bn // s.warps_n)


def kernel(s: MmaSpec, variant: str | None = None) -> tvm.tirx.PrimFunc:
    """The scheduled CUDA PrimFunc (x, values, meta, bias, out) of `s`; see the module docstring."""
    if (why := refusal(s)) is not None:
        raise UnsupportedMmaShape(why)
    if s.stages:
        return _pipelined(s, instruction(variant))
    M, K, N = s.rows, s.cols, s.tokens  # noqa: N806
    bm, bn = s.tile
    wm, wn = bm // 2, bn // 2
    mt, nt = wm // 16, wn // 8
    a_quads, b_quads, e_words = bm * BK // 16, bn * BK // 8, bm // 16 * (BK // 32) * 16
    chain = instruction(variant)

    @T.prim_func(private=True)
    def f(X: T.Buffer((N, K), "float16"), V: T.Buffer((M, K // 2), "float16"),
          E: T.Buffer((M // 16, K // 32, 16), "uint32"), bias: T.Buffer((M,), "float32"),
          out: T.Buffer((N, M), s.out_dtype)):
        X32 = T.decl_buffer((N, K // 2), "uint32", data=X.data)
        V32 = T.decl_buffer((M, K // 4), "uint32", data=V.data)
        for by in T.thread_binding(M // bm, "blockIdx.y"):
            for bx in T.thread_binding(N // bn, "blockIdx.x"):
                for tid in T.thread_binding(THREADS, "threadIdx.x"):
                    a_s = T.alloc_shared((bm, A_LD), "uint32")
                    b_s = T.alloc_shared((bn, B_LD), "uint32")
                    e_s = T.alloc_shared((bm // 16, BK // 32, 16), "uint32")
                    acc = T.alloc_local((mt, nt, 4), "float32")
                    af = T.alloc_local((mt, 4), "uint32")
                    bf = T.alloc_local((nt, 4), "uint32")
                    ef = T.alloc_local((mt,), "uint32")
                    wrow: T.let = tid // 64 * wm
                    wcol: T.let = tid // 32 % 2 * wn
                    g: T.let = tid % 32 // 4
                    t: T.let = tid % 4
                    for mi, ni, i in T.grid(mt, nt, 4):
                        acc[mi, ni, i] = T.float32(0)
                    for ko in range(K // BK):
                        for it in T.unroll(a_quads // THREADS):
                            for v in T.vectorized(4):  # indices inline: a tuple bound here is a scalar, not a vector
                                a_s[_a_copy(it * THREADS + tid, v)] = V32[_offset(_a_copy(it * THREADS + tid, v),
                                                                                  by * bm, ko * (BK // 4))]
                        for it in T.unroll(b_quads // THREADS):
                            for v in T.vectorized(4):
                                b_s[_b_copy(it * THREADS + tid, v)] = X32[_offset(_b_copy(it * THREADS + tid, v),
                                                                                  bx * bn, ko * (BK // 2))]
                        for it in T.unroll(e_words // THREADS):
                            m16, k32, w = _e_copy(it * THREADS + tid)
                            e_s[m16, k32, w] = E[by * (bm // 16) + m16, ko * (BK // 32) + k32, w]
                        T.tvm_storage_sync("shared")
                        for ks in T.unroll(BK // 32):
                            for mi in T.unroll(mt):
                                for j in T.unroll(4):
                                    ar, ac = _a_frag(wrow, mi, g, t, ks, j)
                                    af[mi, j] = a_s[ar, ac]
                                em, ek, ew = _e_frag(wrow, mi, g, t, ks)
                                ef[mi] = e_s[em, ek, ew]
                            for ni in T.unroll(nt):
                                for j in T.unroll(4):
                                    br, bc = _b_frag(wcol, ni, g, t, ks, j)
                                    bf[ni, j] = b_s[br, bc]
                            for mi in T.unroll(mt):
                                for ni in T.unroll(nt):
                                    T.ptx[chain](acc[mi, ni, 0], acc[mi, ni, 1], acc[mi, ni, 2], acc[mi, ni, 3],
                                                 af[mi, 0], af[mi, 1], af[mi, 2], af[mi, 3],
                                                 bf[ni, 0], bf[ni, 1], bf[ni, 2], bf[ni, 3],
                                                 acc[mi, ni, 0], acc[mi, ni, 1], acc[mi, ni, 2], acc[mi, ni, 3],
                                                 ef[mi], 0)
                        T.tvm_storage_sync("shared")
                    for mi in T.unroll(mt):
                        for ni in T.unroll(nt):
                            for i in T.unroll(4):
                                r, c = _c_frag(wrow, wcol, mi, ni, g, t, i)
                                out[bx * bn + c, by * bm + r] = T.Cast(s.out_dtype, acc[mi, ni, i] + bias[by * bm + r])

    return f.with_attr({"op_pattern": OPAQUE, "tirx.is_scheduled": True, "tirx.noalias": True})


def _pipelined(s: MmaSpec, chain: str) -> tvm.tirx.PrimFunc:
    """cp.async into `s.stages` shared-memory stages (a load `stages - 1` steps ahead of the
    mma.sp that read it), ldmatrix.x4 for both operands' fragments, one barrier per BK step."""
    M, K, N = s.rows, s.cols, s.tokens  # noqa: N806
    bm, bn = s.tile
    stages, threads, kt = s.stages, s.threads, K // BK
    mt, nt = bm // s.warps_m // 16, bn // s.warps_n // 8
    a_quads, b_quads, e_quads = bm * BK // 16, bn * BK // 8, bm // 16 * (BK // 32) * 4
    a_size, b_size = stages * bm * A_LD, stages * bn * B_LD
    pool_size, lanes = s.smem_bytes // 4, OUT_LANES

    @T.macro
    def load(a_s, b_s, e_s, V32, X32, E, tid, by, bx, stage, ko):  # noqa: ANN001, ANN202, N803
        for it in T.unroll((a_quads + threads - 1) // threads):
            if it * threads + tid < a_quads:
                T.ptx[COPY](T.address_of(a_s[_staged(stage, _a_copy(it * threads + tid, 0))]),
                            T.address_of(V32[_offset(_a_copy(it * threads + tid, 0), by * bm, ko * (BK // 4))]), 16)
        for it in T.unroll((b_quads + threads - 1) // threads):
            if it * threads + tid < b_quads:
                T.ptx[COPY](T.address_of(b_s[_staged(stage, _b_copy(it * threads + tid, 0))]),
                            T.address_of(X32[_offset(_b_copy(it * threads + tid, 0), bx * bn, ko * (BK // 2))]), 16)
        for it in T.unroll((e_quads + threads - 1) // threads):
            if it * threads + tid < e_quads:
                T.ptx[COPY](T.address_of(e_s[_staged(stage, _e_quad(it * threads + tid))]),
                            T.address_of(E[by * (bm // 16) + _e_quad(it * threads + tid)[0],
                                           ko * (BK // 32) + _e_quad(it * threads + tid)[1],
                                           _e_quad(it * threads + tid)[2]]), 16)

    @T.prim_func(private=True)
    def f(X: T.Buffer((N, K), "float16"), V: T.Buffer((M, K // 2), "float16"),
          E: T.Buffer((M // 16, K // 32, 16), "uint32"), bias: T.Buffer((M,), "float32"),
          out: T.Buffer((N, M), s.out_dtype)):
        X32 = T.decl_buffer((N, K // 2), "uint32", data=X.data)
        V32 = T.decl_buffer((M, K // 4), "uint32", data=V.data)
        for by in T.thread_binding(M // bm, "blockIdx.y"):
            for bx in T.thread_binding(N // bn, "blockIdx.x"):
                for tid in T.thread_binding(threads, "threadIdx.x"):
                    # one dynamic pool viewed as three tiles: views keep their padded strides (a
                    # buffer of its own would be compacted to the elements indexed, and the
                    # 16-byte copies and ldmatrix rows index only each row's first word)
                    pool = T.alloc_buffer((pool_size,), "uint32", scope="shared.dyn")
                    a_s = T.decl_buffer((stages, bm, A_LD), "uint32", data=pool.data, scope="shared.dyn")
                    b_s = T.decl_buffer((stages, bn, B_LD), "uint32", data=pool.data, elem_offset=a_size,
                                        scope="shared.dyn")
                    e_s = T.decl_buffer((stages, bm // 16, BK // 32, 16), "uint32", data=pool.data,
                                        elem_offset=a_size + b_size, scope="shared.dyn")
                    c_s = T.decl_buffer((bn, bm + 4), "uint32", data=pool.data, scope="shared.dyn")
                    acc = T.alloc_local((mt, nt, 4), "float32")
                    af = T.alloc_local((mt, 4), "uint32")
                    bf = T.alloc_local((nt, 4), "uint32")
                    ef = T.alloc_local((mt,), "uint32")
                    wrow: T.let = _warp_origin(tid // 32, s)[0]
                    wcol: T.let = _warp_origin(tid // 32, s)[1]
                    lane: T.let = tid % 32
                    for mi, ni, i in T.grid(mt, nt, 4):
                        acc[mi, ni, i] = T.float32(0)
                    for p in T.unroll(stages - 1):
                        if p < kt:
                            load(a_s, b_s, e_s, V32, X32, E, tid, by, bx, p, p)
                        T.ptx["cp.async.commit_group"]()
                    for ko in range(kt):
                        T.ptx["cp.async.wait_group"](stages - 2)
                        # step ko's tiles are in; every warp is past step ko - 1, whose stage the next load reuses
                        T.tvm_storage_sync("shared")
                        if ko + stages - 1 < kt:
                            load(a_s, b_s, e_s, V32, X32, E, tid, by, bx, (ko + stages - 1) % stages, ko + stages - 1)
                        T.ptx["cp.async.commit_group"]()  # empty groups at the tail keep the count uniform
                        for ks in T.unroll(BK // 32):
                            for ni in T.unroll(nt):
                                T.ptx[LDMATRIX](bf[ni, 0], bf[ni, 1], bf[ni, 2], bf[ni, 3],
                                                T.address_of(b_s[_staged(ko % stages, _b_ldm(wcol, ni, lane, ks))]))
                            for mi in T.unroll(mt):
                                T.ptx[LDMATRIX](af[mi, 0], af[mi, 1], af[mi, 2], af[mi, 3],
                                                T.address_of(a_s[_staged(ko % stages, _a_ldm(wrow, mi, lane, ks))]))
                                ef[mi] = e_s[_staged(ko % stages, _e_frag(wrow, mi, lane // 4, lane % 4, ks))]
                            for mi in T.unroll(mt):
                                for ni in T.unroll(nt):
                                    T.ptx[chain](acc[mi, ni, 0], acc[mi, ni, 1], acc[mi, ni, 2], acc[mi, ni, 3],
                                                 af[mi, 0], af[mi, 1], af[mi, 2], af[mi, 3],
                                                 bf[ni, 0], bf[ni, 1], bf[ni, 2], bf[ni, 3],
                                                 acc[mi, ni, 0], acc[mi, ni, 1], acc[mi, ni, 2], acc[mi, ni, 3],
                                                 ef[mi], 0)
                    if s.staged_out:
                        # every warp is done with the stages (the tail's groups are empty); the
                        # pool takes the tile token-major as fp32 bits, row stride bm + 4 words so
                        # lanes g + 8t land on distinct banks, then leaves in coalesced rows of out
                        T.tvm_storage_sync("shared")
                        for mi in T.unroll(mt):
                            for ni in T.unroll(nt):
                                for i in T.unroll(4):
                                    c_s[_c_frag(wrow, wcol, mi, ni, lane // 4, lane % 4, i)[1],
                                        _c_frag(wrow, wcol, mi, ni, lane // 4, lane % 4, i)[0]] = T.reinterpret(
                                        "uint32", acc[mi, ni, i]
                                        + bias[by * bm + _c_frag(wrow, wcol, mi, ni, lane // 4, lane % 4, i)[0]])
                        T.tvm_storage_sync("shared")
                        for it in T.unroll(bm * bn // lanes // threads):
                            for v in T.vectorized(lanes):  # indices inline (see the module docstring)
                                out[bx * bn + _out_chunk(it * threads + tid, bm, lanes)[0],
                                    by * bm + _out_chunk(it * threads + tid, bm, lanes)[1] + v] = T.Cast(
                                    s.out_dtype, T.reinterpret("float32", c_s[_out_chunk(it * threads + tid, bm, lanes)[0],
                                                                              _out_chunk(it * threads + tid, bm, lanes)[1] + v]))
                    else:
                        for mi in T.unroll(mt):
                            for ni in T.unroll(nt):
                                for i in T.unroll(4):
                                    out[bx * bn + _c_frag(wrow, wcol, mi, ni, lane // 4, lane % 4, i)[1],
                                        by * bm + _c_frag(wrow, wcol, mi, ni, lane // 4, lane % 4, i)[0]] = T.Cast(
                                        s.out_dtype,
                                        acc[mi, ni, i] + bias[by * bm + _c_frag(wrow, wcol, mi, ni, lane // 4, lane % 4, i)[0]])

    return f.with_attr({"op_pattern": OPAQUE, "tirx.is_scheduled": True, "tirx.noalias": True})


def build(specs: list[MmaSpec], target: tvm.target.Target, variant: str | None = None) -> tvm.runtime.Module:
    funcs = {s.name: parse(kernel, s, variant).with_attr("global_symbol", s.name) for s in dict.fromkeys(specs)}
    return tvm.compile(tvm.IRModule(funcs), target)


# ---------------------------------------------------------------------------------------------
# numpy model: the kernel's index functions, lane by lane, through mma.sp as the PTX ISA states it
# ---------------------------------------------------------------------------------------------


def _halves(word: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two fp16 of a b32 register, low half first."""
    pair = np.asarray(word, np.uint32).reshape(-1).view(np.float16).reshape(*np.shape(word), 2)
    return pair[..., 0].astype(np.float32), pair[..., 1].astype(np.float32)


def mma_sp_m16n8k32(a: np.ndarray, b: np.ndarray, c: np.ndarray, e: np.ndarray, selector: int = 0) -> np.ndarray:
    """What `mma.sp.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 d, a, b, c, e, selector` computes
    from 32 lanes' registers a (32, 4) b32, b (32, 4) b32, c (32, 4) f32, e (32,) b32, written
    from the PTX ISA fragment tables (groupID = lane >> 2, threadID_in_group = lane % 4):
    A (16 × 16 compressed) a_i: row groupID (+8 for i % 4 >= 2), col 2·tig + i % 2 (+8 for i >= 4);
    B (32 × 8) b_i: row 8·(i // 2) + 2·tig + i % 2, col groupID; C/D c_i: row groupID (+8 for
    i >= 2), col 2·tig + i % 2; metadata from lanes tig = selector·2 + h, h = 0, 1: bits 0-15 are
    the 2-bit positions of compressed cols 8h..8h+7 of row groupID, bits 16-31 of row groupID + 8."""
    dense_a, dense_b, out = np.zeros((16, 32), np.float32), np.zeros((32, 8), np.float32), np.zeros((32, 4), np.float32)
    comp = np.zeros((16, 16), np.float32)
    for lane in range(32):
        gid, tig = lane >> 2, lane % 4
        for i in range(8):
            value = _halves(a[lane, i // 2])[i % 2]
            comp[gid + (8 if i % 4 >= 2 else 0), 2 * tig + i % 2 + (8 if i >= 4 else 0)] = value
            dense_b[8 * (i // 2) + 2 * tig + i % 2, gid] = _halves(b[lane, i // 2])[i % 2]
    for lane in range(32):
        gid, tig = lane >> 2, lane % 4
        if tig // 2 != selector:
            continue
        h = tig % 2
        for half, row in ((0, gid), (1, gid + 8)):
            for j in range(8):
                position = int(e[lane]) >> (16 * half + 2 * j) & 3
                col = 8 * h + j
                dense_a[row, col // 2 * 4 + position] += comp[row, col]
    d = dense_a @ dense_b
    for lane in range(32):
        gid, tig = lane >> 2, lane % 4
        for i in range(4):
            out[lane, i] = c[lane, i] + d[gid + 8 * (i // 2), 2 * tig + i % 2]
    return out


def emulate(s: MmaSpec, x: np.ndarray, values: np.ndarray, meta: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """The kernel run in numpy: each block's shared tiles are filled through `_a_copy` / `_b_copy`
    / `_e_copy`, each lane's registers through `_a_frag` / `_b_frag` / `_e_frag`, each warp's
    step through `mma_sp_m16n8k32`, and the output through `_c_frag`. Slow; for small shapes."""
    M, K, N = s.rows, s.cols, s.tokens  # noqa: N806
    bm, bn = s.tile
    wm, wn = bm // 2, bn // 2
    x32 = np.ascontiguousarray(x, np.float16).view(np.uint32)
    v32 = np.ascontiguousarray(values, np.float16).view(np.uint32)
    if (why := refusal(s)) is not None:
        raise UnsupportedMmaShape(why)
    if s.stages:
        return _emulate_pipelined(s, x32, v32, meta, bias)
    out = np.full((N, M), np.nan, np.float32)
    for by in range(M // bm):
        for bx in range(N // bn):
            acc = np.zeros((THREADS, wm // 16, wn // 8, 4), np.float32)
            for ko in range(K // BK):
                a_s, b_s = np.zeros((bm, A_LD), np.uint32), np.zeros((bn, B_LD), np.uint32)
                e_s = np.zeros((bm // 16, BK // 32, 16), np.uint32)
                for tid in range(THREADS):
                    for it in range(bm * BK // 16 // THREADS):
                        for v in range(4):
                            r, c = _a_copy(it * THREADS + tid, v)
                            a_s[r, c] = v32[by * bm + r, ko * (BK // 4) + c]
                    for it in range(bn * BK // 8 // THREADS):
                        for v in range(4):
                            r, c = _b_copy(it * THREADS + tid, v)
                            b_s[r, c] = x32[bx * bn + r, ko * (BK // 2) + c]
                    for it in range(bm // 16 * (BK // 32) * 16 // THREADS):
                        m16, k32, w = _e_copy(it * THREADS + tid)
                        e_s[m16, k32, w] = meta[by * (bm // 16) + m16, ko * (BK // 32) + k32, w]
                for warp in range(THREADS // 32):
                    tids = np.arange(warp * 32, warp * 32 + 32)
                    wrow, wcol = warp // 2 * wm, warp % 2 * wn
                    for ks in range(BK // 32):
                        for mi in range(wm // 16):
                            a = np.array([[a_s[_a_frag(wrow, mi, lane // 4, lane % 4, ks, j)] for j in range(4)]
                                          for lane in range(32)], np.uint32)
                            e = np.array([e_s[_e_frag(wrow, mi, lane // 4, lane % 4, ks)] for lane in range(32)],
                                         np.uint32)
                            for ni in range(wn // 8):
                                b = np.array([[b_s[_b_frag(wcol, ni, lane // 4, lane % 4, ks, j)] for j in range(4)]
                                              for lane in range(32)], np.uint32)
                                acc[tids, mi, ni] = mma_sp_m16n8k32(a, b, acc[tids, mi, ni], e)
            for tid in range(THREADS):
                warp, lane = tid // 32, tid % 32
                wrow, wcol = warp // 2 * wm, warp % 2 * wn
                for mi in range(wm // 16):
                    for ni in range(wn // 8):
                        for i in range(4):
                            r, c = _c_frag(wrow, wcol, mi, ni, lane // 4, lane % 4, i)
                            out[bx * bn + c, by * bm + r] = acc[tid, mi, ni, i] + bias[by * bm + r]
    return out


def _ldmatrix_x4(tile: np.ndarray, rows: list[tuple]) -> np.ndarray:
    """What `ldmatrix...m8n8.x4.b16` gives 32 lanes (32, 4) b32: register j of lane l is word l % 4
    of the 16-byte row whose address lane 8j + l // 4 supplied (`rows[lane]` = (row, first word))."""
    out = np.zeros((32, 4), np.uint32)
    for lane in range(32):
        for j in range(4):
            r, c = rows[8 * j + lane // 4]
            out[lane, j] = tile[r, c + lane % 4]
    return out


class AsyncCopyModel:
    """cp.async as the PTX ISA orders it: a copy lands only when a `cp.async.wait_group n` retires
    its group (all but the newest n committed), so a stage read early or overwritten too soon shows."""

    def __init__(self) -> None:
        self.pending: list = []
        self.groups: list[list] = []

    def copy(self, tile: np.ndarray, index: tuple, words: np.ndarray) -> None:
        self.pending.append((tile, index, words))

    def commit(self) -> None:
        self.groups.append(self.pending)
        self.pending = []

    def wait(self, n: int) -> None:
        while len(self.groups) > n:
            for tile, (*head, c), words in self.groups.pop(0):
                tile[(*head, slice(c, c + 4))] = words


def _emulate_load(s: MmaSpec, copies: AsyncCopyModel, tiles: tuple, operands: tuple, block: tuple[int, int],
                  stage: int, ko: int) -> None:
    """Every thread's cp.async of K step `ko` into `stage`, through the kernel's copy index functions."""
    (a_s, b_s, e_s), (x32, v32, meta), (by, bx) = tiles, operands, block
    bm, bn = s.tile
    for tid in range(s.threads):
        for q in range(tid, bm * BK // 16, s.threads):
            r, c = _offset(_a_copy(q, 0), by * bm, ko * (BK // 4))
            copies.copy(a_s, _staged(stage, _a_copy(q, 0)), v32[r, c:c + 4])
        for q in range(tid, bn * BK // 8, s.threads):
            r, c = _offset(_b_copy(q, 0), bx * bn, ko * (BK // 2))
            copies.copy(b_s, _staged(stage, _b_copy(q, 0)), x32[r, c:c + 4])
        for q in range(tid, bm // 16 * (BK // 32) * 4, s.threads):
            m16, k32, w = _e_quad(q)
            copies.copy(e_s, _staged(stage, _e_quad(q)), meta[by * (bm // 16) + m16, ko * (BK // 32) + k32, w:w + 4])


def _emulate_pipelined(s: MmaSpec, x32: np.ndarray, v32: np.ndarray, meta: np.ndarray,
                       bias: np.ndarray) -> np.ndarray:
    """The pipelined kernel's schedule in numpy, step for step (prologue, wait, barrier, next
    load, mma.sp on stage ko % stages), fragments through the ldmatrix model."""
    M, K, N = s.rows, s.cols, s.tokens  # noqa: N806
    bm, bn = s.tile
    stages, threads, kt = s.stages, s.threads, K // BK
    mt, nt = bm // s.warps_m // 16, bn // s.warps_n // 8
    out = np.full((N, M), np.nan, np.float32)
    for by, bx in np.ndindex(M // bm, N // bn):
        tiles = (np.zeros((stages, bm, A_LD), np.uint32), np.zeros((stages, bn, B_LD), np.uint32),
                 np.zeros((stages, bm // 16, BK // 32, 16), np.uint32))
        a_s, b_s, e_s = tiles
        copies = AsyncCopyModel()
        acc = np.zeros((threads, mt, nt, 4), np.float32)
        for p in range(stages - 1):
            if p < kt:
                _emulate_load(s, copies, tiles, (x32, v32, meta), (by, bx), p, p)
            copies.commit()
        for ko in range(kt):
            copies.wait(stages - 2)
            if ko + stages - 1 < kt:
                _emulate_load(s, copies, tiles, (x32, v32, meta), (by, bx), (ko + stages - 1) % stages, ko + stages - 1)
            copies.commit()
            st = ko % stages
            for warp in range(threads // 32):
                tids = np.arange(warp * 32, warp * 32 + 32)
                wrow, wcol = _warp_origin(warp, s)
                for ks in range(BK // 32):
                    bf = [_ldmatrix_x4(b_s[st], [_b_ldm(wcol, ni, lane, ks) for lane in range(32)])
                          for ni in range(nt)]
                    for mi in range(mt):
                        a = _ldmatrix_x4(a_s[st], [_a_ldm(wrow, mi, lane, ks) for lane in range(32)])
                        e = np.array([e_s[_staged(st, _e_frag(wrow, mi, lane // 4, lane % 4, ks))]
                                      for lane in range(32)], np.uint32)
                        for ni in range(nt):
                            acc[tids, mi, ni] = mma_sp_m16n8k32(a, bf[ni], acc[tids, mi, ni], e)
        # staged: through a (bn, bm + 4) tile, then chunk by chunk; else straight to out
        c_s = np.full((bn, bm + 4), np.nan, np.float32)
        dest = c_s if s.staged_out else out[bx * bn:(bx + 1) * bn, by * bm:(by + 1) * bm]
        for tid in range(threads):
            wrow, wcol = _warp_origin(tid // 32, s)
            for mi, ni, i in np.ndindex(mt, nt, 4):
                r, c = _c_frag(wrow, wcol, mi, ni, tid % 32 // 4, tid % 4, i)
                dest[c, r] = acc[tid, mi, ni, i] + bias[by * bm + r]
        if s.staged_out:
            lanes = OUT_LANES
            for q in range(bm * bn // lanes):
                row, col = _out_chunk(q, bm, lanes)
                out[bx * bn + row, by * bm + col:by * bm + col + lanes] = c_s[row, col:col + lanes]
    return out


def reference_kernel(s: MmaSpec) -> tvm.tirx.PrimFunc:
    """The same computation and operands for the CPU: a plain loop nest (parallel over tokens)
    that decodes each position from the metadata words. It is what a 2:4 fp16 linear runs
    off the GPU, and a TIR-side check of the `mma24_pack` layout."""
    M, K, N = s.rows, s.cols, s.tokens  # noqa: N806

    @T.prim_func(private=True)
    def f(X: T.Buffer((N, K), "float16"), V: T.Buffer((M, K // 2), "float16"),
          E: T.Buffer((M // 16, K // 32, 16), "uint32"), bias: T.Buffer((M,), "float32"),
          out: T.Buffer((N, M), s.out_dtype)):
        for n in T.parallel(N):
            for m in range(M):
                acc = T.alloc_buffer((1,), "float32", scope="global")
                acc[0] = bias[m]
                for c in range(K // 2):
                    word: T.let = E[m // 16, c // 16, m % 8 * 2 + c % 16 // 8]
                    position: T.let = T.Cast("int32", T.shift_right(word, T.Cast("uint32", m % 16 // 8 * 16 + c % 8 * 2))
                                             & T.uint32(3))
                    acc[0] = acc[0] + T.Cast("float32", V[m, c]) * T.Cast("float32", X[n, c // 2 * 4 + position])
                out[n, m] = T.Cast(s.out_dtype, acc[0])

    return f.with_attr({"op_pattern": OPAQUE, "tirx.is_scheduled": True, "tirx.noalias": True})
