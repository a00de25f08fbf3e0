"""Depthwise convs in the `blocked` kernels' layout (NCHW16c float32, `blocked_layout`), bias and
activation fused, so that a chain of blocked convs (MobileNetV2's, EfficientNet-B0's) stays in the
layout through its depthwise convs: 16 channels a vector, each task one output row of one block of
channels, 8 output positions at a time in registers, the window's taps off the image read as zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm.script import tirx as T

from sparsefx.backends.tvm.kernels.blocked_layout import BLOCK, blocked, stored
from sparsefx.backends.tvm.kernels.depthwise import ACTIVATIONS, PlaneWindow, activate
from sparsefx.backends.tvm.sparse.kernels import OPAQUE, STACK

FUSES_RESIDUAL = False
POSITIONS = 8  # output positions of a row in registers at once


@dataclass(frozen=True)
class BlockedDepthwiseSpec(PlaneWindow):
    """A depthwise conv (one filter per channel) on NCHW16c activations."""

    activation: str = "none"

    @property
    def nchw_in(self) -> tuple[int, int, int, int]:
        return (self.batch, self.channels, self.height, self.width)

    @property
    def nchw_out(self) -> tuple[int, int, int, int]:
        return (self.batch, self.channels, *self.out_hw)

    @property
    def in_shape(self) -> tuple[int, ...]:
        return blocked(self.nchw_in)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return blocked(self.nchw_out)

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.channels, 1, self.kernel, self.kernel)

    @property
    def arg_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Input (NCHW16c), packed weight [block][tap][16], bias (stored channels), output (NCHW16c)."""
        return (self.in_shape, (stored(self.channels) // BLOCK, self.kernel ** 2, BLOCK), (stored(self.channels),),
                self.out_shape)

    @property
    def name(self) -> str:
        return f"blocked_depthwise_c{self.channels}_{self.height}x{self.width}_k{self.kernel}s{self.stride}" \
               f"p{self.padding}_b{self.batch}_{self.activation}"


def supported(attrs: tuple[int, ...], shapes: tuple[tuple[int, ...], ...]) -> bool:
    """A depthwise conv, square window, equal strides of 1 or 2 and equal padding."""
    s0, s1, p0, p1, d0, d1, groups = attrs
    (_, cin, _, _), (cout, ci, kh, kw) = shapes[:2]
    return groups == cin == cout and ci == 1 and kh == kw and s0 == s1 in (1, 2) and p0 == p1 < kh and d0 == d1 == 1


def spec_of(attrs: tuple[int, ...], shapes: tuple[tuple[int, ...], ...],
            activation: str = "none") -> BlockedDepthwiseSpec:
    (n, c, h, w), (_, _, k, _) = shapes[:2]
    return BlockedDepthwiseSpec(n, c, h, w, k, attrs[0], attrs[2], activation)


def pack_weight(s: BlockedDepthwiseSpec, weight: np.ndarray) -> np.ndarray:
    """(c, 1, k, k) -> [stored c / 16][tap][16], zero past c."""
    taps = np.zeros((stored(s.channels), s.kernel ** 2), np.float32)
    taps[:s.channels] = weight.reshape(s.channels, -1)
    return np.ascontiguousarray(taps.reshape(-1, BLOCK, s.kernel ** 2).transpose(0, 2, 1))


def pack_bias(s: BlockedDepthwiseSpec, bias: np.ndarray) -> np.ndarray:
    return np.pad(np.asarray(bias, np.float32).reshape(-1), (0, stored(s.channels) - s.channels))


def kernel(s: BlockedDepthwiseSpec) -> tvm.tirx.PrimFunc:
    """The scheduled PrimFunc: out = act(depthwise(x, w) + bias), all NCHW16c."""
    assert s.activation in ACTIVATIONS
    k, st, p, h, w = s.kernel, s.stride, s.padding, s.height, s.width
    ho, wo = s.out_hw
    cb = stored(s.channels) // BLOCK
    px = min(POSITIONS, wo)
    blocks = -(-wo // px)

    @T.prim_func(private=True)
    def f(x: T.Buffer(s.arg_shapes[0], "float32"), wt: T.Buffer(s.arg_shapes[1], "float32"),
          bias: T.Buffer(s.arg_shapes[2], "float32"), out: T.Buffer(s.out_shape, "float32")):
        for task in T.parallel(s.batch * cb * ho):
            n: T.let = task // (cb * ho)
            c: T.let = task // ho % cb
            oh: T.let = task % ho
            for b in range(blocks):
                ow0: T.let = T.min(b * px, wo - px)
                acc = T.alloc_buffer((px, BLOCK), "float32", scope=STACK)
                for i in T.unroll(px):
                    for lane in T.vectorized(BLOCK):
                        acc[i, lane] = bias[c * BLOCK + lane]
                for kh in T.unroll(k):
                    ih: T.let = oh * st + kh - p
                    if 0 <= ih and ih < h:
                        for kw in T.unroll(k):
                            for i in T.unroll(px):
                                iw: T.let = (ow0 + i) * st + kw - p
                                for lane in T.vectorized(BLOCK):
                                    acc[i, lane] = acc[i, lane] + wt[c, kh * k + kw, lane] * T.if_then_else(
                                        0 <= iw and iw < w, x[n, c, ih, T.min(T.max(iw, 0), w - 1), lane], T.float32(0))
                for i in T.unroll(px):
                    for lane in T.vectorized(BLOCK):
                        out[n, c, oh, ow0 + i, lane] = activate(acc[i, lane], s.activation)

    return f.with_attr({"op_pattern": OPAQUE, "tirx.is_scheduled": True, "tirx.noalias": True})
