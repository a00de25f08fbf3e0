"""The layout sparsefx's `blocked` conv kernels take and give: NCHW16c, float32.

Channels in blocks of 16 (one AVX-512 vector), each position's 16 channels contiguous:
(n, c / 16, h, w, 16), zero past the tensor's own channels (`stored`). Conversions to and from
NCHW (`to_blocked`, `from_blocked`) sit at the edges of a chain of blocked kernels
(`layout_chain` drops those between two of them) and the ops it runs in the layout.
"""

from __future__ import annotations

import tvm
from tvm.script import tirx as T

from sparsefx.backends.tvm.sparse.kernels import OPAQUE, STACK

BLOCK = 16
TO_BLOCKED, FROM_BLOCKED = "blocked_in", "blocked_out"  # names start with the kind profiles file them under


def stored(channels: int) -> int:
    """The channels a tensor of `channels` has in this layout."""
    return -(-channels // BLOCK) * BLOCK


def blocked(shape: tuple[int, int, int, int]) -> tuple[int, int, int, int, int]:
    """The shape of an NCHW tensor in this layout."""
    n, c, h, w = shape
    return (n, stored(c) // BLOCK, h, w, BLOCK)


def to_blocked(shape: tuple[int, int, int, int]) -> tvm.tirx.PrimFunc:
    """float32 (n, c, h, w) -> (n, c / 16, h, w, 16), zero past c."""
    n, c, h, w = shape
    cb = stored(c) // BLOCK

    @T.prim_func(private=True, s_tir=True)
    def f(x: T.Buffer(shape, "float32"), out: T.Buffer(blocked(shape), "float32")):
        with T.sblock("root"):  # TVM's reshape check (RewriteDataflowReshape) wants a root block
            for i in T.parallel(n * cb * h):
                for col in range(w):
                    for lane in T.vectorized(BLOCK):
                        out[i // (cb * h), i // h % cb, i % h, col, lane] = T.if_then_else(
                            i // h % cb * BLOCK + lane < c,
                            x[i // (cb * h), T.min(i // h % cb * BLOCK + lane, c - 1), i % h, col], T.float32(0))

    return f.with_attr({"op_pattern": OPAQUE, "tirx.is_scheduled": True, "tirx.noalias": True})


def from_blocked(shape: tuple[int, int, int, int]) -> tvm.tirx.PrimFunc:
    """(n, c / 16, h, w, 16) -> float32 (n, c, h, w)."""
    n, c, h, w = shape
    lanes = BLOCK if w >= BLOCK else w

    @T.prim_func(private=True, s_tir=True)
    def f(x: T.Buffer(blocked(shape), "float32"), out: T.Buffer(shape, "float32")):
        with T.sblock("root"):
            for i in T.parallel(n * c):
                for row in range(h):
                    for c0 in range(-(-w // lanes)):
                        for lane in T.vectorized(lanes):
                            col: T.let = T.min(c0 * lanes, w - lanes) + lane
                            out[i // c, i % c, row, col] = x[i // c, i % c // BLOCK, row, col, i % c % BLOCK]

    return f.with_attr({"op_pattern": OPAQUE, "tirx.is_scheduled": True, "tirx.noalias": True})


def max_pool(shape: tuple[int, int, int, int], out_hw: tuple[int, int], window: int, stride: int,
             padding: int) -> tvm.tirx.PrimFunc:
    """max_pool2d of an NCHW `shape` tensor held in this layout, 16 channels a vector."""
    n, c, h, w = shape
    ho, wo = out_hw
    cb = stored(c) // BLOCK

    @T.prim_func(private=True, s_tir=True)
    def f(x: T.Buffer(blocked(shape), "float32"), out: T.Buffer(blocked((n, c, ho, wo)), "float32")):
        with T.sblock("root"):
            for i in T.parallel(n * cb * ho):
                best = T.alloc_buffer((BLOCK,), "float32", scope=STACK)
                for col in range(wo):
                    for lane in T.vectorized(BLOCK):
                        best[lane] = T.float32(float("-inf"))
                    for kh in range(window):
                        for kw in range(window):
                            row: T.let = i % ho * stride - padding + kh
                            column: T.let = col * stride - padding + kw
                            if 0 <= row and row < h and 0 <= column and column < w:
                                for lane in T.vectorized(BLOCK):
                                    best[lane] = T.max(best[lane], x[i // (cb * ho), i // ho % cb, row, column, lane])
                    for lane in T.vectorized(BLOCK):
                        out[i // (cb * ho), i // ho % cb, i % ho, col, lane] = best[lane]

    return f.with_attr({"op_pattern": OPAQUE, "tirx.is_scheduled": True, "tirx.noalias": True})


def scale(shape: tuple[int, int, int, int]) -> tvm.tirx.PrimFunc:
    """An NCHW `shape` tensor held in this layout times a scale per image and channel, (n, c, 1, 1)
    (squeeze-and-excitation's `x * s`); the stored channels past c stay zero."""
    n, c, h, w = shape
    cb = stored(c) // BLOCK

    @T.prim_func(private=True, s_tir=True)
    def f(x: T.Buffer(blocked(shape), "float32"), s: T.Buffer((n, c, 1, 1), "float32"),
          out: T.Buffer(blocked(shape), "float32")):
        with T.sblock("root"):
            for i in T.parallel(n * cb):
                factor = T.alloc_buffer((BLOCK,), "float32", scope=STACK)
                for lane in range(BLOCK):
                    factor[lane] = T.if_then_else(i % cb * BLOCK + lane < c,
                                                  s[i // cb, T.min(i % cb * BLOCK + lane, c - 1), 0, 0], T.float32(0))
                for p in range(h * w):
                    for lane in T.vectorized(BLOCK):
                        out[i // cb, i % cb, p // w, p % w, lane] = x[i // cb, i % cb, p // w, p % w, lane] * factor[lane]

    return f.with_attr({"op_pattern": OPAQUE, "tirx.is_scheduled": True, "tirx.noalias": True})


def mean(shape: tuple[int, int, int, int]) -> tvm.tirx.PrimFunc:
    """The mean over each image's positions of an NCHW `shape` tensor held in this layout, as
    float32 (n, c, 1, 1) (a global average pool)."""
    n, c, h, w = shape
    cb = stored(c) // BLOCK

    @T.prim_func(private=True, s_tir=True)
    def f(x: T.Buffer(blocked(shape), "float32"), out: T.Buffer((n, c, 1, 1), "float32")):
        with T.sblock("root"):
            for i in T.parallel(n * cb):
                total = T.alloc_buffer((BLOCK,), "float32", scope=STACK)
                for lane in T.vectorized(BLOCK):
                    total[lane] = T.float32(0)
                for p in range(h * w):
                    for lane in T.vectorized(BLOCK):
                        total[lane] = total[lane] + x[i // cb, i % cb, p // w, p % w, lane]
                for lane in range(BLOCK):
                    if i % cb * BLOCK + lane < c:
                        out[i // cb, i % cb * BLOCK + lane, 0, 0] = total[lane] / T.float32(h * w)

    return f.with_attr({"op_pattern": OPAQUE, "tirx.is_scheduled": True, "tirx.noalias": True})
