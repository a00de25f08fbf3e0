"""A CPU TIR kernel for bf16 convolutions on Intel AMX tiles, bias, residual add and activation fused.

In bf16 the convs ran on PyTorch's oneDNN kernels, ~30 us of overhead per call on top of the
convolution (even on a 16-channel 4x4 conv) and the casts around it; OpenVINO ran pruned ResNet-50's
53 convs in 2.6 ms in all. This kernel calls the tile instructions from TIR (`llvm.x86.tdpbf16ps`
and friends, LLVM's intrinsics on fixed tile registers): the input and output are bf16 in NHWC
(stored as uint16: TIR's bf16 legalisation is not needed where only tiles and bit shifts touch it),
so a tile's rows are 16 output positions and its columns 32 input channels, read straight from the
activation with a row stride of the channel count. Each task keeps a 2 x 2 block of 16 x 16 float32
accumulator tiles (32 positions x 32 output channels) over the taps and input channels, then adds
the bias (and residual), applies the activation and stores bf16, rounded to nearest even.

Stride 1: positions run over the zero-padded input's flat index (as `direct` does), the padding
columns computed and dropped. Stride 2: a tile is 16 positions of one output row, read with twice the
row stride. The weight is packed at compile time into tiles of 16 output channels x 16 input-channel
pairs (`pack_weight`: the VNNI layout the instruction takes). `enable()` asks Linux for the tile
state once per process (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), else the first tile instruction faults.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import numpy as np
import tvm
from tvm.script import tirx as T

from sparsefx.backends.tvm.kernels.depthwise import activate, out_hw
from sparsefx.backends.tvm.kernels.tile_layout import to_bf16, to_float
from sparsefx.backends.tvm.sparse.kernels import OPAQUE, STACK
from sparsefx.errors import SparsefxError

FUSES_RESIDUAL = True
ROWS, COLUMNS, DEPTH = 16, 16, 32  # a tile: output positions x output channels; input channels per step
TASKS = 32  # output-channel pairs are grouped per task until about this many tasks remain
SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA = 158, 0x1023, 18


@dataclass(frozen=True)
class AmxSpec:
    """A dense bf16 conv, square kernel, equal strides (1 or 2) and padding; NHWC activations."""

    batch: int
    cin: int
    cout: int
    height: int
    width: int
    kernel: int
    stride: int
    padding: int
    activation: str = "none"
    residual: bool = False

    @property
    def out_hw(self) -> tuple[int, int]:
        return out_hw(self)

    @property
    def out_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, *self.out_hw, self.cout)

    @property
    def in_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.height, self.width, self.cin)

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.cout, self.cin, self.kernel, self.kernel)

    @property
    def arg_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Input (NHWC bf16 bits), packed weight, bias (float32), [residual (NHWC),] output (NHWC)."""
        packed = (self.cout // COLUMNS, self.kernel ** 2, self.cin // DEPTH, DEPTH // 2, COLUMNS, 2)
        residual = (self.out_shape,) if self.residual else ()
        return (self.in_shape, packed, (self.cout,), *residual, self.out_shape)

    @property
    def arg_dtypes(self) -> tuple[str, ...]:
        return ("uint16", "uint16", "float32", *(("uint16",) if self.residual else ()), "uint16")

    @property
    def name(self) -> str:
        return f"amx_{self.cin}to{self.cout}_{self.height}x{self.width}_k{self.kernel}s{self.stride}" \
               f"p{self.padding}_b{self.batch}_{self.activation}" + ("_res" if self.residual else "")


def supported(attrs: tuple[int, ...], shapes: tuple[tuple[int, ...], ...]) -> bool:
    """Whether a conv2d workload runs here: no groups or dilation, a square window, equal strides of
    1 or 2 and equal padding, whole 32-channel steps in and 16-channel tiles out (at least two)."""
    s0, s1, p0, p1, d0, d1, groups = attrs
    (_, ci, _, _), (co, _, kh, kw) = shapes[:2]
    return groups == 1 and d0 == d1 == 1 and kh == kw and s0 == s1 in (1, 2) and p0 == p1 < kh \
        and ci % DEPTH == 0 and co % COLUMNS == 0 and co >= 2 * COLUMNS


def spec_of(attrs: tuple[int, ...], shapes: tuple[tuple[int, ...], ...], activation: str = "none",
            residual: bool = False) -> AmxSpec:
    (n, ci, h, w), (co, _, k, _) = shapes[:2]
    return AmxSpec(n, ci, co, h, w, k, attrs[0], attrs[2], activation, residual)


def bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), rounded to nearest even."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def pack_weight(s: AmxSpec, weight: np.ndarray) -> np.ndarray:
    """PyTorch's (cout, cin, k, k) weight as bf16 tiles: [cout/16][tap][cin/32][16 input pairs][16 outputs][2]."""
    taps = s.kernel ** 2
    tiles = bf16_bits(weight).reshape(s.cout // COLUMNS, COLUMNS, s.cin // DEPTH, DEPTH // 2, 2, taps)
    return np.ascontiguousarray(tiles.transpose(0, 5, 2, 3, 1, 4))


@functools.cache
def enable() -> None:
    """Ask Linux for the AMX tile state for this process (once; threads share it)."""
    if ctypes.CDLL(None, use_errno=True).syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0:
        raise SparsefxError(f"Linux refused the AMX tile state (errno {ctypes.get_errno()}); compile with "
                            "precision='fp32' or on a kernel that grants it (5.16 or later)")


def tile(name: str, *args):  # noqa: ANN201 (a TIR statement)
    return T.evaluate(T.call_llvm_intrin("void", f"llvm.x86.{name}", *args))


def group_size(pairs: int, tasks: int) -> int:
    """Output-channel pairs per task: the largest divisor of `pairs` that leaves about `TASKS` tasks."""
    wanted = max(1, pairs * tasks // TASKS)
    return max(d for d in range(1, pairs + 1) if pairs % d == 0 and d <= wanted)


def kernel(s: AmxSpec) -> tvm.tirx.PrimFunc:
    """The scheduled PrimFunc: out = act(conv(x, w) + bias [+ residual]), all NHWC."""
    k, st, p = s.kernel, s.stride, s.padding
    ho, wo = s.out_hw
    padded = k > 1 or p > 0
    rows_in, row = (s.height + 2 * p + 1, s.width + 2 * p) if padded else (s.height, s.width)
    flat = st == 1  # positions over the flat index (stride 1) or within output rows (stride 2)
    n_out = ho * row if flat else ho * wo
    m = min(ROWS, n_out if flat else wo)
    per_row = -(-wo // m)
    tiles = -(-n_out // m) if flat else ho * per_row
    # an odd last tile pairs with its predecessor, an odd last 16-channel block too (computed twice)
    pairs, co_pairs = -(-tiles // 2), -(-s.cout // (2 * COLUMNS))
    group = group_size(co_pairs, pairs)
    steps, taps = s.cin // DEPTH, k * k
    stride_bytes = st * s.cin * 2
    src_len = s.batch * rows_in * row * s.cin

    def first(t):  # noqa: ANN001, ANN202 (TIR expressions): a tile's first position, in the source's flat index
        if flat:
            return T.min(t * m, n_out - m)
        return t // per_row * st * row + T.min(t % per_row * m, wo - m) * st

    def position(t, r):  # noqa: ANN001, ANN202 (TIR expressions): (output row, column) of tile t's row r; -1 column: a padding column
        if flat:
            q = T.min(t * m, n_out - m) + r
            return q // row, T.if_then_else(q % row < wo, q % row, -1)
        return t // per_row, T.min(t % per_row * m, wo - m) + r

    @T.macro
    def fill(x, src, n):  # noqa: ANN001, ANN202 (a TVMScript macro): the image zero-padded (one spare row: the last windows run over)
        for r in T.parallel(rows_in):
            for c in range(row):
                for l0 in range(s.cin // DEPTH):
                    for lane in T.vectorized(DEPTH):
                        src[((n * rows_in + r) * row + c) * s.cin + l0 * DEPTH + lane] = T.if_then_else(
                            p <= r and r < p + s.height and p <= c and c < p + s.width,
                            x[n, T.min(T.max(r - p, 0), s.height - 1), T.min(T.max(c - p, 0), s.width - 1),
                              l0 * DEPTH + lane], T.uint16(0))

    @T.macro
    def body(x, w, bias, res, out):  # noqa: ANN001, ANN202
        flat_x = T.decl_buffer((src_len,), "uint16", data=x.data)
        src = T.alloc_buffer((src_len,) if padded else (1,), "uint16")
        for n in range(s.batch):
            if T.bool(padded):
                fill(x, src, n)
            for task in T.parallel(pairs * (co_pairs // group)):
                config = T.alloc_buffer((64,), "uint8", scope=STACK)
                for i in T.unroll(64):  # palette 1; tiles 0-3 accumulators, 4-5 inputs (m rows), 6-7 weights
                    config[i] = T.uint8(0)
                config[0] = T.uint8(1)
                for i in T.unroll(8):
                    config[16 + 2 * i] = T.uint8(64)
                for i in T.unroll(6):
                    config[48 + i] = T.uint8(m)
                config[54] = T.uint8(DEPTH // 2)
                config[55] = T.uint8(DEPTH // 2)
                tile("ldtilecfg", T.address_of(config[0]))
                t0: T.let = task // (co_pairs // group) * 2
                t1: T.let = T.min(t0 + 1, tiles - 1)
                base: T.let = n * rows_in * row
                acc = T.alloc_buffer((4, ROWS, COLUMNS), "float32", scope=STACK)
                for g in range(group):
                    ob: T.let = T.min((task % (co_pairs // group) * group + g) * 2, s.cout // COLUMNS - 2)
                    tile("tilezero", T.uint8(0))
                    tile("tilezero", T.uint8(1))
                    tile("tilezero", T.uint8(2))
                    tile("tilezero", T.uint8(3))
                    for tap in range(taps):
                        for c in range(steps):
                            if T.bool(padded):
                                tile("tileloadd64", T.uint8(4), T.address_of(
                                    src[(base + first(t0) + tap // k * row + tap % k) * s.cin + c * DEPTH]),
                                    T.int64(stride_bytes))
                                tile("tileloadd64", T.uint8(5), T.address_of(
                                    src[(base + first(t1) + tap // k * row + tap % k) * s.cin + c * DEPTH]),
                                    T.int64(stride_bytes))
                            else:
                                tile("tileloadd64", T.uint8(4), T.address_of(
                                    flat_x[(base + first(t0)) * s.cin + c * DEPTH]), T.int64(stride_bytes))
                                tile("tileloadd64", T.uint8(5), T.address_of(
                                    flat_x[(base + first(t1)) * s.cin + c * DEPTH]), T.int64(stride_bytes))
                            tile("tileloadd64", T.uint8(6), T.address_of(w[ob, tap, c, 0, 0, 0]), T.int64(64))
                            tile("tileloadd64", T.uint8(7), T.address_of(w[ob + 1, tap, c, 0, 0, 0]), T.int64(64))
                            tile("tdpbf16ps", T.uint8(0), T.uint8(4), T.uint8(6))
                            tile("tdpbf16ps", T.uint8(1), T.uint8(4), T.uint8(7))
                            tile("tdpbf16ps", T.uint8(2), T.uint8(5), T.uint8(6))
                            tile("tdpbf16ps", T.uint8(3), T.uint8(5), T.uint8(7))
                    tile("tilestored64", T.uint8(0), T.address_of(acc[0, 0, 0]), T.int64(64))
                    tile("tilestored64", T.uint8(1), T.address_of(acc[1, 0, 0]), T.int64(64))
                    tile("tilestored64", T.uint8(2), T.address_of(acc[2, 0, 0]), T.int64(64))
                    tile("tilestored64", T.uint8(3), T.address_of(acc[3, 0, 0]), T.int64(64))
                    for i in range(4):
                        for r in range(m):
                            oh: T.let = position(T.if_then_else(i < 2, t0, t1), r)[0]
                            ow: T.let = position(T.if_then_else(i < 2, t0, t1), r)[1]
                            if ow >= 0:
                                for lane in T.vectorized(COLUMNS):
                                    if T.bool(s.residual):
                                        out[n, oh, ow, (ob + i % 2) * COLUMNS + lane] = to_bf16(activate(
                                            acc[i, r, lane] + bias[(ob + i % 2) * COLUMNS + lane]
                                            + to_float(res[n, oh, ow, (ob + i % 2) * COLUMNS + lane]), s.activation))
                                    else:
                                        out[n, oh, ow, (ob + i % 2) * COLUMNS + lane] = to_bf16(activate(
                                            acc[i, r, lane] + bias[(ob + i % 2) * COLUMNS + lane], s.activation))
                tile("tilerelease")

    x_shape, w_shape, b_shape = s.arg_shapes[:3]
    if s.residual:
        @T.prim_func(private=True)
        def f(x: T.Buffer(x_shape, "uint16"), w: T.Buffer(w_shape, "uint16"), bias: T.Buffer(b_shape, "float32"),
              res: T.Buffer(s.out_shape, "uint16"), out: T.Buffer(s.out_shape, "uint16")):
            body(x, w, bias, res, out)
    else:
        @T.prim_func(private=True)
        def f(x: T.Buffer(x_shape, "uint16"), w: T.Buffer(w_shape, "uint16"), bias: T.Buffer(b_shape, "float32"),
              out: T.Buffer(s.out_shape, "uint16")):
            body(x, w, bias, out, out)
    return f.with_attr({"op_pattern": OPAQUE, "tirx.is_scheduled": True, "tirx.noalias": True})

