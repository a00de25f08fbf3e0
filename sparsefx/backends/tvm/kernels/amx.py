"""A CPU TIR kernel for bf16 convolutions on Intel AMX tiles, bias, residual add and activation fused.

In bf16 the convs ran on PyTorch's oneDNN kernels, ~30 us of overhead per call on top of the
convolution (even on a 16-channel 4x4 conv) and the casts around it; OpenVINO ran pruned ResNet-50's
53 convs in 2.6 ms in all. This kernel calls the tile instructions from TIR (`llvm.x86.tdpbf16ps`
and friends, LLVM's intrinsics on fixed tile registers) on activations in the tile layout
(`tile_layout`: NHWC bf16, channels in whole 32-channel steps or one 16-channel half step), so a
tile's rows are 16 output positions and its columns 32 (or 16) input channels, read straight from the
activation with a row stride of the channel count. Each task keeps a 2 x 2 block of 16 x 16 float32
accumulator tiles (32 positions x 32 output channels; x 16 where the output has 16) over the taps and
input channels, then adds the bias (and residual), applies the activation and stores bf16
(AVX512-BF16's rounding conversion) a position's 32 channels (a cache line) at a time: one tile's rows
after another's wrote half lines 16 positions apart (ResNet-50's 64 -> 256 1x1 at 56x56, 8 images, one
thread: 1.59 -> 1.41 ms). That epilogue runs a few rows per step of the next block's reduction, on the
vector units while the tile unit multiplies (as oneDNN's AMX kernels interleave theirs): run after the
block, it left the tiles idle (8 images, one thread: 64 -> 64 3x3 at 56x56 1.90 -> 1.58 ms, 128 -> 128
3x3 at 28x28 1.73 -> 1.43). Where output channels are outermost (`weight_stationary`) the images are
inside them, so a slice of the weight is read from L2 for all of them (512 -> 512 3x3 at 7x7, 8 images:
2.25 -> 1.53 ms; the image loop outside read the 4.7 MB weight from L3 per image). A residual is read where the result is then written (`call_tir_inplace`:
oneDNN's sum post-op does so too): a fresh output cost ResNet-50's 64 -> 256 with its residual 3.4 ms
in the model against 2.0 ms without one, OpenVINO's 1.7-2.3 ms.

Positions run over the zero-padded input's flat index (as `direct` does; stride 2 over phase planes),
the padding columns computed and dropped. A stem's few channels fold the window's columns into the
reduction (`folded`); its stride-2 tiles run within output rows, read with twice the row stride. The
weight is packed at compile time into tiles of 16 output channels x 16 input-channel pairs
(`pack_weight`: the VNNI layout the instruction takes); where it outweighs the input, output channels
are the outer loop (`weight_stationary`). `enable()` asks Linux for the tile state once per process
(`arch_prctl(ARCH_REQ_XCOMP_PERM)`), else the first tile instruction faults.
"""

from __future__ import annotations

import ctypes
import functools
import math
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import tirx
from tvm.script import tirx as T

from sparsefx.backends.tvm.kernels.depthwise import activate
from sparsefx.backends.tvm.kernels.tile_layout import FEW, TileConv, to_bf16_vector, to_float
from sparsefx.backends.tvm.sparse.kernels import OPAQUE, STACK
from sparsefx.errors import SparsefxError

FUSES_RESIDUAL = True
RESIDUAL_IN_PLACE = True  # the result written over the residual, the kernel's last argument
ROWS, COLUMNS, DEPTH = 16, 16, 32  # a tile: output positions x output channels; input channels per step
# blocks (32 positions x 32 output channels) are split into this many tasks of consecutive blocks: each
# task loads the tile config (pruned ResNet-50's 1x1 and 3x3 convs at 14x14-56x56, one thread: 32 tasks
# 0.217 ms in all, 8 0.195; two threads even), and a block's epilogue runs during the next block's
# multiplies, so longer runs hide more of it. Tiles are not released after a task (`tilerelease`:
# 0.217 -> 0.205 ms).
TASKS = 8
SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA = 158, 0x1023, 18


@dataclass(frozen=True)
class AmxSpec(TileConv):
    """A dense bf16 conv, square kernel, equal strides (1 or 2) and padding; NHWC activations."""

    residual: bool = False

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.cout, self.cin, self.kernel, self.kernel)

    @property
    def arg_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Input (NHWC bf16 bits), packed weight, bias (float32), output (NHWC): the residual where
        there is one, written over."""
        depth = step(self)
        taps, steps = (self.kernel, 1) if folded(self) else (self.kernel ** 2, self.cin_stored // depth)
        packed = (self.cout_stored // COLUMNS, taps, steps, depth // 2, COLUMNS, 2)
        return (self.in_shape, packed, (self.cout_stored,), self.out_shape)

    @property
    def arg_dtypes(self) -> tuple[str, ...]:
        return ("uint16", "uint16", "float32", "uint16")

    @property
    def name(self) -> str:
        return f"amx_{self.cin}to{self.cout}_{self.height}x{self.width}_k{self.kernel}s{self.stride}" \
               f"p{self.padding}_b{self.batch}_{self.activation}" + ("_res" if self.residual else "")


def supported(attrs: tuple[int, ...], shapes: tuple[tuple[int, ...], ...]) -> bool:
    """Whether a conv2d workload runs here: no groups or dilation, a square window, equal strides of
    1 or 2 and equal padding; channels are stored in whole 32-channel steps (`tile_layout.stored`), but
    a stem's few channels only where a window row's fit one step (`folded`; a window of one column
    would read its step past the end of an uncopied input), and never as outputs (the layout keeps
    them unpadded, narrower than a tile)."""
    s0, s1, p0, p1, d0, d1, groups = attrs
    (_, ci, _, _), (co, _, kh, kw) = shapes[:2]
    return groups == 1 and d0 == d1 == 1 and kh == kw and s0 == s1 in (1, 2) and p0 == p1 < kh \
        and (ci > FEW or 1 < kw and ci * kw <= DEPTH) and co > FEW


def spec_of(attrs: tuple[int, ...], shapes: tuple[tuple[int, ...], ...], activation: str = "none",
            residual: bool = False) -> AmxSpec:
    (n, ci, h, w), (co, _, k, _) = shapes[:2]
    return AmxSpec(n, ci, co, h, w, k, attrs[0], attrs[2], activation, residual)


def bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), rounded to nearest even."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def pack_weight(s: AmxSpec, weight: np.ndarray) -> np.ndarray:
    """PyTorch's (cout, cin, k, k) weight as bf16 tiles, zero for the stored channels past the conv's:
    [cout/16][tap][cin/step][step/2 input pairs][16 outputs][2] (`step`: 32, or 16); `folded`:
    [cout/16][window row][1][...], the reduction running over (column, channel), zero past them."""
    if folded(s):
        rows = np.zeros((s.cout_stored, s.kernel, DEPTH), np.float32)
        rows[:s.cout, :, :s.kernel * s.cin] = weight.transpose(0, 2, 3, 1).reshape(s.cout, s.kernel, -1)
        weight = rows.transpose(0, 2, 1)[..., None]  # (cout, 32, k, 1): one 32-wide step per window row
    else:
        weight = np.pad(weight, ((0, s.cout_stored - s.cout), (0, s.cin_stored - s.cin), (0, 0), (0, 0)))
    taps, depth = weight.shape[2] * weight.shape[3], step(s)
    tiles = bf16_bits(weight).reshape(s.cout_stored // COLUMNS, COLUMNS, weight.shape[1] // depth, depth // 2, 2, taps)
    return np.ascontiguousarray(tiles.transpose(0, 5, 2, 3, 1, 4))


def pack_bias(s: AmxSpec, bias: np.ndarray) -> np.ndarray:
    """The bias, zero for the stored output channels past the conv's (they stay zero: every activation
    here maps 0 to 0)."""
    return np.pad(np.asarray(bias, np.float32).reshape(-1), (0, s.cout_stored - s.cout))


@functools.cache
def enable() -> None:
    """Ask Linux for the AMX tile state for this process (once; threads share it)."""
    if ctypes.CDLL(None, use_errno=True).syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0:
        raise SparsefxError(f"Linux refused the AMX tile state (errno {ctypes.get_errno()}); compile with "
                            "precision='fp32' or on a kernel that grants it (5.16 or later)")


def tile(name: str, *args):  # noqa: ANN201 (a TIR statement)
    return T.evaluate(T.call_llvm_intrin("void", f"llvm.x86.{name}", *args))


def step(s: AmxSpec) -> int:
    """Input channels per step of the reduction: 32, or 16 where the input is stored in 16s
    (`tile_layout.stored`: a 16-channel input with AMX, 48 channels on `dpbf16`, for which a step's
    pairs are simply the next ones)."""
    return DEPTH if folded(s) else math.gcd(s.cin_stored, DEPTH)


def folded(s: AmxSpec) -> bool:
    """Whether the window's columns go into the reduction with the channels: a stem's 3 channels x 7
    columns are one 32-wide step per window row (of 7), not 49 steps of 3 channels padded to 32."""
    return s.cin <= FEW and 1 < s.kernel and s.cin * s.kernel <= DEPTH


def weight_stationary(s: AmxSpec) -> bool:
    """Output channels outermost, each task running over positions with its weight in cache: where the
    weight outweighs the input (ResNet-50's 512 -> 512 3x3 at 7x7: 4.7 MB of weight against 50 KB of
    input, read once per position pair positions-outermost)."""
    return s.cout * s.cin * s.kernel ** 2 > s.height * s.width * s.cin * s.batch


def kernel(s: AmxSpec) -> tvm.tirx.PrimFunc:
    """The scheduled PrimFunc: out = act(conv(x, w) + bias [+ residual]), all NHWC."""
    k, st, p = s.kernel, s.stride, s.padding
    ci, co = s.cin_stored, s.cout_stored  # the layout's channels (zero past the conv's)
    ho, wo = s.out_hw
    fold = folded(s)
    by_rows = fold and st == 2  # a folded window's columns are adjacent in the padded image, not in phase planes
    copied = k > 1 or p > 0 or st > 1  # else the input is read as it is
    ph = 1 if by_rows else min(k, st)  # phase planes per axis
    reach = (k - 1) // st
    if by_rows:
        rows_in, row = s.height + 2 * p + 1, s.width + 2 * p
    elif copied:  # one spare row: the last tile's windows run past the last output row
        rows_in, row = ho + reach + 1, -(-(s.width + 2 * p) // st)
    else:
        rows_in, row = s.height, s.width
    plane = rows_in * row
    n_out = ho * wo if by_rows else ho * row  # flat: the padding columns computed and dropped
    m = min(ROWS, wo if by_rows else n_out)
    per_row = -(-wo // m)
    tiles = ho * per_row if by_rows else -(-n_out // m)
    # an odd last tile pairs with its predecessor (computed twice, stored once: a residual is written over)
    pairs, co_pairs = -(-tiles // 2), -(-co // (2 * COLUMNS))
    two = co >= 2 * COLUMNS  # two output-channel tiles per task, else one (16 channels: tiles 1 and 3 idle)
    cols = 2 if two else 1
    by_channels = weight_stationary(s)
    outer, inner = (co_pairs, pairs) if by_channels else (pairs, co_pairs)
    # weight-stationary: one pass, every image's blocks in it; else a pass per image (its input copied first)
    passes = 1 if by_channels else s.batch
    blocks = outer * inner * s.batch // passes
    group = -(-blocks // min(TASKS, blocks))  # blocks per task, in (outer, inner) order; the last task's fewer
    depth = step(s)
    steps, taps = (1, k) if fold else (ci // depth, k * k)
    per_step = -(-2 * m // (taps * steps))  # the previous block's rows finished per step
    stride_bytes = (st if by_rows else 1) * ci * 2
    src_len = s.batch * ph * ph * plane * ci
    lanes = DEPTH if ci % DEPTH == 0 else ci
    fill_stride = 1 if by_rows else st

    def nominal(t):  # noqa: ANN001, ANN202 (TIR expressions): tile t's first column (by rows) or flat position
        return t % per_row * m if by_rows else t * m

    def start(t):  # noqa: ANN001, ANN202 (TIR expressions): the same, a last tile moved back to end with its row or map
        return T.min(nominal(t), wo - m) if by_rows else T.min(nominal(t), n_out - m)

    def first(t):  # noqa: ANN001, ANN202 (TIR expressions): a tile's first position in its plane's flat index
        return t // per_row * st * row + start(t) * st if by_rows else start(t)

    def position(t, r):  # noqa: ANN001, ANN202 (TIR expressions): (output row, column) of tile t's row r; -1 column: a padding column
        if by_rows:
            return t // per_row, start(t) + r
        q = start(t) + r
        return q // row, T.if_then_else(q % row < wo, q % row, -1)

    def stores(h, t0, t1, r):  # noqa: ANN001, ANN202 (TIR expressions): row r of tile t0 (h = 0) or t1 is no other tile's to store
        t = T.if_then_else(h == 0, t0, t1)
        return tirx.all(tirx.any(h == 0, t1 != t0), start(t) + r >= nominal(t))

    def window(t, tap, c):  # noqa: ANN001, ANN202 (TIR expressions): where tile t's rows start reading for a step
        kh, kw = (tap, 0) if fold else (tap // k, tap % k)  # folded: a step takes a whole window row
        offset = (kh % st * ph + kw % st) * plane + kh // st * row + kw // st if not by_rows else kh * row
        return (first(t) + offset) * ci + c * depth

    @T.macro
    def fill(x, src, n):  # noqa: ANN001, ANN202 (a TVMScript macro): the image zero-padded, split into phase planes
        for a in range(ph * ph):
            for r in T.parallel(rows_in):
                for c in range(row):
                    for l0 in range(ci // lanes):
                        for lane in T.vectorized(lanes):
                            ih: T.let = r * fill_stride + a // ph - p
                            iw: T.let = c * fill_stride + a % ph - p
                            src[(((n * ph * ph + a) * rows_in + r) * row + c) * ci + l0 * lanes + lane] = \
                                T.if_then_else(0 <= ih and ih < s.height and 0 <= iw and iw < s.width,
                                               x[n, T.min(T.max(ih, 0), s.height - 1), T.min(T.max(iw, 0), s.width - 1),
                                                 l0 * lanes + lane], T.uint16(0))

    def block(n0, task, g):  # noqa: ANN001, ANN202 (TIR expressions): (image, position pair, output channel pair) of a task's g-th block
        b = task * group + g  # in pass n0 (the image itself where a pass takes one)
        if by_channels:  # output channels outermost, then images, then positions: a weight slice read for all
            return b // inner % s.batch, b % inner, b // (inner * s.batch)
        return n0, b // inner, b % inner

    def image(n0, task, g):  # noqa: ANN001, ANN202
        return block(n0, task, g)[0]

    def block_t0(n0, task, g):  # noqa: ANN001, ANN202 (TIR expressions): the first position tile of the block
        return block(n0, task, g)[1] * 2

    def block_ob(n0, task, g):  # noqa: ANN001, ANN202 (TIR expressions): its first 16-channel output block
        return T.min(block(n0, task, g)[2] * 2, max(co // COLUMNS - 2, 0))

    @T.macro
    def finish(acc, done, bias, res, out, n0, task, g, j):  # noqa: ANN001, ANN202 (a TVMScript macro)
        """Row j of the task's g-th block (tile t0's rows, then t1's): bias, residual, activation, stored."""
        h: T.let = j // m
        r: T.let = j % m
        n: T.let = image(n0, task, g)
        t0: T.let = block_t0(n0, task, g)
        t1: T.let = T.min(t0 + 1, tiles - 1)
        ob: T.let = block_ob(n0, task, g)
        oh: T.let = position(T.if_then_else(h == 0, t0, t1), r)[0]
        ow: T.let = position(T.if_then_else(h == 0, t0, t1), r)[1]
        if ow >= 0 and stores(h, t0, t1, r):
            for c in T.unroll(cols):  # a row's output channels, both tiles' (one cache line)
                for lane in T.vectorized(COLUMNS):
                    if T.bool(s.residual):
                        done[c * COLUMNS + lane] = activate(
                            acc[g % 2, h * 2 + c, r, lane] + bias[ob * COLUMNS + c * COLUMNS + lane]
                            + to_float(res[n, oh, ow, ob * COLUMNS + c * COLUMNS + lane]), s.activation)
                    else:
                        done[c * COLUMNS + lane] = activate(
                            acc[g % 2, h * 2 + c, r, lane] + bias[ob * COLUMNS + c * COLUMNS + lane], s.activation)
            for c in T.unroll(cols):
                out[n, oh, ow, tirx.Ramp(ob * COLUMNS + c * COLUMNS, 1, COLUMNS)] = to_bf16_vector(
                    done[tirx.Ramp(c * COLUMNS, 1, COLUMNS)])

    @T.macro
    def body(x, w, bias, res, out):  # noqa: ANN001, ANN202
        flat_x = T.decl_buffer((src_len,), "uint16", data=x.data)
        src = T.alloc_buffer((src_len,) if copied else (1,), "uint16")
        for n0 in range(passes):
            if T.bool(copied):
                for n in range(s.batch // passes):
                    fill(x, src, n0 + n)
            for task in T.parallel(-(-blocks // group)):
                config = T.alloc_buffer((64,), "uint8", scope=STACK)
                for i in T.unroll(64):  # palette 1; tiles 0-3 accumulators, 4-5 inputs (m rows), 6-7 weights
                    config[i] = T.uint8(0)
                config[0] = T.uint8(1)
                for i in T.unroll(8):  # bytes per row: 16 float32 accumulators, `depth` bf16 inputs, 16 bf16 pairs
                    config[16 + 2 * i] = T.uint8(T.if_then_else(4 <= i and i < 6, depth * 2, 64))
                for i in T.unroll(6):
                    config[48 + i] = T.uint8(m)
                config[54] = T.uint8(depth // 2)
                config[55] = T.uint8(depth // 2)
                tile("ldtilecfg", T.address_of(config[0]))
                acc = T.alloc_buffer((2, 4, ROWS, COLUMNS), "float32", scope=STACK)  # two blocks' accumulators
                done = T.alloc_buffer((2 * COLUMNS,), "float32", scope=STACK)  # a row, to round to bf16 at once
                count: T.let = T.min(group, blocks - task * group)
                for g in range(count):
                    base: T.let = image(n0, task, g) * ph * ph * plane
                    t0: T.let = block_t0(n0, task, g)
                    t1: T.let = T.min(t0 + 1, tiles - 1)
                    ob: T.let = block_ob(n0, task, g)
                    tile("tilezero", T.uint8(0))
                    tile("tilezero", T.uint8(1))
                    tile("tilezero", T.uint8(2))
                    tile("tilezero", T.uint8(3))
                    for tap in range(taps):
                        for c in range(steps):
                            if T.bool(copied):
                                tile("tileloadd64", T.uint8(4), T.address_of(src[base * ci + window(t0, tap, c)]),
                                     T.int64(stride_bytes))
                                tile("tileloadd64", T.uint8(5), T.address_of(src[base * ci + window(t1, tap, c)]),
                                     T.int64(stride_bytes))
                            else:
                                tile("tileloadd64", T.uint8(4), T.address_of(flat_x[base * ci + window(t0, tap, c)]),
                                     T.int64(stride_bytes))
                                tile("tileloadd64", T.uint8(5), T.address_of(flat_x[base * ci + window(t1, tap, c)]),
                                     T.int64(stride_bytes))
                            tile("tileloadd64", T.uint8(6), T.address_of(w[ob, tap, c, 0, 0, 0]), T.int64(64))
                            tile("tdpbf16ps", T.uint8(0), T.uint8(4), T.uint8(6))
                            tile("tdpbf16ps", T.uint8(2), T.uint8(5), T.uint8(6))
                            if T.bool(two):
                                tile("tileloadd64", T.uint8(7), T.address_of(w[ob + 1, tap, c, 0, 0, 0]), T.int64(64))
                                tile("tdpbf16ps", T.uint8(1), T.uint8(4), T.uint8(7))
                                tile("tdpbf16ps", T.uint8(3), T.uint8(5), T.uint8(7))
                            if g > 0:  # the previous block's rows, a share per step, while the tiles multiply
                                for j in range(per_step):
                                    if (tap * steps + c) * per_step + j < 2 * m:
                                        finish(acc, done, bias, res, out, n0, task, g - 1, (tap * steps + c) * per_step + j)
                    tile("tilestored64", T.uint8(0), T.address_of(acc[g % 2, 0, 0, 0]), T.int64(64))
                    tile("tilestored64", T.uint8(2), T.address_of(acc[g % 2, 2, 0, 0]), T.int64(64))
                    if T.bool(two):
                        tile("tilestored64", T.uint8(1), T.address_of(acc[g % 2, 1, 0, 0]), T.int64(64))
                        tile("tilestored64", T.uint8(3), T.address_of(acc[g % 2, 3, 0, 0]), T.int64(64))
                for j in range(2 * m):
                    finish(acc, done, bias, res, out, n0, task, count - 1, j)

    x_shape, w_shape, b_shape = s.arg_shapes[:3]

    @T.prim_func(private=True)
    def f(x: T.Buffer(x_shape, "uint16"), w: T.Buffer(w_shape, "uint16"), bias: T.Buffer(b_shape, "float32"),
          out: T.Buffer(s.out_shape, "uint16")):
        body(x, w, bias, out, out)  # with a residual, `out` holds it on the way in
    return f.with_attr({"op_pattern": OPAQUE, "tirx.is_scheduled": True, "tirx.noalias": True})

