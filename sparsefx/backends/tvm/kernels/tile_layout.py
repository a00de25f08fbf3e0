"""The layout sparsefx's bf16 tile kernels take and give, and its kernels for the ops between them.

NHWC, bf16 bits as uint16 (TIR's bf16 legalisation is not needed where tiles, bit shifts and
AVX512-BF16's conversion are all that touch them), channels zero-padded to whole steps (`stored`):
32 channels, a tile's reduction step, on CPUs with AMX, or one 16-channel half step up to 16
channels; 16 on CPUs with only AVX512-BF16, whose `dpbf16` kernel takes input channels in pairs and
outputs in vectors of 16 (pruned MobileNetV2's 72, 48 and 80 channels stored as 80, 48 and 80, not
96, 64 and 96). Conversions to and from float32 NCHW (`to_tiles`, `from_tiles`), and the max-pool,
per-channel scale and global mean that `layout_chain` runs in the layout between AMX kernels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import tvm
from tvm import tirx
from tvm.script import tirx as T

from sparsefx.backends.tvm.kernels.depthwise import out_hw
from sparsefx.backends.tvm.sparse.kernels import LANES, OPAQUE, STACK
from sparsefx.target import has_tiles

TO_TILES, FROM_TILES = "amx_nhwc", "amx_nchw"  # names start with the kind `CompiledModel.profile` files them under
STEP = 32  # with AMX, channels are stored in whole steps of a tile's reduction, zero past the tensor's own
HALF_STEP = 16  # or, up to 16 channels, in one half step (one tile column; pruned MobileNetV2's 8 and 16)
FEW = 4  # channel counts stored as they are: a stem's input, whose window columns fold into one step
CONVERT = "llvm.x86.avx512bf16.cvtneps2bf16.512"  # 16 float32 -> 16 bf16 (AMX CPUs all have AVX512-BF16)


def channel_step() -> int:
    """The step channels are stored in on this CPU: a tile's 32 with AMX, else 16."""
    return STEP if has_tiles() else HALF_STEP


def stored(channels: int, step: int | None = None) -> int:
    """The channels a tensor of `channels` has in this layout, in steps of `step` (default: this CPU's)."""
    if channels <= FEW:
        return channels
    step = step or channel_step()
    return HALF_STEP if channels <= HALF_STEP else -(-channels // step) * step


def to_bf16(value):  # noqa: ANN001, ANN201 (TIR expressions): float32 -> bf16 bits, rounded to nearest even
    b = T.reinterpret("uint32", value)
    return T.Cast("uint16", T.shift_right(b + T.uint32(0x7FFF) + T.bitwise_and(T.shift_right(b, T.uint32(16)),
                                                                             T.uint32(1)), T.uint32(16)))


def to_bf16_vector(values):  # noqa: ANN001, ANN201 (TIR expressions): float32x16 -> bf16 bits x16, one instruction
    """AVX512-BF16's vcvtneps2bf16 (round to nearest even, as `to_bf16`): TIR's own bf16 casts, and
    `to_bf16`, take five integer instructions a vector."""
    return T.reinterpret(f"uint16x{LANES}", T.call_llvm_pure_intrin(f"bfloat16x{LANES}", CONVERT, values))


def to_float(bits):  # noqa: ANN001, ANN201 (TIR expressions): bf16 bits -> float32, exactly
    return T.reinterpret("float32", T.shift_left(T.Cast("uint32", bits), T.uint32(16)))


@dataclass(frozen=True)
class TileConv:
    """A conv on activations in this layout: square window, equal strides and padding."""

    batch: int
    cin: int
    cout: int
    height: int
    width: int
    kernel: int
    stride: int
    padding: int
    activation: str = "none"
    step: int = field(default_factory=channel_step, kw_only=True)  # `stored`'s, part of the spec's key

    @property
    def out_hw(self) -> tuple[int, int]:
        return out_hw(self)

    @property
    def nchw_in(self) -> tuple[int, int, int, int]:
        """The input's shape outside the layout (`to_tiles`)."""
        return (self.batch, self.cin, self.height, self.width)

    @property
    def nchw_out(self) -> tuple[int, int, int, int]:
        return (self.batch, self.cout, *self.out_hw)

    @property
    def cin_stored(self) -> int:
        return stored(self.cin, self.step)

    @property
    def cout_stored(self) -> int:
        return stored(self.cout, self.step)

    @property
    def in_shape(self) -> tuple[int, int, int, int]:
        return tiled(self.nchw_in, self.step)

    @property
    def out_shape(self) -> tuple[int, int, int, int]:
        return tiled(self.nchw_out, self.step)


def name(prefix: str, shape: tuple[int, ...]) -> str:
    """A layout kernel's name: what it does, then the shape it was made for."""
    return f"{prefix}_{'x'.join(map(str, shape))}"


def tiled(shape: tuple[int, int, int, int], step: int | None = None) -> tuple[int, int, int, int]:
    """The shape of an NCHW tensor in this layout."""
    n, c, h, w = shape
    return (n, h, w, stored(c, step))


def to_tiles(shape: tuple[int, int, int, int]) -> tvm.tirx.PrimFunc:
    """float32 (n, c, h, w) -> bf16 bits (n, h, w, stored c), zero past c."""
    n, c, h, w = shape
    cs = stored(c)
    lanes = LANES if cs % LANES == 0 else 1

    @T.prim_func(private=True, s_tir=True)
    def f(x: T.Buffer(shape, "float32"), out: T.Buffer((n, h, w, cs), "uint16")):
        with T.sblock("root"):  # TVM's reshape check (RewriteDataflowReshape) wants a root block
            for i in T.parallel(n * h):
                for col in range(w):
                    for c0 in range(cs // lanes):
                        for lane in T.vectorized(lanes):
                            out[i // h, i % h, col, c0 * lanes + lane] = T.if_then_else(
                                c0 * lanes + lane < c, to_bf16(x[i // h, T.min(c0 * lanes + lane, c - 1), i % h, col]),
                                T.uint16(0))

    return f.with_attr({"op_pattern": OPAQUE, "tirx.is_scheduled": True, "tirx.noalias": True})


def from_tiles(shape: tuple[int, int, int, int]) -> tvm.tirx.PrimFunc:
    """bf16 bits (n, h, w, stored c) -> float32 (n, c, h, w)."""
    n, c, h, w = shape
    cs = stored(c)
    lanes = LANES if w % LANES == 0 else 1

    @T.prim_func(private=True, s_tir=True)
    def f(x: T.Buffer((n, h, w, cs), "uint16"), out: T.Buffer(shape, "float32")):
        with T.sblock("root"):
            for i in T.parallel(n * c):
                for row in range(h):
                    for c0 in range(w // lanes):
                        for lane in T.vectorized(lanes):
                            out[i // c, i % c, row, c0 * lanes + lane] = to_float(x[i // c, row, c0 * lanes + lane, i % c])

    return f.with_attr({"op_pattern": OPAQUE, "tirx.is_scheduled": True, "tirx.noalias": True})


def max_pool(shape: tuple[int, int, int, int], out_hw: tuple[int, int], window: int, stride: int,
             padding: int) -> tvm.tirx.PrimFunc:
    """max_pool2d over NHWC bf16 bits (exact: the max of bf16 values is one of them), 16 channels a vector."""
    n, h, w, c = shape
    ho, wo = out_hw
    lanes = LANES if c % LANES == 0 else 1

    def biggest(x, i, col, ch):  # noqa: ANN001, ANN202 (TIR expressions): the window's max, -inf off the image
        best = T.float32(float("-inf"))
        for kh in range(window):
            for kw in range(window):
                ih, iw = i % ho * stride - padding + kh, col * stride - padding + kw
                value = to_float(x[i // ho, T.min(T.max(ih, 0), h - 1), T.min(T.max(iw, 0), w - 1), ch])
                best = T.max(best, T.if_then_else(tvm.tirx.all(0 <= ih, ih < h, 0 <= iw, iw < w), value,
                                                  T.float32(float("-inf"))))
        return best

    @T.prim_func(private=True, s_tir=True)
    def f(x: T.Buffer(shape, "uint16"), out: T.Buffer((n, ho, wo, c), "uint16")):
        with T.sblock("root"):
            for i in T.parallel(n * ho):
                for col in range(wo):
                    for c0 in range(c // lanes):
                        for lane in T.vectorized(lanes):
                            out[i // ho, i % ho, col, c0 * lanes + lane] = to_bf16(biggest(x, i, col, c0 * lanes + lane))

    return f.with_attr({"op_pattern": OPAQUE, "tirx.is_scheduled": True, "tirx.noalias": True})


def scale(shape: tuple[int, int, int, int], channels: int) -> tvm.tirx.PrimFunc:
    """NHWC bf16 bits times a float32 scale per image and channel, (n, channels, 1, 1) (squeeze-and-
    excitation's `x * s`), 16 channels a vector; the stored channels past `channels` stay zero."""
    n, h, w, cs = shape

    whole = channels // LANES  # vectors of channels the scale covers whole; then at most one part-vector

    @T.prim_func(private=True, s_tir=True)
    def f(x: T.Buffer(shape, "uint16"), s: T.Buffer((n, channels, 1, 1), "float32"), out: T.Buffer(shape, "uint16")):
        with T.sblock("root"):
            for i in T.parallel(n * h):
                done = T.alloc_buffer((LANES,), "float32", scope=STACK)
                for col in range(w):
                    for c0 in range(cs // LANES):
                        if c0 < whole:  # contiguous scales: a vector load, not a gather of clamped indices
                            for lane in T.vectorized(LANES):
                                done[lane] = to_float(x[i // h, i % h, col, c0 * LANES + lane]) * s[
                                    i // h, c0 * LANES + lane, 0, 0]
                        else:
                            for lane in T.vectorized(LANES):
                                done[lane] = to_float(x[i // h, i % h, col, c0 * LANES + lane]) * s[
                                    i // h, T.min(c0 * LANES + lane, channels - 1), 0, 0]
                        out[i // h, i % h, col, tirx.Ramp(c0 * LANES, 1, LANES)] = to_bf16_vector(
                            done[tirx.Ramp(0, 1, LANES)])

    return f.with_attr({"op_pattern": OPAQUE, "tirx.is_scheduled": True, "tirx.noalias": True})


def mean(shape: tuple[int, int, int, int], channels: int) -> tvm.tirx.PrimFunc:
    """The mean over each image's positions of NHWC bf16 bits, as float32 (n, channels, 1, 1) (a global
    average pool), 16 channels a vector summed in float32."""
    n, h, w, cs = shape

    @T.prim_func(private=True, s_tir=True)
    def f(x: T.Buffer(shape, "uint16"), out: T.Buffer((n, channels, 1, 1), "float32")):
        with T.sblock("root"):
            for i in T.parallel(n * (cs // LANES)):
                total = T.alloc_buffer((LANES,), "float32", scope=STACK)
                for lane in T.vectorized(LANES):
                    total[lane] = T.float32(0)
                for p in range(h * w):
                    for lane in T.vectorized(LANES):
                        total[lane] = total[lane] + to_float(x[i // (cs // LANES), p // w, p % w,
                                                                 i % (cs // LANES) * LANES + lane])
                for lane in range(LANES):
                    if i % (cs // LANES) * LANES + lane < channels:
                        out[i // (cs // LANES), i % (cs // LANES) * LANES + lane, 0, 0] = total[lane] / T.float32(h * w)

    return f.with_attr({"op_pattern": OPAQUE, "tirx.is_scheduled": True, "tirx.noalias": True})


