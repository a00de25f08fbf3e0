"""Depthwise convs in the AMX kernels' layout (NHWC bf16, `tile_layout`), bias and activation fused.

A depthwise conv has no reduction over channels for the tiles to run, but between two AMX convs
(MobileNetV2's expansion and projection) it would break their chain: converting out of the layout
and back costs about what the conv does. It runs here on AVX-512 instead, in the same layout:
16 channels a vector, a block of `PIXELS` output positions of one row held in registers over the
window's taps, bf16 widened to float32 as it is loaded and rounded back as it is stored; taps
off the image read zero (no padded copy: the input is read once).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import tirx
from tvm.script import tirx as T

from sparsefx.backends.tvm.kernels.depthwise import activate
from sparsefx.backends.tvm.kernels.tile_layout import FEW, TileConv, to_bf16_vector, to_float
from sparsefx.backends.tvm.sparse.kernels import LANES, OPAQUE, STACK

FUSES_RESIDUAL = False
PIXELS = 8  # output positions of a row per register block


@dataclass(frozen=True)
class AmxDepthwiseSpec(TileConv):
    """A depthwise conv (`cin` == `cout`, one filter per channel)."""

    @property
    def channels(self) -> int:
        return self.cin

    @property
    def stored(self) -> int:
        return self.cin_stored

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.channels, 1, self.kernel, self.kernel)

    @property
    def arg_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Input (NHWC bf16 bits), weight [channel block][tap][16] float32, bias, output."""
        return ((self.batch, self.height, self.width, self.stored), (self.stored // LANES, self.kernel ** 2, LANES),
                (self.stored,), self.out_shape)

    @property
    def arg_dtypes(self) -> tuple[str, ...]:
        return ("uint16", "float32", "float32", "uint16")

    @property
    def name(self) -> str:
        return f"amx_depthwise_{self.channels}_{self.height}x{self.width}_k{self.kernel}s{self.stride}" \
               f"p{self.padding}_b{self.batch}_{self.activation}"


def supported(attrs: tuple[int, ...], shapes: tuple[tuple[int, ...], ...]) -> bool:
    """A depthwise conv (one filter per channel), square window, equal strides of 1 or 2 and padding,
    on channels the layout stores in whole steps."""
    s0, s1, p0, p1, d0, d1, groups = attrs
    (_, cin, _, _), (cout, ci, kh, kw) = shapes[:2]
    return groups == cin == cout > FEW and ci == 1 and kh == kw and s0 == s1 in (1, 2) and p0 == p1 < kh \
        and d0 == d1 == 1


def spec_of(attrs: tuple[int, ...], shapes: tuple[tuple[int, ...], ...], activation: str = "none") -> AmxDepthwiseSpec:
    (n, c, h, w), (_, _, k, _) = shapes[:2]
    return AmxDepthwiseSpec(n, c, c, h, w, k, attrs[0], attrs[2], activation)


def pack_weight(s: AmxDepthwiseSpec, weight: np.ndarray) -> np.ndarray:
    """(c, 1, k, k) -> [stored c / 16][tap][16], zero past c."""
    taps = np.zeros((s.stored, s.kernel ** 2), np.float32)
    taps[:s.channels] = weight.reshape(s.channels, -1)
    return np.ascontiguousarray(taps.reshape(s.stored // LANES, LANES, -1).transpose(0, 2, 1))


def pack_bias(s: AmxDepthwiseSpec, bias: np.ndarray) -> np.ndarray:
    return np.pad(np.asarray(bias, np.float32).reshape(-1), (0, s.stored - s.channels))


def kernel(s: AmxDepthwiseSpec) -> tvm.tirx.PrimFunc:
    """The scheduled PrimFunc: out = act(depthwise(x, w) + bias), NHWC."""
    k, st, p, h, w = s.kernel, s.stride, s.padding, s.height, s.width
    ho, wo = s.out_hw
    cs = s.stored
    px = min(PIXELS, wo)
    blocks = -(-wo // px)

    @T.prim_func(private=True)
    def f(x: T.Buffer(s.arg_shapes[0], "uint16"), wt: T.Buffer(s.arg_shapes[1], "float32"),
          bias: T.Buffer((cs,), "float32"), out: T.Buffer(s.out_shape, "uint16")):
        for task in T.parallel(s.batch * ho):
            n: T.let = task // ho
            oh: T.let = task % ho
            for b in range(blocks):
                ow0: T.let = T.min(b * px, wo - px)
                for cb in range(cs // LANES):
                    acc = T.alloc_buffer((px, LANES), "float32", scope=STACK)
                    for i in T.unroll(px):
                        for lane in T.vectorized(LANES):
                            acc[i, lane] = bias[cb * LANES + lane]
                    for kh in T.unroll(k):
                        ih: T.let = oh * st + kh - p
                        if 0 <= ih and ih < h:
                            for kw in T.unroll(k):
                                for i in T.unroll(px):
                                    iw: T.let = (ow0 + i) * st + kw - p
                                    for lane in T.vectorized(LANES):
                                        acc[i, lane] = acc[i, lane] + wt[cb, kh * k + kw, lane] * T.if_then_else(
                                            0 <= iw and iw < w, to_float(x[n, ih, T.min(T.max(iw, 0), w - 1),
                                                                           cb * LANES + lane]), T.float32(0))
                    for i in T.unroll(px):
                        for lane in T.vectorized(LANES):
                            acc[i, lane] = activate(acc[i, lane], s.activation)
                        out[n, oh, ow0 + i, tirx.Ramp(cb * LANES, 1, LANES)] = to_bf16_vector(
                            acc[i, tirx.Ramp(0, 1, LANES)])

    return f.with_attr({"op_pattern": OPAQUE, "tirx.is_scheduled": True, "tirx.noalias": True})
