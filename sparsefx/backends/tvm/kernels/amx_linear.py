"""A bf16-weight matrix-vector kernel for Linear layers on a few rows (a classifier at batch 1 to 16), bias and
ReLU fused: in bf16 builds on CPUs with AMX tiles, beside the tile kernels.

At batch 1 a Linear layer streams its weight once and does two flops per weight element: its time is
the weight's bytes over the bandwidth it is read at. PyTorch's bf16 linear (oneDNN, prepacked) read
ResNet-50's 2048 -> 1000 classifier at 7.5-8.7 GB/s in the model (0.46-0.55 ms of 11.3). This kernel
keeps the weight in bf16, packed at compile time into [64-output block][input][64] so each task (one
block) reads one contiguous run, widens each 16 bf16 to float32 as it loads them, and accumulates
64 outputs per row in registers over the inputs, 4 rows a pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import tvm
from tvm.script import tirx as T

from sparsefx.backends.tvm.kernels.amx import bf16_bits
from sparsefx.backends.tvm.kernels.depthwise import activate, blocks_starting
from sparsefx.backends.tvm.kernels.linear import LinearShape
from sparsefx.backends.tvm.kernels.tile_layout import to_float
from sparsefx.backends.tvm.sparse.kernels import LANES, OPAQUE, STACK
from sparsefx.cost.kernel import Kernel

BLOCK = 64  # outputs per task, in registers (four vectors)
PASS_ROWS = 4  # rows (the matmul's m) kept in registers at once; more rows take more passes over the
# block's weight, the later ones from cache (ResNet-50's classifier at 8 images: PyTorch's bf16 linear
# took 1.97 ms in the model, OpenVINO's 0.79)
MAX_ROWS = 16  # more go to oneDNN's kernels
ACTIVATIONS = ("none", "relu")


@dataclass(frozen=True)
class LinearSpec(LinearShape):
    block: ClassVar[int] = BLOCK
    kind: ClassVar[str] = "amx_linear"

    @property
    def arg_dtypes(self) -> tuple[str, ...]:
        return ("float32", "uint16", "float32", "float32")


def supported(kernel: Kernel) -> bool:
    """A 2-D matmul of a few rows by a weight with at least one whole block of outputs."""
    if kernel.op != "matmul":
        return False
    batch, m, _, n = kernel.dims
    return batch == 1 and m <= MAX_ROWS and n >= BLOCK


def spec_of(kernel: Kernel, activation: str = "none") -> LinearSpec:
    _, m, k, n = kernel.dims
    return LinearSpec(m, k, n, activation)


def pack_weight(s: LinearSpec, weight: np.ndarray) -> np.ndarray:
    """(inputs, outputs) float32 -> bf16 bits [block][input][64], block b holding outputs from
    min(64 b, outputs - 64) on (the last block shifted back, its overlap computed twice)."""
    return np.ascontiguousarray(np.stack([bf16_bits(weight[:, c:c + BLOCK]) for c in blocks_starting(s.outputs, BLOCK)]))


def kernel(s: LinearSpec) -> tvm.tirx.PrimFunc:
    """out = act(x @ w + bias)."""
    m, k, n = s.rows, s.inputs, s.outputs
    rows = min(m, PASS_ROWS)
    passes = -(-m // rows)

    @T.prim_func(private=True)
    def f(x: T.Buffer((m, k), "float32"), w: T.Buffer((s.blocks, k, BLOCK), "uint16"),
          bias: T.Buffer((n,), "float32"), out: T.Buffer((m, n), "float32")):
        for b in T.parallel(s.blocks):
            c0: T.let = T.min(b * BLOCK, n - BLOCK)
            for p in range(passes):
                r0: T.let = T.min(p * rows, m - rows)  # a last pass moved back: its overlap computed twice
                acc = T.alloc_buffer((rows, BLOCK), "float32", scope=STACK)
                for r in T.unroll(rows):
                    for lane in T.vectorized(BLOCK):
                        acc[r, lane] = T.float32(0)
                for i in range(k):
                    for r in T.unroll(rows):
                        for v in T.unroll(BLOCK // LANES):
                            for lane in T.vectorized(LANES):
                                acc[r, v * LANES + lane] = acc[r, v * LANES + lane] + x[r0 + r, i] * to_float(
                                    w[b, i, v * LANES + lane])
                for r in T.unroll(rows):
                    for lane in T.vectorized(BLOCK):
                        out[r0 + r, c0 + lane] = activate(acc[r, lane] + bias[c0 + lane], s.activation)

    return f.with_attr({"op_pattern": OPAQUE, "tirx.is_scheduled": True, "tirx.noalias": True})
