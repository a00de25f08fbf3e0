"""A CPU TIR kernel for LayerNorm over the last axis, with its weight and bias.

TVM's legalization of `relax.nn.layer_norm` under the default schedule runs its reductions as
scalar loops (BERT-base's 128 x 768: 0.10 ms against PyTorch's 0.016, two threads), so the dispatch
sent every LayerNorm to PyTorch, and in the model each such call took 76-94 us (a Python call out of
the VM, its input just written by the kernel before). This kernel takes whole rows, one after the
other, a block of rows per parallel task: two passes over a row held in L1 (the mean, then the
variance around it, as PyTorch does, rather than E[x^2] - E[x]^2, which cancels where the mean is
large against the spread) vectorised over 16 lanes, then a third that writes the normalised row.
Alone, two threads: 128 x 768 12 us (PyTorch 15), pruned ViT's 197 x 384 8 us (14); one thread 23 (28)
and 14 (25). The dispatch times it as LayerNorm's TIR (`pipeline.OWN_LEGALIZE`) and picked it for every
LayerNorm of BERT-base and ViT-B/16; in pruned ViT-B/16 at two threads its 25 LayerNorms took 0.26 ms
against 1.94 on PyTorch (the model, summed over calls: 46.1 -> 44.9 ms).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import tvm
from tvm import relax
from tvm.script import tirx as T

from sparsefx.backends.tvm.sparse.kernels import LANES, OPAQUE, STACK

TASKS = 16  # parallel tasks at most (blocks of whole rows)


@dataclass(frozen=True)
class LayerNormSpec:
    shape: tuple[int, ...]  # the input's (and output's); normalised over the last axis
    epsilon: float

    @property
    def width(self) -> int:
        return self.shape[-1]

    @property
    def rows(self) -> int:
        return math.prod(self.shape[:-1])

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.shape

    @property
    def name(self) -> str:
        eps = f"{self.epsilon:.3g}".replace("-", "m").replace(".", "p").replace("+", "")
        return f"layer_norm_{'x'.join(map(str, self.shape))}_eps{eps}"


def spec_of(call: relax.Call) -> LayerNormSpec | None:
    """The spec of a float32 LayerNorm over the last axis with a weight and a bias of static shape, else None."""
    a, ty = call.attrs, call.args[0].ty
    shape = getattr(ty, "shape", None)
    if str(ty.dtype) != "float32" or shape is None or not all(isinstance(d, tvm.tirx.IntImm) for d in shape):
        return None
    rank = len(shape)
    if len(a.axes) != 1 or int(a.axes[0]) % rank != rank - 1 or not (bool(a.center) and bool(a.scale)):
        return None
    return LayerNormSpec(tuple(int(d) for d in shape), float(a.epsilon))


def kernel(s: LayerNormSpec) -> tvm.tirx.PrimFunc:
    """out = (x - mean) / sqrt(var + eps) * weight + bias, per row of the last axis."""
    rows, width, eps = s.rows, s.width, s.epsilon
    chunks, tasks = width // LANES, min(rows, TASKS)
    inv_width = 1.0 / width

    def row_macro(term):  # noqa: ANN001, ANN202 (a TVMScript macro)
        """A macro putting in total[0] the sum over row r of term(x[r, i], mean)."""
        @T.macro
        def row_total(x, r, mean, acc, total):  # noqa: ANN001, ANN202
            for lane in T.vectorized(LANES):
                acc[lane] = T.float32(0)
            for c in range(chunks):
                for lane in T.vectorized(LANES):
                    acc[lane] = acc[lane] + term(x[r, c * LANES + lane], mean)
            total[0] = T.float32(0)
            for lane in range(LANES):
                total[0] = total[0] + acc[lane]
            for i in range(chunks * LANES, width):  # the columns past the last whole vector
                total[0] = total[0] + term(x[r, i], mean)
        return row_total

    row_sum = row_macro(lambda v, mean: v)
    row_spread = row_macro(lambda v, mean: (v - mean) * (v - mean))

    @T.prim_func(private=True)
    def f(x_in: T.Buffer(s.shape, "float32"), weight: T.Buffer((width,), "float32"),
          bias: T.Buffer((width,), "float32"), out_in: T.Buffer(s.shape, "float32")):
        x = T.decl_buffer((rows, width), "float32", data=x_in.data)
        out = T.decl_buffer((rows, width), "float32", data=out_in.data)
        for t in T.parallel(tasks):
            acc = T.alloc_buffer((LANES,), "float32", scope=STACK)
            total = T.alloc_buffer((1,), "float32", scope=STACK)
            for r in range(t * rows // tasks, (t + 1) * rows // tasks):
                row_sum(x, r, T.float32(0), acc, total)
                mean: T.let = total[0] * T.float32(inv_width)
                row_spread(x, r, mean, acc, total)
                scale: T.let = T.float32(1) / T.sqrt(total[0] * T.float32(inv_width) + T.float32(eps))
                for c in range(chunks):
                    for lane in T.vectorized(LANES):
                        out[r, c * LANES + lane] = (x[r, c * LANES + lane] - mean) * scale * weight[c * LANES + lane] + \
                            bias[c * LANES + lane]
                for i in range(chunks * LANES, width):
                    out[r, i] = (x[r, i] - mean) * scale * weight[i] + bias[i]

    return f.with_attr({"op_pattern": OPAQUE, "tirx.is_scheduled": True, "tirx.noalias": True})
