"""3x3 convs (stride 1, padding 1) as Winograd F(4x4, 3x3) on NCHW16c activations (`blocked_layout`),
bias, residual add and activation fused.

A 3x3 conv's 9 multiply-adds per output position and channel pair become 36 per 4x4 tile of positions:
2.25 per position, 4x fewer (on a 7x7 map, whose 4 tiles cover 8x8, 3.1x). Three parallel phases over
as many images as fit `SCRATCH_BYTES`: each tile's 6x6 input window transformed (`BT d B`, zero off the image) into
V[36][input block][tile][16]; for each of the 36 transform positions a matrix product of the tiles by the
weight transformed at compile time (`pack_weight`: U = G g G^T), in register blocks of 6 tiles x up to 4
output vectors as `blocked` computes its positions; and each tile's 36 products transformed back
(`A^T m A`) into its 4x4 outputs, with the bias, the residual read where it is written, and the
activation. Float32 error against a float64 conv: a relative 7e-6 of the output's largest value on
512 -> 512 at 7x7 and 64 -> 64 at 56x56 (direct: 3e-7); the points 0, +-1, +-2 as in Lavin & Gray.

The weight is 4x the direct one's (36 floats per channel pair against 9) and each element is read once
per tile: a map of few tiles (one image at 7x7: 4 tiles) reads it from memory for little work, so
`supported` asks for `MIN_TILES`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm.script import tirx as T

from sparsefx.backends.tvm.kernels.blocked import BlockedSpec
from sparsefx.backends.tvm.kernels.blocked_layout import BLOCK, blocked, stored
from sparsefx.backends.tvm.kernels.depthwise import activate
from sparsefx.backends.tvm.sparse.kernels import OPAQUE, STACK

FUSES_RESIDUAL = True
RESIDUAL_IN_PLACE = True  # the result written over the residual, the kernel's last argument
TILE = 4  # output positions a tile's side holds
WINDOW = TILE + 2  # the input positions its window's side reads
POINTS = WINDOW * WINDOW  # transform positions: one matrix product each
TILES = 6  # tiles per register block, each times up to 4 16-channel vectors (24 accumulators)
CI_UNROLL = 4  # input channels a reduction step unrolls, as `blocked`'s
MIN_TILES = 8  # tiles a batch's map has at least (below, the weight's reads outweigh the work saved)
# below this many tiles `blocked` is timed too (`contested`): each such timing is a kernel built and run, and
# a cold plan of ResNet-50 at 2x took 63.9 s with every conv contested against 52.9 with none (goal 60)
CONTESTED_TILES = 32
# the transformed inputs and products of as many images at a time as fit this many bytes, or the transformed
# weight's where that is more (each group of images reads all of it): 8 images, two threads, AMD EPYC Zen 4,
# ResNet-18's 64 -> 64 at 56x56 (3.6 MB an image) 5.24 ms all at once, 4.50 in 16 MB, 6.49 in 4 MB against
# 7.70 in 16 MB in a noisier minute; 128 -> 128 at 28x28 (1.8 MB an image) 3.77 in 2 MB, 4.34 in 16 MB
SCRATCH_BYTES = 4 << 20

# F(4x4, 3x3): input transform B^T (6x6), weight transform G (6x3), output transform A^T (4x6)
BT = ((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
      (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1))
G = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
     (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))
AT = ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))


@dataclass(frozen=True)
class WinogradSpec:
    """A dense 3x3 conv, stride 1, padding 1, on NCHW16c activations."""

    batch: int
    cin: int
    cout: int
    height: int
    width: int
    activation: str = "none"
    residual: bool = False

    @property
    def out_hw(self) -> tuple[int, int]:
        return self.height, self.width

    @property
    def nchw_in(self) -> tuple[int, int, int, int]:
        return (self.batch, self.cin, self.height, self.width)

    @property
    def nchw_out(self) -> tuple[int, int, int, int]:
        return (self.batch, self.cout, self.height, self.width)

    @property
    def in_shape(self) -> tuple[int, ...]:
        return blocked(self.nchw_in)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return blocked(self.nchw_out)

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        """PyTorch's weight shape (`pack_weight` turns it into `arg_shapes[1]`)."""
        return (self.cout, self.cin, 3, 3)

    @property
    def arg_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Input (NCHW16c), transformed weight, bias (stored channels), and the output (NCHW16c): the
        residual where there is one, written over."""
        return (self.in_shape, (POINTS * stored(self.cout) * stored(self.cin),), (stored(self.cout),), self.out_shape)

    @property
    def tile_rows(self) -> int:
        return -(-self.height // TILE)

    @property
    def tile_cols(self) -> int:
        return -(-self.width // TILE)

    @property
    def tiles(self) -> int:
        return self.batch * self.tile_rows * self.tile_cols

    @property
    def images(self) -> int:
        """Images transformed and multiplied at a time: the most that divide the batch and whose
        transformed inputs and products fit `SCRATCH_BYTES` or the transformed weight's bytes."""
        per_image = POINTS * (stored(self.cin) + stored(self.cout)) * self.tile_rows * self.tile_cols * 4
        return images_at_once(self.batch, per_image, self.arg_shapes[1][0] * 4)

    @property
    def group_sizes(self) -> tuple[tuple[int, int], ...]:
        """The output's 16-channel blocks in register groups, as `blocked` splits them."""
        return BlockedSpec(self.batch, self.cin, self.cout, self.height, self.width, 3, 1, 1).group_sizes

    @property
    def name(self) -> str:
        return f"winograd_{self.cin}to{self.cout}_{self.height}x{self.width}_b{self.batch}_{self.activation}" \
               + ("_res" if self.residual else "")


def images_at_once(batch: int, per_image: int, weight_bytes: int) -> int:
    """The most images, dividing the batch, whose `per_image` scratch bytes fit `SCRATCH_BYTES` or the
    transformed weight's bytes (at least one)."""
    room = max(SCRATCH_BYTES, weight_bytes)
    return max(d for d in range(1, batch + 1) if batch % d == 0 and (d == 1 or d * per_image <= room))


def tile_count(shapes: tuple[tuple[int, ...], ...], tile: int = TILE) -> int:
    """Tiles of `tile` x `tile` outputs over a batch's maps (an unstrided, padded conv's input shape first)."""
    n, _, h, w = shapes[0]
    return n * -(-h // tile) * -(-w // tile)


def unstrided_3x3(attrs: tuple[int, ...], shapes: tuple[tuple[int, ...], ...]) -> bool:
    """A 3x3 conv, stride 1, padding 1, no groups or dilation."""
    s0, s1, p0, p1, d0, d1, groups = attrs
    kh, kw = shapes[1][2:]
    return groups == 1 and d0 == d1 == 1 and kh == kw == 3 and s0 == s1 == 1 and p0 == p1 == 1


def supported(attrs: tuple[int, ...], shapes: tuple[tuple[int, ...], ...]) -> bool:
    """Whether a conv2d workload (dispatch's attrs and shapes) is one this kernel runs: `unstrided_3x3`,
    a block of input channels or more, and `MIN_TILES` tiles."""
    return unstrided_3x3(attrs, shapes) and shapes[0][1] >= BLOCK and tile_count(shapes) >= MIN_TILES


def contested(attrs: tuple[int, ...], shapes: tuple[tuple[int, ...], ...]) -> bool:
    """Whether `blocked` may beat it on this conv (`registry.ALTERNATIVES`): fewer than `CONTESTED_TILES` tiles."""
    return tile_count(shapes) < CONTESTED_TILES


def spec_of(attrs: tuple[int, ...], shapes: tuple[tuple[int, ...], ...], activation: str = "none",
            residual: bool = False) -> WinogradSpec:
    (n, ci, h, w), (co, *_) = shapes[:2]
    return WinogradSpec(n, ci, co, h, w, activation, residual)


def transformed_weight(weight: np.ndarray, g: tuple = G) -> np.ndarray:
    """U = G g G^T for each (output, input) pair, in float64: (cout, cin, 3, 3) -> (cout, cin, 6, 6) with this
    module's G, or the window of the `g` given (`winogradbf16`'s 4x4)."""
    g = np.asarray(g, "float64")
    return np.einsum("ij,ocjk,lk->ocil", g, weight.astype("float64"), g)


def pack_weight(s: WinogradSpec, weight: np.ndarray) -> np.ndarray:
    """PyTorch's (cout, cin, 3, 3) weight transformed (`transformed_weight`), as
    [transform position][group (`group_sizes`)][input channel][vector][16 outputs], zero past the conv's channels."""
    cos, cis = stored(s.cout), stored(s.cin)
    u = np.zeros((cos, cis, WINDOW, WINDOW), "float64")
    u[:s.cout, :s.cin] = transformed_weight(weight)
    by_point = u.reshape(cos, cis, POINTS).transpose(2, 1, 0)  # [point][ci][co]
    groups, first = [], 0
    for size, count in s.group_sizes:
        for _ in range(count):
            groups.append(by_point[:, :, first * BLOCK:(first + size) * BLOCK])  # [point][ci][vector x 16]
            first += size
    return np.ascontiguousarray(np.concatenate([g.reshape(POINTS, -1) for g in groups], axis=1).astype("float32").reshape(-1))


def pack_bias(s: WinogradSpec, bias: np.ndarray) -> np.ndarray:
    return np.concatenate([bias.astype("float32"), np.zeros(stored(s.cout) - s.cout, "float32")])


def dot(row: tuple, buf, index: tuple, axis: int, start=0, step: int = 1):  # noqa: ANN001, ANN201 (TIR expressions)
    """sum of row[j] * buf[index, its `axis` entry start + j * step], over row's nonzero entries (unrolled)."""
    total = None
    for j, c in enumerate(row):
        if c:
            term = buf[tuple(start + j * step if a == axis else i for a, i in enumerate(index))]
            part = term if c == 1 else -term if c == -1 else T.float32(c) * term
            total = part if total is None else total + part
    return total


def kernel(s: WinogradSpec) -> tvm.tirx.PrimFunc:
    """The scheduled PrimFunc: out = act(conv(x, w) + bias), or res = act(conv(x, w) + bias + res), all NCHW16c."""
    cib, cob = stored(s.cin) // BLOCK, stored(s.cout) // BLOCK
    rows, cols, images = s.tile_rows, s.tile_cols, s.images
    tiles = images * rows * cols  # a chunk's
    padded = -(-tiles // TILES) * TILES
    cis = stored(s.cin)
    h, w = s.height, s.width
    (main, mains), *rest = s.group_sizes
    tail = rest[0][0] if rest else main
    groups = sum(count for _, count in s.group_sizes)

    def gemm_macro(vectors: int):  # noqa: ANN202 (a TVMScript macro)
        @T.macro
        def gemm(v, u, m, p, g0):  # noqa: ANN001, ANN202
            base: T.let = (p * cob + g0) * cis * BLOCK
            for tb in range(padded // TILES):
                acc = T.alloc_buffer((vectors, TILES, BLOCK), "float32", scope=STACK)
                for j in T.unroll(vectors):
                    for q in T.unroll(TILES):
                        for lane in T.vectorized(BLOCK):
                            acc[j, q, lane] = T.float32(0)
                for cb in range(cib):
                    for c0 in T.serial(BLOCK // CI_UNROLL):
                        for c1 in T.unroll(CI_UNROLL):
                            for j in T.unroll(vectors):
                                for q in T.unroll(TILES):
                                    for lane in T.vectorized(BLOCK):
                                        acc[j, q, lane] = acc[j, q, lane] + v[p, cb, tb * TILES + q, c0 * CI_UNROLL + c1] \
                                            * u[base + ((cb * BLOCK + c0 * CI_UNROLL + c1) * vectors + j) * BLOCK + lane]
                for j in T.unroll(vectors):
                    for q in T.unroll(TILES):
                        for lane in T.vectorized(BLOCK):
                            m[p, g0 + j, tb * TILES + q, lane] = acc[j, q, lane]

        return gemm

    first_gemm, tail_gemm = gemm_macro(main), gemm_macro(tail)

    @T.prim_func(private=True)
    def f(x: T.Buffer(s.in_shape, "float32"), u: T.Buffer(s.arg_shapes[1], "float32"),
          bias: T.Buffer(s.arg_shapes[2], "float32"), out: T.Buffer(s.out_shape, "float32")):
        v = T.alloc_buffer((POINTS, cib, padded, BLOCK), "float32")
        m = T.alloc_buffer((POINTS, cob, padded, BLOCK), "float32")
        for n0 in range(0, s.batch, images):  # images at a time (`images`), each phase over all of them
            for t in T.parallel(images * cib * rows):  # input transform: V = B^T d B
                n: T.let = t // (cib * rows)
                cb: T.let = t // rows % cib
                ty: T.let = t % rows
                d = T.alloc_buffer((WINDOW, WINDOW, BLOCK), "float32", scope=STACK)
                r = T.alloc_buffer((WINDOW, WINDOW, BLOCK), "float32", scope=STACK)
                for tx in range(cols):
                    for i in T.unroll(WINDOW):
                        for j in T.unroll(WINDOW):
                            for lane in T.vectorized(BLOCK):
                                d[i, j, lane] = T.Select(
                                    ty * TILE - 1 + i >= 0 and ty * TILE - 1 + i < h and tx * TILE - 1 + j >= 0
                                    and tx * TILE - 1 + j < w,
                                    x[n0 + n, cb, T.max(T.min(ty * TILE - 1 + i, h - 1), 0),
                                      T.max(T.min(tx * TILE - 1 + j, w - 1), 0), lane], T.float32(0))
                    for i in T.unroll(WINDOW):  # along each row: r[i, b] = sum_j BT[b][j] d[i, j]
                        for lane in T.vectorized(BLOCK):
                            r[i, 0, lane] = dot(BT[0], d, (i, 0, lane), 1)
                            r[i, 1, lane] = dot(BT[1], d, (i, 0, lane), 1)
                            r[i, 2, lane] = dot(BT[2], d, (i, 0, lane), 1)
                            r[i, 3, lane] = dot(BT[3], d, (i, 0, lane), 1)
                            r[i, 4, lane] = dot(BT[4], d, (i, 0, lane), 1)
                            r[i, 5, lane] = dot(BT[5], d, (i, 0, lane), 1)
                    tile: T.let = (n * rows + ty) * cols + tx
                    for b in T.unroll(WINDOW):  # along each column: V[a, b] = sum_i BT[a][i] r[i, b]
                        for lane in T.vectorized(BLOCK):
                            v[0 * WINDOW + b, cb, tile, lane] = dot(BT[0], r, (0, b, lane), 0)
                            v[1 * WINDOW + b, cb, tile, lane] = dot(BT[1], r, (0, b, lane), 0)
                            v[2 * WINDOW + b, cb, tile, lane] = dot(BT[2], r, (0, b, lane), 0)
                            v[3 * WINDOW + b, cb, tile, lane] = dot(BT[3], r, (0, b, lane), 0)
                            v[4 * WINDOW + b, cb, tile, lane] = dot(BT[4], r, (0, b, lane), 0)
                            v[5 * WINDOW + b, cb, tile, lane] = dot(BT[5], r, (0, b, lane), 0)
                if ty == rows - 1 and n == images - 1:  # the last block's tiles past the batch's: zero
                    for p in range(POINTS):
                        for q in range(tiles, padded):
                            for lane in T.vectorized(BLOCK):
                                v[p, cb, q, lane] = T.float32(0)
            for t in T.parallel(POINTS * groups):  # a product per transform position: M[p] = V[p] U[p]
                p: T.let = t // groups
                g: T.let = t % groups
                if g < mains:
                    first_gemm(v, u, m, p, g * main)
                else:
                    tail_gemm(v, u, m, p, mains * main + (g - mains) * tail)
            for t in T.parallel(images * cob * rows):  # output transform: Y = A^T m A, bias, residual, activation
                n: T.let = t // (cob * rows)
                ob: T.let = t // rows % cob
                ty: T.let = t % rows
                r = T.alloc_buffer((TILE, WINDOW, BLOCK), "float32", scope=STACK)
                y = T.alloc_buffer((TILE, TILE, BLOCK), "float32", scope=STACK)
                for tx in range(cols):
                    tile: T.let = (n * rows + ty) * cols + tx
                    for b in T.unroll(WINDOW):  # along each column: r[k, b] = sum_a AT[k][a] m[a, b]
                        for lane in T.vectorized(BLOCK):
                            r[0, b, lane] = dot(AT[0], m, (0, ob, tile, lane), 0, b, WINDOW)
                            r[1, b, lane] = dot(AT[1], m, (0, ob, tile, lane), 0, b, WINDOW)
                            r[2, b, lane] = dot(AT[2], m, (0, ob, tile, lane), 0, b, WINDOW)
                            r[3, b, lane] = dot(AT[3], m, (0, ob, tile, lane), 0, b, WINDOW)
                    for k in T.unroll(TILE):  # along each row: y[k, l] = sum_b AT[l][b] r[k, b]
                        for lane in T.vectorized(BLOCK):
                            y[k, 0, lane] = dot(AT[0], r, (k, 0, lane), 1)
                            y[k, 1, lane] = dot(AT[1], r, (k, 0, lane), 1)
                            y[k, 2, lane] = dot(AT[2], r, (k, 0, lane), 1)
                            y[k, 3, lane] = dot(AT[3], r, (k, 0, lane), 1)
                    for k in T.unroll(TILE):
                        for col in T.unroll(TILE):
                            if ty * TILE + k < h and tx * TILE + col < w:
                                for lane in T.vectorized(BLOCK):
                                    if T.bool(s.residual):
                                        out[n0 + n, ob, ty * TILE + k, tx * TILE + col, lane] = activate(
                                            y[k, col, lane] + bias[ob * BLOCK + lane]
                                            + out[n0 + n, ob, ty * TILE + k, tx * TILE + col, lane], s.activation)
                                    else:
                                        out[n0 + n, ob, ty * TILE + k, tx * TILE + col, lane] = activate(
                                            y[k, col, lane] + bias[ob * BLOCK + lane], s.activation)

    return f.with_attr({"op_pattern": OPAQUE, "tirx.is_scheduled": True, "tirx.noalias": True})
