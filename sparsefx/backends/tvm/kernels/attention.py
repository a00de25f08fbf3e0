"""A float32 CPU TIR kernel for attention (PyTorch's scaled-dot-product attention, Relax's `nn.attention`):
scores, softmax and the weighted sum of values in one pass per block of queries, the scores kept in cache.

PyTorch's CPU SDPA (its flash kernel) ran ViT-B/16's attention (12 heads x 197 tokens x 64) at 1.75 ms a
layer on one thread of an AMD EPYC Zen 4, 67 GFLOP/s, a tenth of pruned ViT-B/16's run, while OpenVINO's
fused attention took about half of that. Here the queries run in the vector lanes: a task (image, head,
block of 16 x `vectors` queries) copies its queries transposed and scaled ([head dim][queries], the one
transposition, of the smallest operand), then
- scores^T [key][queries]: a register block of `KEY_ROWS` keys x the query vectors accumulates over the
  head dim, each key's element broadcast from where the model left it (q, k, v are read in place, in
  Relax's (batch, seq, heads, dim) layout);
- softmax down the key axis, every step a whole vector of queries: max, exp (`depthwise.fast_exp`,
  vectorised; libm's is a scalar call per lane), sum, all float32;
- out^T [value dim][queries]: a register block of value-dim rows x the query vectors accumulates over
  the keys (each value broadcast, the probabilities loaded as vectors), times 1 / sum at the store,
  then written out per query in the model's layout.
The last block of queries, keys and value rows is shifted back to end at the edge (its overlap computed
twice, stored alike). A bias (BERT's mask, of the scores' full shape) is added as the scores are stored,
a causal mask (top left, as PyTorch's `is_causal`) sets later keys to a large negative.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import tvm
from tvm.script import tirx as T

from sparsefx.backends.tvm.kernels.depthwise import fast_exp
from sparsefx.backends.tvm.sparse.kernels import LANES, OPAQUE, STACK
from sparsefx.cost.kernel import Kernel

# register blocks by query vectors: keys (scores) and value-dim rows (output) held for 2 or 4 vectors of
# queries, 24 accumulators either way
KEY_ROWS = {2: 12, 4: 6}
MAX_SCORES = 1 << 16  # keys x queries of a task's scores (256 KiB): longer sequences stay on PyTorch
MASKED = -3.0e38  # a causally masked score: exp(MASKED - max) is 0 without an infinity


@dataclass(frozen=True)
class AttentionSpec:
    batch: int
    seq: int
    heads: int
    dim: int
    seq_kv: int
    dim_v: int
    scale: float  # 0: 1 / sqrt(dim)
    causal: bool = False
    bias: bool = False
    kind: ClassVar[str] = "attention"

    @property
    def vectors(self) -> int:
        """Query vectors per task: 4 where they waste no more of the sequence than 2 do."""
        waste = {v: -(-self.seq // (v * LANES)) * v * LANES - self.seq for v in KEY_ROWS}
        return 4 if waste[4] <= waste[2] and self.seq >= 4 * LANES else 2

    @property
    def queries(self) -> int:
        return self.vectors * LANES

    @property
    def value_rows(self) -> int:
        """Value-dim rows per register block: the widest that divides the value dim, unless the widest
        block (its last one shifted back) is more than twice as wide."""
        widest = KEY_ROWS[self.vectors]
        dividing = max(r for r in range(1, widest + 1) if self.dim_v % r == 0)
        return dividing if 2 * dividing >= widest or dividing == self.dim_v else min(widest, self.dim_v)

    @property
    def factor(self) -> float:
        return self.scale or 1 / math.sqrt(self.dim)

    @property
    def out_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.seq, self.heads, self.dim_v)

    @property
    def arg_shapes(self) -> tuple[tuple[int, ...], ...]:
        b, s, n, s_kv = self.batch, self.seq, self.heads, self.seq_kv
        shapes = [(b, s, n, self.dim), (b, s_kv, n, self.dim), (b, s_kv, n, self.dim_v)]
        return (*shapes, *([(b, n, s, s_kv)] if self.bias else []), self.out_shape)

    @property
    def name(self) -> str:
        scale = f"{self.scale:.6g}".replace(".", "p").replace("-", "m") if self.scale else "d"
        return (f"attention_{self.batch}x{self.seq}x{self.heads}x{self.dim}_{self.seq_kv}x{self.dim_v}_s{scale}"
                f"{'_causal' if self.causal else ''}{'_bias' if self.bias else ''}")


def supported(kernel: Kernel) -> bool:
    """Attention over at least two vectors of queries and a register block of keys and value rows,
    whose scores per task fit `MAX_SCORES` (a decode step's single query stays on PyTorch)."""
    if kernel.op != "attention":
        return False
    _, s, _, _, s_kv, d_v = kernel.dims
    return s >= 2 * LANES and s_kv >= KEY_ROWS[2] and d_v >= 4 and s_kv * 4 * LANES <= MAX_SCORES


def spec_of(kernel: Kernel) -> AttentionSpec:
    scale, causal, bias = kernel.attrs
    return AttentionSpec(*kernel.dims, scale, bool(causal), bool(bias))


def kernel(s: AttentionSpec) -> tvm.tirx.PrimFunc:
    """out = softmax(q k^T * scale [+ bias] [causal]) v, per image and head."""
    b_, sq, heads, d, s_kv, d_v = s.batch, s.seq, s.heads, s.dim, s.seq_kv, s.dim_v
    vecs, m, rows, cols = s.vectors, s.queries, KEY_ROWS[s.vectors], s.value_rows
    q_blocks, k_blocks, v_blocks = -(-sq // m), -(-s_kv // rows), -(-d_v // cols)
    factor = s.factor

    @T.macro
    def cleared(acc, count):  # noqa: ANN001, ANN202 (a TVMScript macro): a register block of `count` rows x the query vectors, zeroed
        for r in T.unroll(count):
            for v in T.unroll(vecs):
                for lane in T.vectorized(LANES):
                    acc[r, v, lane] = T.float32(0)

    @T.macro
    def scores(q0, n, h, k, st, qt, bias):  # noqa: ANN001, ANN202 (a TVMScript macro): st = (q k^T) [+ bias], [key][query]
        for kb in range(k_blocks):
            k0: T.let = T.min(kb * rows, s_kv - rows)
            acc = T.alloc_buffer((rows, vecs, LANES), "float32", scope=STACK)
            cleared(acc, rows)
            for j in range(d):
                for r in T.unroll(rows):
                    for v in T.unroll(vecs):
                        for lane in T.vectorized(LANES):
                            acc[r, v, lane] = acc[r, v, lane] + k[n, k0 + r, h, j] * qt[j, v * LANES + lane]
            for r in T.unroll(rows):
                for v in T.unroll(vecs):
                    for lane in T.vectorized(LANES):
                        if T.bool(s.bias):
                            acc[r, v, lane] = acc[r, v, lane] + bias[n, h, q0 + v * LANES + lane, k0 + r]
                        if T.bool(s.causal):
                            acc[r, v, lane] = T.if_then_else(k0 + r > q0 + v * LANES + lane, T.float32(MASKED),
                                                             acc[r, v, lane])
                        st[k0 + r, v * LANES + lane] = acc[r, v, lane]

    @T.macro
    def softmax(st, inv):  # noqa: ANN001, ANN202 (a TVMScript macro): st = exp(st - max) down the keys, inv = 1 / sum
        top = T.alloc_buffer((m,), "float32", scope=STACK)
        total = T.alloc_buffer((m,), "float32", scope=STACK)
        for lane in T.vectorized(m):
            top[lane] = st[0, lane]
            total[lane] = T.float32(0)
        for key in range(1, s_kv):
            for lane in T.vectorized(m):
                top[lane] = T.max(top[lane], st[key, lane])
        for key in range(s_kv):
            for lane in T.vectorized(m):
                st[key, lane] = fast_exp(st[key, lane] - top[lane])
                total[lane] = total[lane] + st[key, lane]
        for lane in T.vectorized(m):
            inv[lane] = T.float32(1) / total[lane]

    @T.macro
    def weighted(v, st, inv, ot, n, h):  # noqa: ANN001, ANN202 (a TVMScript macro): ot = (p v)^T / sum, [value dim][query]
        for cb in range(v_blocks):
            c0: T.let = T.min(cb * cols, d_v - cols)
            acc = T.alloc_buffer((cols, vecs, LANES), "float32", scope=STACK)
            cleared(acc, cols)
            for key in range(s_kv):
                for c in T.unroll(cols):
                    for w in T.unroll(vecs):
                        for lane in T.vectorized(LANES):
                            acc[c, w, lane] = acc[c, w, lane] + v[n, key, h, c0 + c] * st[key, w * LANES + lane]
            for c in T.unroll(cols):
                for w in T.unroll(vecs):
                    for lane in T.vectorized(LANES):
                        ot[c0 + c, w * LANES + lane] = acc[c, w, lane] * inv[w * LANES + lane]

    @T.macro
    def body(q, k, v, bias, out):  # noqa: ANN001, ANN202
        for t in T.parallel(b_ * heads * q_blocks):
            n: T.let = t // (heads * q_blocks)
            h: T.let = t // q_blocks % heads
            q0: T.let = T.min(t % q_blocks * m, sq - m)
            qt = T.alloc_buffer((d, m), "float32", scope=STACK)
            st = T.alloc_buffer((s_kv, m), "float32")
            inv = T.alloc_buffer((m,), "float32", scope=STACK)
            ot = T.alloc_buffer((d_v, m), "float32", scope=STACK)
            for i in range(m):
                for j in T.vectorized(d):
                    qt[j, i] = q[n, q0 + i, h, j] * T.float32(factor)
            scores(q0, n, h, k, st, qt, bias)
            softmax(st, inv)
            weighted(v, st, inv, ot, n, h)
            for i in range(m):
                for c in T.vectorized(d_v):
                    out[n, q0 + i, h, c] = ot[c, i]

    q_shape, k_shape, v_shape = s.arg_shapes[:3]
    if s.bias:
        @T.prim_func(private=True)
        def f(q: T.Buffer(q_shape, "float32"), k: T.Buffer(k_shape, "float32"), v: T.Buffer(v_shape, "float32"),
              bias: T.Buffer(s.arg_shapes[3], "float32"), out: T.Buffer(s.out_shape, "float32")):
            body(q, k, v, bias, out)
    else:
        @T.prim_func(private=True)
        def f(q: T.Buffer(q_shape, "float32"), k: T.Buffer(k_shape, "float32"), v: T.Buffer(v_shape, "float32"),
              out: T.Buffer(s.out_shape, "float32")):
            body(q, k, v, q, out)  # no bias: its branch is never taken, `q` stands in
    return f.with_attr({"op_pattern": OPAQUE, "tirx.is_scheduled": True, "tirx.noalias": True})
