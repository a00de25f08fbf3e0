"""A float32 CPU TIR kernel for Linear layers over many rows (tokens, or the pixels of a channels-last
map), bias and ReLU/GELU fused.

ConvNeXt's blocks run their two 1x1 convs as Linear layers on a channels-last map, and pruning leaves
them few input channels: at 56x56 and half the channels, 3136 rows x 48 -> 192 with its GELU took
0.94 ms on PyTorch in the model, one thread (31 GMAC/s: MKL's matmul, then the bias, then GELU as a
pass of its own over the output). Here each task keeps 6 rows x 64 outputs in registers (24 AVX-512
accumulators, as the blocked conv does; 14 rows x 32 where 64-output blocks would waste more), the
weight repacked at compile time as [output block][input][64]: per input, four vector loads of the
block's weights and one broadcast per row, the reduction unrolled by 4. 6 x 64 against 14 x 32, one
thread, alone: ViT's 197 x 768 -> 2304 4.49 against 5.06 ms (MKL's addmm 4.81), 3136 x 48 -> 192
0.34 against 0.46, 128 x 768 -> 3072 4.32 against 5.11; in the model ViT-B/16 0.979 (one thread)
and 0.961 (two), ConvNeXt-T pruned 0.935 (one). The
bias and the activation are applied in registers before the store; GELU's erf as the rational
approximation TVM's `fast_erf` uses (Eigen's), vectorised, where libm's erf is a scalar call
(`depthwise.activate`, the activations every kernel applies).
The last block of rows and of outputs is shifted back to end at the edge (its overlap computed twice).
Fewer rows than a block (a classifier at batch 1-14) are one block of all of them: each weight read
once, a stream per task (pruned ResNet-18's 256 -> 1000 classifier at two threads: 0.146 ms on
PyTorch in the model, 0.021 here).
The dispatch times it on the bare matmul beside PyTorch's (MKL, or oneDNN on a prepacked weight).

Alone, one thread, with the activation: 3136 x 48 -> 192 + GELU 0.65 ms (PyTorch MKL + GELU 0.94 in the
model, oneDNN prepacked 0.69), 784 x 384 -> 96 0.32 (0.36), 196 x 768 -> 192 0.32 (0.40). Whole models,
same-process A/B against the tree before (each compiled on its own fresh cache): ConvNeXt-T pruned 50%
0.72-0.79 (two threads / one), dense 0.89-0.97; ViT-B/16 pruned 0.94-0.96, dense 0.96-0.99 (two threads);
BERT-base 0.97-1.00.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import tvm
from tvm.script import tirx as T

from sparsefx.backends.tvm.kernels.depthwise import activate, blocks_starting
from sparsefx.backends.tvm.sparse.kernels import LANES, OPAQUE, STACK
from sparsefx.cost.kernel import Kernel

BLOCK = 2 * LANES  # outputs per block where a wide block would waste more of its outputs (two vectors)
WIDE = 4 * LANES  # outputs per block otherwise (four vectors)
ROWS = {BLOCK: 14, WIDE: 6}  # rows per block by its width: 28 or 24 accumulators
UNROLL = 4  # inputs per step of the reduction loop
TASKS = 16  # parallel tasks at least, where there are enough row blocks
# each row block re-reads its output block's weight (inputs x block floats): past 1536 inputs it ran slower
# than PyTorch's (ViT's 3072 -> 768 at 197 rows: 7.1 ms against 6.4, one thread) and, past 512 on the
# narrow block, 15-17% slower in the model than timed (pruned BERT-base's 768 -> 1536). Up to 1536 the
# dispatch times both: pruned BERT-base's 1536 -> 768 at 128 rows, two threads, took 1.31 ms here against
# PyTorch's addmm 1.69 alone, and 1.233 against PyTorch's prepacked 1.267 in the model (one thread:
# 2.34 against 2.21 alone, and PyTorch's is chosen)
MAX_INPUTS = 1536
ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh")


@dataclass(frozen=True)
class LinearShape:
    """A Linear layer as a matmul kernel sees it (this one's spec and `amx_linear`'s): rows (the
    matmul's m, leading dimensions flattened), inputs, outputs and the activation fused; the kernel's
    weight in blocks of `block` outputs, [block][input][outputs of the block]."""

    rows: int
    inputs: int
    outputs: int
    activation: str = "none"
    block: ClassVar[int] = BLOCK
    kind: ClassVar[str] = "linear"

    @property
    def blocks(self) -> int:
        return -(-self.outputs // self.block)

    @property
    def out_shape(self) -> tuple[int, int]:
        return (self.rows, self.outputs)

    @property
    def arg_shapes(self) -> tuple[tuple[int, ...], ...]:
        return ((self.rows, self.inputs), (self.blocks, self.inputs, self.block), (self.outputs,), self.out_shape)

    @property
    def name(self) -> str:
        return f"{self.kind}_{self.rows}x{self.inputs}to{self.outputs}_{self.activation}"

    @property
    def weight_shape(self) -> tuple[int, int]:
        """The Relax matmul's constant operand: (inputs, outputs)."""
        return (self.inputs, self.outputs)


@dataclass(frozen=True)
class LinearSpec(LinearShape):
    @property
    def block(self) -> int:  # type: ignore[override]
        """Outputs per block: four vectors (6 rows x 64, the blocked conv's register block), unless
        two waste fewer outputs past the layer's (96 outputs are 3 narrow blocks, 2 wide ones a
        third wasted: 784 x 384 -> 96 0.37 ms narrow, 0.45 wide)."""
        waste = {width: -(-self.outputs // width) * width - self.outputs for width in (WIDE, BLOCK)}
        return WIDE if waste[WIDE] <= waste[BLOCK] and self.outputs >= WIDE else BLOCK

    @property
    def block_rows(self) -> int:
        """Rows in registers: the block width's, or all of them when fewer (a classifier's batch)."""
        return min(ROWS[self.block], self.rows)

    @property
    def row_blocks(self) -> int:
        return -(-self.rows // self.block_rows)


def supported(kernel: Kernel) -> bool:
    """A matmul by a weight (batch 1) of a whole output block at least, and either rows few enough
    for one row block (each weight read once: a classifier) or inputs few enough for an output
    block's weight to stay in cache."""
    if kernel.op != "matmul":
        return False
    batch, m, k, n = kernel.dims
    return batch == 1 and n >= BLOCK and (m <= ROWS[BLOCK] or k <= MAX_INPUTS)


def spec_of(kernel: Kernel, activation: str = "none") -> LinearSpec:
    _, m, k, n = kernel.dims
    return LinearSpec(m, k, n, activation)


def pack_weight(s: LinearSpec, weight: np.ndarray) -> np.ndarray:
    """(inputs, outputs) -> [block][input][width], block b holding outputs from min(width b, outputs - width) on."""
    return np.ascontiguousarray(np.stack([weight[:, c:c + s.block] for c in blocks_starting(s.outputs, s.block)]),
                                dtype=np.float32)


def kernel(s: LinearSpec) -> tvm.tirx.PrimFunc:
    """out = act(x @ w + bias)."""
    m, k, n = s.rows, s.inputs, s.outputs
    blocks, row_blocks, rows, width = s.blocks, s.row_blocks, s.block_rows, s.block
    groups = min(row_blocks, -(-TASKS // blocks))  # row groups per output block
    steps = k // UNROLL * UNROLL

    @T.macro
    def step(acc, x, w, r0, b, j):  # noqa: ANN001, ANN202
        for r in T.unroll(rows):
            for lane in T.vectorized(width):
                acc[r, lane] = acc[r, lane] + x[r0 + r, j] * w[b, j, lane]

    @T.prim_func(private=True)
    def f(x: T.Buffer((m, k), "float32"), w: T.Buffer((blocks, k, width), "float32"),
          bias: T.Buffer((n,), "float32"), out: T.Buffer((m, n), "float32")):
        for t in T.parallel(groups * blocks):
            g: T.let = t // blocks
            b: T.let = t % blocks
            c0: T.let = T.min(b * width, n - width)
            for i in range(g * row_blocks // groups, (g + 1) * row_blocks // groups):
                r0: T.let = T.min(i * rows, m - rows)
                acc = T.alloc_buffer((rows, width), "float32", scope=STACK)
                for r in T.unroll(rows):
                    for lane in T.vectorized(width):
                        acc[r, lane] = bias[c0 + lane]
                for j0 in range(steps // UNROLL):
                    for ju in T.unroll(UNROLL):
                        step(acc, x, w, r0, b, j0 * UNROLL + ju)
                for j in range(steps, k):
                    step(acc, x, w, r0, b, j)
                for r in T.unroll(rows):
                    for lane in T.vectorized(width):
                        out[r0 + r, c0 + lane] = activate(acc[r, lane], s.activation)

    return f.with_attr({"op_pattern": OPAQUE, "tirx.is_scheduled": True, "tirx.noalias": True})
