"""bf16 3x3 convs (stride 1, padding 1) as Winograd F(2x2, 3x3) on AVX512-BF16, in the tile layout
(`tile_layout`: NHWC bf16 bits), bias, residual add and activation fused.

As `winograd` does in float32, in three parallel phases: each tile's 4x4 window transformed in float32
and rounded to bf16 (V[16][tile][input channel]); per transform position a product of the tiles by the
weight transformed at compile time (U = G g G^T, rounded to bf16), on `vdpbf16ps` as `dpbf16` runs its
register blocks (a broadcast input pair per tile and step, float32 accumulators); each tile's 16 sums
transformed back in float32, bias, residual and activation applied, rounded to bf16. 16 multiplies per
2x2 outputs instead of 36: 2.25x fewer (a 7x7 map's 16 tiles cover 8x8: 1.7x).

F(2x2, 3x3), not `winograd`'s F(4x4, 3x3): the transformed values are rounded to bf16, and the larger
transform's points (+-2, its output transform's 8s) amplify that rounding: on 256 -> 256 at 14x14 with
bf16 inputs and weights F(4x4) was 2.3e-2 off a float64 conv (relative L2), F(2x2) 3.9e-3, about the
rounding of storing the output in bf16 (a direct conv on the same bf16 values: 1e-7).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import tirx
from tvm.script import tirx as T

from sparsefx.backends.tvm.kernels import dpbf16
from sparsefx.backends.tvm.kernels.amx import AmxSpec, bf16_bits, pack_bias
from sparsefx.backends.tvm.kernels.depthwise import activate
from sparsefx.backends.tvm.kernels.tile_layout import to_bf16_vector, to_float
from sparsefx.backends.tvm.kernels.winograd import (
    dot,
    images_at_once,
    tile_count,
    transformed_weight,
    unstrided_3x3,
)
from sparsefx.backends.tvm.sparse.kernels import LANES, OPAQUE, STACK

__all__ = ["WinogradBf16Spec", "contested", "kernel", "pack_bias", "pack_weight", "spec_of", "supported"]

FUSES_RESIDUAL = True
RESIDUAL_IN_PLACE = True  # the result written over the residual, the kernel's last argument
TILE = 2
WINDOW = TILE + 2
POINTS = WINDOW * WINDOW
MIN_TILES = 8  # as `winograd`'s: fewer tiles read the transformed weight for too little work
# below this many tiles `dpbf16` is timed too (`contested`): one image, two threads, AMD EPYC Zen 4, 256 -> 256
# at 14x14 (49 tiles) 0.580 ms against `dpbf16`'s 0.627, at 28x28 (196) 128 -> 128 0.400 against 0.647
CONTESTED_TILES = 64

# F(2x2, 3x3): input transform B^T (4x4), weight transform G (4x3), output transform A^T (2x4)
BT = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
G = ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1))
AT = ((1, 1, 1, 0), (0, 1, -1, -1))


@dataclass(frozen=True)
class WinogradBf16Spec(AmxSpec):
    """A dense bf16 3x3 conv, stride 1, padding 1, in the tile layout."""

    kernel: int = 3
    stride: int = 1
    padding: int = 1

    @property
    def arg_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Input (NHWC bf16 bits), transformed weight (bf16 bits), bias (float32), output (NHWC): the
        residual where there is one, written over."""
        return (self.in_shape, (POINTS * self.cout_stored * self.cin_stored,), (self.cout_stored,), self.out_shape)

    @property
    def tile_rows(self) -> int:
        return -(-self.height // TILE)

    @property
    def tile_cols(self) -> int:
        return -(-self.width // TILE)

    @property
    def images(self) -> int:
        """Images transformed and multiplied at a time (as `winograd.WinogradSpec.images`)."""
        per_image = POINTS * (self.cin_stored * 2 + self.cout_stored * 4) * self.tile_rows * self.tile_cols
        return images_at_once(self.batch, per_image, self.arg_shapes[1][0] * 2)

    @property
    def name(self) -> str:
        return f"winogradbf16_{self.cin}to{self.cout}_{self.height}x{self.width}_b{self.batch}_{self.activation}" \
               + ("_res" if self.residual else "")


def supported(attrs: tuple[int, ...], shapes: tuple[tuple[int, ...], ...]) -> bool:
    """`unstrided_3x3`, 16 input channels or more, `MIN_TILES` tiles."""
    return unstrided_3x3(attrs, shapes) and shapes[0][1] >= LANES and tile_count(shapes, TILE) >= MIN_TILES


def contested(attrs: tuple[int, ...], shapes: tuple[tuple[int, ...], ...]) -> bool:
    """Whether `dpbf16` may beat it on this conv (`registry.ALTERNATIVES`): fewer than `CONTESTED_TILES` tiles."""
    return tile_count(shapes, TILE) < CONTESTED_TILES


def spec_of(attrs: tuple[int, ...], shapes: tuple[tuple[int, ...], ...], activation: str = "none",
            residual: bool = False) -> WinogradBf16Spec:
    (n, ci, h, w), (co, *_) = shapes[:2]
    return WinogradBf16Spec(n, ci, co, h, w, activation=activation, residual=residual)


def pack_weight(s: WinogradBf16Spec, weight: np.ndarray) -> np.ndarray:
    """PyTorch's (cout, cin, 3, 3) weight transformed (`winograd.transformed_weight` with this G) and rounded
    to bf16, as [transform position][16 outputs][input pair][16 outputs][2 inputs], zero past the conv's channels."""
    u = np.zeros((s.cout_stored, s.cin_stored, WINDOW, WINDOW), "float64")
    u[:s.cout, :s.cin] = transformed_weight(weight, G)
    by_point = u.reshape(s.cout_stored // LANES, LANES, s.cin_stored // 2, 2, POINTS).transpose(4, 0, 2, 1, 3)
    return np.ascontiguousarray(bf16_bits(by_point.astype("float32")).reshape(-1))


def kernel(s: WinogradBf16Spec) -> tvm.tirx.PrimFunc:
    """The scheduled PrimFunc: out = act(conv(x, w) + bias [+ residual]), all NHWC bf16 bits."""
    cib, cob, pairs = s.cin_stored // LANES, s.cout_stored // LANES, s.cin_stored // 2
    rows, cols, images = s.tile_rows, s.tile_cols, s.images
    h, w = s.height, s.width
    tiles = images * rows * cols
    vecs = dpbf16.vectors(s)
    m = min(dpbf16.POSITIONS[vecs], tiles)
    padded = -(-tiles // m) * m
    groups = cob // vecs

    @T.prim_func(private=True)
    def f(x: T.Buffer(s.in_shape, "uint16"), u: T.Buffer(s.arg_shapes[1], "uint16"),
          bias: T.Buffer(s.arg_shapes[2], "float32"), out: T.Buffer(s.out_shape, "uint16")):
        with T.attr(0, "pragma_import_llvm", dpbf16.DOT_IR):
            v = T.alloc_buffer((POINTS, padded, s.cin_stored), "uint16")
            mm = T.alloc_buffer((POINTS, cob, padded, LANES), "float32")
            v32 = T.decl_buffer((POINTS, padded, pairs), "uint32", data=v.data)
            u32 = T.decl_buffer((POINTS * cob * pairs * LANES,), "uint32", data=u.data)
            for n0 in range(0, s.batch, images):  # images at a time (`images`), each phase over all of them
                for t in T.parallel(images * rows * cib):  # input transform: V = B^T d B, rounded to bf16
                    n: T.let = t // (rows * cib)
                    ty: T.let = t // cib % rows
                    cb: T.let = t % cib
                    d = T.alloc_buffer((WINDOW, WINDOW, LANES), "float32", scope=STACK)
                    r = T.alloc_buffer((WINDOW, WINDOW, LANES), "float32", scope=STACK)
                    z = T.alloc_buffer((WINDOW, WINDOW, LANES), "float32", scope=STACK)
                    for tx in range(cols):
                        for i in T.unroll(WINDOW):
                            for j in T.unroll(WINDOW):
                                for lane in T.vectorized(LANES):
                                    d[i, j, lane] = T.Select(
                                        ty * TILE - 1 + i >= 0 and ty * TILE - 1 + i < h and tx * TILE - 1 + j >= 0
                                        and tx * TILE - 1 + j < w,
                                        to_float(x[n0 + n, T.max(T.min(ty * TILE - 1 + i, h - 1), 0),
                                                   T.max(T.min(tx * TILE - 1 + j, w - 1), 0), cb * LANES + lane]),
                                        T.float32(0))
                        for i in T.unroll(WINDOW):  # along each row: r[i, b] = sum_j BT[b][j] d[i, j]
                            for lane in T.vectorized(LANES):
                                r[i, 0, lane] = dot(BT[0], d, (i, 0, lane), 1)
                                r[i, 1, lane] = dot(BT[1], d, (i, 0, lane), 1)
                                r[i, 2, lane] = dot(BT[2], d, (i, 0, lane), 1)
                                r[i, 3, lane] = dot(BT[3], d, (i, 0, lane), 1)
                        for b in T.unroll(WINDOW):  # along each column: z[a, b] = sum_i BT[a][i] r[i, b]
                            for lane in T.vectorized(LANES):
                                z[0, b, lane] = dot(BT[0], r, (0, b, lane), 0)
                                z[1, b, lane] = dot(BT[1], r, (0, b, lane), 0)
                                z[2, b, lane] = dot(BT[2], r, (0, b, lane), 0)
                                z[3, b, lane] = dot(BT[3], r, (0, b, lane), 0)
                        tile: T.let = (n * rows + ty) * cols + tx
                        for a in T.unroll(WINDOW):
                            for b in T.unroll(WINDOW):
                                v[a * WINDOW + b, tile, tirx.Ramp(cb * LANES, 1, LANES)] = to_bf16_vector(
                                    z[a, b, tirx.Ramp(0, 1, LANES)])
                    if ty == rows - 1 and n == images - 1:  # the last block's tiles past the images': zero
                        for p in range(POINTS):
                            for q in range(tiles, padded):
                                for lane in T.vectorized(LANES):
                                    v[p, q, cb * LANES + lane] = T.uint16(0)
                for t in T.parallel(POINTS * groups):  # a product per transform position: M[p] = V[p] U[p]
                    p: T.let = t // groups
                    ob: T.let = t % groups * vecs
                    for tb in range(padded // m):
                        acc = T.alloc_buffer((m, vecs, LANES), "float32", scope=STACK)
                        for i in T.unroll(m):
                            for j in T.unroll(vecs):
                                for lane in T.vectorized(LANES):
                                    acc[i, j, lane] = T.float32(0)
                        for c in range(pairs):
                            for i in T.unroll(m):
                                for j in T.unroll(vecs):
                                    acc[i, j, tirx.Ramp(0, 1, LANES)] = dpbf16.dot(
                                        acc[i, j, tirx.Ramp(0, 1, LANES)],
                                        u32[tirx.Ramp(((p * cob + ob + j) * pairs + c) * LANES, 1, LANES)],
                                        v32[p, tb * m + i, c])
                        for i in T.unroll(m):
                            for j in T.unroll(vecs):
                                for lane in T.vectorized(LANES):
                                    mm[p, ob + j, tb * m + i, lane] = acc[i, j, lane]
                for t in T.parallel(images * rows * cob):  # output transform: Y = A^T m A, bias, residual, activation
                    n: T.let = t // (rows * cob)
                    ty: T.let = t // cob % rows
                    ob: T.let = t % cob
                    r = T.alloc_buffer((TILE, WINDOW, LANES), "float32", scope=STACK)
                    y = T.alloc_buffer((TILE, TILE, LANES), "float32", scope=STACK)
                    done = T.alloc_buffer((LANES,), "float32", scope=STACK)
                    for tx in range(cols):
                        tile: T.let = (n * rows + ty) * cols + tx
                        for b in T.unroll(WINDOW):  # along each column: r[k, b] = sum_a AT[k][a] m[a, b]
                            for lane in T.vectorized(LANES):
                                r[0, b, lane] = dot(AT[0], mm, (0, ob, tile, lane), 0, b, WINDOW)
                                r[1, b, lane] = dot(AT[1], mm, (0, ob, tile, lane), 0, b, WINDOW)
                        for k in T.unroll(TILE):  # along each row: y[k, l] = sum_b AT[l][b] r[k, b]
                            for lane in T.vectorized(LANES):
                                y[k, 0, lane] = dot(AT[0], r, (k, 0, lane), 1)
                                y[k, 1, lane] = dot(AT[1], r, (k, 0, lane), 1)
                        for k in T.unroll(TILE):
                            for col in T.unroll(TILE):
                                if ty * TILE + k < h and tx * TILE + col < w:
                                    for lane in T.vectorized(LANES):
                                        if T.bool(s.residual):
                                            done[lane] = activate(y[k, col, lane] + bias[ob * LANES + lane] + to_float(
                                                out[n0 + n, ty * TILE + k, tx * TILE + col, ob * LANES + lane]), s.activation)
                                        else:
                                            done[lane] = activate(y[k, col, lane] + bias[ob * LANES + lane], s.activation)
                                    out[n0 + n, ty * TILE + k, tx * TILE + col, tirx.Ramp(ob * LANES, 1, LANES)] = \
                                        to_bf16_vector(done[tirx.Ramp(0, 1, LANES)])

    return f.with_attr({"op_pattern": OPAQUE, "tirx.is_scheduled": True, "tirx.noalias": True})
