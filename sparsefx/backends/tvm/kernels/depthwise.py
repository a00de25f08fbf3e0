"""A CPU TIR kernel for depthwise convolutions, with the bias and activation fused in.

oneDNN runs depthwise convs in NCHW at 20-40 GFLOP/s, and slower still where the channel
count is not a multiple of its 8/16-channel blocks (MobileNetV2's 144-channel 3x3 at 56x56
takes 0.20 ms, pruned to 72 channels 0.25 ms on one thread). This kernel works one (image,
channel) plane at a time: it copies the plane, zero-padded, into `stride²` phase planes
(rows and columns split by their remainder mod the stride, so a strided window becomes an
unstrided one), then computes each output row, 16-lane vectors along it (the last shifted back
to end at the row's end), with the bias and activation, and stores it straight into the output.
(Computing the phase planes' flat index instead, output rows and their padding columns alike, and
copying the rows out after took 10-30% longer on 28x28 to 112x112 maps: MobileNetV2's 32 channels at
112x112 0.231 -> 0.169 ms, 144 at 56x56 0.248 -> 0.180.) The dispatch times it beside PyTorch and
TIR per workload (`supported` says where it applies) and `own_kernels.own_kernel_pass` swaps in the
winners.

Small planes pay for that per-plane work (zeroing and filling the phase planes) on few outputs,
and a 7-wide output row fills 7 of a vector's 16 lanes. Where output rows
are at most 14 wide (`by_channels`) the kernel instead takes 16 channels at a time: it gathers
their planes, zero-padded, into one [row][column][16] tile, and keeps a whole output row of
16-channel vectors in registers while it runs over the taps (the weight repacked at compile time
as [block][kh][kw][16], `pack_weight`). One thread, the kernels alone: EfficientNet-B0's 1152
channels 5x5 at 7x7 0.108 -> 0.048 ms, 672 5x5 at 14x14 0.159 -> 0.091, stride 2 to 7x7 0.115 ->
0.054; MobileNetV2's 960 3x3 at 7x7 0.056 -> 0.025; 480 3x3 at 14x14 even; 28-wide rows lost.

A 3x3 stride-2 window over rows of even width takes no phase planes (`row_pair_kernel`): each input
row's 32 columns are split into even and odd columns by two shuffles as they are loaded. One
thread, the kernels alone: MobileNetV2's 96 channels at 112x112 0.385 -> 0.212 ms (ONNX Runtime's
in the model: 0.238), 144 at 56x56 0.109 -> 0.076. A 3x3 stride-1 window over rows wider than 16
takes no padded plane either (`row_kernel`): the side taps are loads one column either side, moved
by a lane at a row's ends: 32 channels at 112x112 0.174 -> 0.109 ms, 144 at 56x56 0.190 -> 0.133.

Each task computes from a stretch of input it read at once, and nothing fetched the next stretch
meanwhile: each task now prefetches its successor's input into L2 while it computes (`prefetch`).
Kernels alone on inputs not in cache, one thread: 0.79-0.97 of before (144 channels 5x5 stride 2 at
56x56 0.157 -> 0.125 ms, 144 3x3 at 56x56 0.188 -> 0.160), 112x112 even (prefetched into L1 instead,
the next 112x112 plane evicted the phase planes: 6% slower); EfficientNet-B0 1.5-2.4% faster,
MobileNetV2 even (its depthwise inputs are in cache, just written by the 1x1 conv before).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import tirx
from tvm.script import tirx as T

from sparsefx.backends.tvm.kernels.phase_planes import PhasePlanes
from sparsefx.backends.tvm.sparse.kernels import LANES, OPAQUE, STACK

ACTIVATIONS = ("none", "relu", "relu6", "silu")
FUSES_RESIDUAL = False  # a residual add after it stays a TIR element-wise kernel
NARROW = 14  # the widest output rows vectorised over channels (`by_channels`; 28 lost)


def blocks_starting(count: int, width: int) -> list[int]:
    """Where each block of `width` starts over `count` items, the last shifted back to end at the end
    (the channel blocks of the kernels' repacked weights)."""
    return [min(b * width, count - width) for b in range(-(-count // width))]


def out_hw(spec: object) -> tuple[int, int]:
    """Output height and width of a spec's square `kernel` with equal `stride` and `padding`."""
    return tuple((size + 2 * spec.padding - spec.kernel) // spec.stride + 1 for size in (spec.height, spec.width))


@dataclass(frozen=True)
class PlaneWindow:
    """A square window sliding over each (image, channel) plane alike, equal strides and padding."""

    batch: int
    channels: int
    height: int
    width: int
    kernel: int
    stride: int
    padding: int

    @property
    def out_hw(self) -> tuple[int, int]:
        return out_hw(self)

    @property
    def out_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.channels, *self.out_hw)


@dataclass(frozen=True)
class DepthwiseSpec(PlaneWindow):
    """A depthwise conv (one filter per channel)."""

    activation: str = "none"

    @property
    def arg_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Shapes of the kernel's arguments: input, weight, bias, output."""
        weight = (self.channel_blocks, self.kernel, self.kernel, LANES) if self.by_channels else self.weight_shape
        return ((self.batch, self.channels, self.height, self.width), weight, (self.channels,), self.out_shape)

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        """PyTorch's weight shape (`pack_weight` turns it into `arg_shapes[1]`)."""
        return (self.channels, 1, self.kernel, self.kernel)

    @property
    def channel_blocks(self) -> int:
        return -(-self.channels // LANES)

    @property
    def by_channels(self) -> bool:
        """Vectorise over 16 channels at a time (output rows of at most `NARROW` columns, 16 channels or more)."""
        return self.out_hw[1] <= NARROW and self.channels >= LANES

    @property
    def by_rows(self) -> bool:
        """A 3x3 stride-1 window over rows of more than 16 columns (`row_kernel`: a row's first and
        last vectors differ)."""
        return not self.by_channels and (self.kernel, self.stride, self.padding) == (3, 1, 1) and self.width > LANES

    @property
    def by_row_pairs(self) -> bool:
        """A 3x3 stride-2 window over rows of even width (`row_pair_kernel`)."""
        return not self.by_channels and (self.kernel, self.stride, self.padding) == (3, 2, 1) \
            and self.width % 2 == 0 and self.width >= 2 * LANES

    @property
    def name(self) -> str:
        return f"depthwise_c{self.channels}_{self.height}x{self.width}_k{self.kernel}s{self.stride}p{self.padding}_" \
               f"b{self.batch}_{self.activation}" + ("_cv" if self.by_channels else "_r" if self.by_rows else "_rp" if self.by_row_pairs else "")


def pack_weight(s: DepthwiseSpec, weight: np.ndarray) -> np.ndarray:
    """PyTorch's (channels, 1, k, k) weight in the kernel's layout: unchanged, or where `by_channels`
    [block][kh][kw][16], block b holding channels from min(16 b, channels - 16) on."""
    if not s.by_channels:
        return weight
    taps = weight.reshape(s.channels, s.kernel, s.kernel)
    return np.ascontiguousarray(np.stack([taps[c:c + LANES].transpose(1, 2, 0) for c in blocks_starting(s.channels, LANES)]),
                                dtype=np.float32)


def supported(attrs: tuple[int, ...], shapes: tuple[tuple[int, ...], ...]) -> bool:
    """Whether a conv2d workload (dispatch's attrs and shapes) is one this kernel runs."""
    s0, s1, p0, p1, d0, d1, groups = attrs
    (_, cin, _, _), (cout, ci, kh, kw), (_, _, oh, ow) = shapes
    return groups == cin == cout and ci == 1 and kh == kw and s0 == s1 in (1, 2) and p0 == p1 < kh \
        and d0 == d1 == 1 and oh * ow >= 4


def spec_of(attrs: tuple[int, ...], shapes: tuple[tuple[int, ...], ...], activation: str = "none") -> DepthwiseSpec:
    (n, c, h, w), (_, _, k, _) = shapes[:2]
    return DepthwiseSpec(n, c, h, w, k, attrs[0], attrs[2], activation)


def activate(value, activation: str):  # noqa: ANN001, ANN202 (TIR expressions)
    if activation == "relu":
        return T.max(value, T.float32(0))
    if activation == "relu6":
        return T.min(T.max(value, T.float32(0)), T.float32(6))
    if activation == "silu":
        return value / (T.float32(1) + fast_exp(-value))
    if activation == "gelu":
        return T.float32(0.5) * value * (T.float32(1) + erf(value * T.float32(1 / math.sqrt(2))))
    if activation == "gelu_tanh":  # 0.5 v (1 + tanh(u)) = v / (1 + exp(-2u))
        u = T.float32(math.sqrt(2 / math.pi)) * (value + T.float32(0.044715) * value * value * value)
        return value / (T.float32(1) + fast_exp(T.float32(-2) * u))
    return value


# erf(x) ~ x p(x^2) / q(x^2) on [-4, 4] (clamped outside, where float32's erf is +-1): Eigen's coefficients
ERF_ALPHA = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
             -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
ERF_BETA = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
            -1.42647390514189e-02)


def erf(x):  # noqa: ANN001, ANN201 (a TIR expression)
    """erf that vectorises (libm's is a scalar call per lane): x p(x^2) / q(x^2), clamped to [-4, 4]."""
    x = T.max(T.min(x, T.float32(4)), T.float32(-4))
    x2 = x * x
    p = T.float32(ERF_ALPHA[0])
    for a in ERF_ALPHA[1:]:
        p = p * x2 + T.float32(a)
    q = T.float32(ERF_BETA[0])
    for b in ERF_BETA[1:]:
        q = q * x2 + T.float32(b)
    return x * p / q


def fast_exp(value):  # noqa: ANN001, ANN202 (TIR expressions)
    """exp that vectorises: LLVM turns `T.exp` into one libm call per lane, which made a fused SiLU
    cost 3-5x the convolution. Cephes' expf: n = round(x·log2 e), a degree-5 polynomial on the
    remainder (within 2 ulp), times 2^n built in the exponent bits; |x| clamped to 88.38 (no inf)."""
    x = T.max(T.min(value, T.float32(88.3762626647949)), T.float32(-88.3762626647949))
    n = T.floor(x * T.float32(1.44269504088896341) + T.float32(0.5))
    r = x - n * T.float32(0.693359375) + n * T.float32(2.12194440e-4)
    p = T.float32(1.9875691500e-4)
    for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        p = p * r + T.float32(c)
    scale = T.reinterpret("float32", T.shift_left(T.Cast("int32", n) + 127, 23))
    return (p * r * r + r + T.float32(1)) * scale


def kernel(s: DepthwiseSpec) -> tvm.tirx.PrimFunc:
    """The scheduled PrimFunc: out = act(depthwise(x, w) + bias)."""
    f = channel_vector_kernel(s) if s.by_channels else row_kernel(s) if s.by_rows else \
        row_pair_kernel(s) if s.by_row_pairs else plane_kernel(s)
    return f.with_attr({"op_pattern": OPAQUE, "tirx.is_scheduled": True, "tirx.noalias": True})


@T.macro
def prefetch(flat, start, size, oh, ho):  # noqa: ANN001, ANN202
    """Output row oh's share (of ho) of the cache lines of the `size` floats of `flat` from `start` on,
    on their way into L2: each task fetches its successor's input while it computes from its own, a
    share per output row (a call inside the loops holding accumulators in registers made LLVM store
    them every step)."""
    for line in range(oh * ((size + LANES - 1) // LANES) // ho, (oh + 1) * ((size + LANES - 1) // LANES) // ho):
        T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(flat[start + T.min(line * LANES, size - 1)]),
                                      T.int32(0), T.int32(2), T.int32(1)))


def channel_vector_kernel(s: DepthwiseSpec) -> tvm.tirx.PrimFunc:
    """16 channels per task: their planes gathered, zero-padded, into a [row][column][16] tile, then
    each output row's vectors accumulated over the taps in registers (the last block of channels
    shifted back to end at the last channel: its overlap is computed twice, with the same result)."""
    k, st, pad = s.kernel, s.stride, s.padding
    ho, wo = s.out_hw
    rows, columns, blocks = s.height + 2 * pad, s.width + 2 * pad, s.channel_blocks
    act = s.activation
    tasks, plane_size = s.batch * blocks, s.height * s.width

    @T.prim_func(private=True)
    def f(x: T.Buffer(s.arg_shapes[0], "float32"), w: T.Buffer(s.arg_shapes[1], "float32"),
          bias: T.Buffer(s.arg_shapes[2], "float32"), out: T.Buffer(s.arg_shapes[3], "float32")):
        flat = T.decl_buffer((s.batch * s.channels * plane_size,), "float32", data=x.data)
        for t in T.parallel(tasks):
            n: T.let = t // blocks
            b: T.let = t % blocks
            c0: T.let = T.min(b * LANES, s.channels - LANES)
            later: T.let = T.min(t + 1, tasks - 1)  # the next task: its block's 16 planes, one stretch of memory
            later_start: T.let = (later // blocks * s.channels + T.min(later % blocks * LANES, s.channels - LANES)) * plane_size
            tile = T.alloc_buffer((rows, columns, LANES), "float32", scope=STACK)
            for i in range(rows):  # zeros where the padding is: the top and bottom rows, then each row's ends
                if i < pad or i >= pad + s.height:
                    for j in range(columns):
                        for lane in T.vectorized(LANES):
                            tile[i, j, lane] = T.float32(0)
                else:
                    for j in range(pad):
                        for lane in T.vectorized(LANES):
                            tile[i, j, lane] = T.float32(0)
                            tile[i, columns - 1 - j, lane] = T.float32(0)
            for i in range(s.height):
                for j in range(s.width):
                    for lane in T.vectorized(LANES):
                        tile[i + pad, j + pad, lane] = x[n, c0 + lane, i, j]
            for oh in range(ho):
                prefetch(flat, later_start, plane_size * LANES, oh, ho)
                acc = T.alloc_buffer((wo, LANES), "float32", scope=STACK)
                for ow in T.unroll(wo):
                    for lane in T.vectorized(LANES):
                        acc[ow, lane] = bias[c0 + lane]
                for kh in T.unroll(k):
                    for kw in T.unroll(k):
                        for ow in T.unroll(wo):
                            for lane in T.vectorized(LANES):
                                acc[ow, lane] = acc[ow, lane] + tile[oh * st + kh, ow * st + kw, lane] * w[b, kh, kw, lane]
                for ow in T.unroll(wo):
                    for lane in T.vectorized(LANES):
                        out[n, c0 + lane, oh, ow] = activate(acc[ow, lane], act)

    return f


def plane_kernel(s: DepthwiseSpec) -> tvm.tirx.PrimFunc:
    """One (image, channel) plane per task: its phase planes filled, then each output row's vectors
    (the last shifted back to end at the row's end) computed and stored straight into the output."""
    k, st = s.kernel, s.stride
    ho, wo = s.out_hw
    geometry = PhasePlanes(s.height, s.width, k, st, s.padding, ho)
    fill, wq, ph = geometry.filler(), geometry.row, geometry.phases
    lanes = min(LANES, wo)
    nvec = -(-wo // lanes)
    act = s.activation
    planes, plane_size = s.batch * s.channels, s.height * s.width

    @T.prim_func(private=True)
    def f(x: T.Buffer(s.arg_shapes[0], "float32"), w: T.Buffer(s.arg_shapes[1], "float32"),
          bias: T.Buffer(s.arg_shapes[2], "float32"), out: T.Buffer(s.arg_shapes[3], "float32")):
        flat = T.decl_buffer((planes * plane_size,), "float32", data=x.data)
        for t in T.parallel(planes):
            n: T.let = t // s.channels
            c: T.let = t % s.channels
            plane = T.alloc_buffer((1, ph * ph, geometry.size), "float32", scope=STACK)
            fill(x, plane, n, c, 0, 0)
            for oh in range(ho):
                prefetch(flat, T.min(t + 1, planes - 1) * plane_size, plane_size, oh, ho)
                for v in range(nvec):
                    acc = T.alloc_buffer((lanes,), "float32", scope=STACK)
                    ow0: T.let = T.min(v * lanes, wo - lanes)
                    for lane in T.vectorized(lanes):
                        acc[lane] = bias[c]
                    for kh in T.unroll(k):
                        for kw in T.unroll(k):
                            for lane in T.vectorized(lanes):
                                acc[lane] = acc[lane] + w[c, 0, kh, kw] * \
                                    plane[0, kh % st * ph + kw % st, (oh + kh // st) * wq + ow0 + lane + kw // st]
                    for lane in T.vectorized(lanes):
                        out[n, c, oh, ow0 + lane] = activate(acc[lane], act)

    return f


def row_pair_kernel(s: DepthwiseSpec) -> tvm.tirx.PrimFunc:
    """A 3x3 stride-2 window (padding 1) straight from the input, no phase planes: per input row and
    16 outputs from column ow0, one 32-column load split by two shuffles into the even columns 2 ow
    (the middle tap) and the odd ones 2 ow + 1 (the right tap); the left tap 2 ow - 1 is the odd
    ones moved one lane up, the column before them (zero at the left edge) in lane 0. Copying the
    plane into phase planes first took half the time of MobileNetV2's 96 channels at 112x112."""
    evens = [tirx.IntImm("int32", 2 * m) for m in range(LANES)]
    odds = [tirx.IntImm("int32", 2 * m + 1) for m in range(LANES)]
    before = [tirx.IntImm("int32", m) for m in [0, *range(LANES, 2 * LANES - 1)]]  # lane 0 of the first, then O[0..14]
    lanes = tirx.Ramp(0, 1, LANES)

    @T.macro
    def add_row(acc, x, w, n, c, i, kh, v, ow0):  # noqa: ANN001, ANN202
        row = x[n, c, i, tirx.Ramp(2 * ow0, 1, 2 * LANES)]
        odd = tirx.Shuffle([row], odds)
        edge = T.if_then_else(ow0 > 0, x[n, c, i, T.max(2 * ow0 - 1, 0)], T.float32(0))
        acc[lanes] = acc[lanes] + tirx.Shuffle([tirx.Broadcast(edge, LANES), odd], before) * w[c, 0, kh, 0] \
            + tirx.Shuffle([row], evens) * w[c, 0, kh, 1] + odd * w[c, 0, kh, 2]

    return row_window_kernel(s, add_row)


def row_kernel(s: DepthwiseSpec) -> tvm.tirx.PrimFunc:
    """A 3x3 stride-1 window (padding 1) straight from the input, no padded plane: per input row and
    16 outputs from column ow0, the middle tap one load, the side taps loads one column either side,
    except at a row's ends, where they are the middle load moved a lane, a zero in the lane that
    falls off the row."""
    nvec = -(-s.out_hw[1] // LANES)
    up = [tirx.IntImm("int32", m) for m in [0, *range(LANES, 2 * LANES - 1)]]  # [zero, mid[0..14]]
    down = [tirx.IntImm("int32", m) for m in range(1, LANES + 1)]  # [mid[1..15], zero]
    zeros = tirx.Broadcast(T.float32(0), LANES)
    lanes = tirx.Ramp(0, 1, LANES)

    @T.macro
    def add_row(acc, x, w, n, c, i, kh, v, ow0):  # noqa: ANN001, ANN202
        mid = x[n, c, i, tirx.Ramp(ow0, 1, LANES)]
        if v == 0:
            acc[lanes] = acc[lanes] + tirx.Shuffle([zeros, mid], up) * w[c, 0, kh, 0] + mid * w[c, 0, kh, 1] \
                + x[n, c, i, tirx.Ramp(ow0 + 1, 1, LANES)] * w[c, 0, kh, 2]
        elif v == nvec - 1:
            acc[lanes] = acc[lanes] + x[n, c, i, tirx.Ramp(ow0 - 1, 1, LANES)] * w[c, 0, kh, 0] \
                + mid * w[c, 0, kh, 1] + tirx.Shuffle([mid, zeros], down) * w[c, 0, kh, 2]
        else:
            acc[lanes] = acc[lanes] + x[n, c, i, tirx.Ramp(ow0 - 1, 1, LANES)] * w[c, 0, kh, 0] \
                + mid * w[c, 0, kh, 1] + x[n, c, i, tirx.Ramp(ow0 + 1, 1, LANES)] * w[c, 0, kh, 2]

    return row_window_kernel(s, add_row)


def row_window_kernel(s: DepthwiseSpec, add_row) -> tvm.tirx.PrimFunc:  # noqa: ANN001 (a TVMScript macro)
    """A 3x3 window (padding 1) computed from the input rows, one plane per task: `add_row(acc, x, w,
    n, c, i, kh, v, ow0)` adds input row i's share (window row kh) to the 16 outputs from column ow0
    (the v-th vector of the output row, the last shifted back to end at the row's end). Tasks by bands
    of rows instead, so that threads split the map as `pointwise.bands` does, read each plane in
    pieces: 1.2-1.5x slower with 2 bands, 1.7-3x with 16, one thread."""
    ho, wo = s.out_hw
    planes, plane_size = s.batch * s.channels, s.height * s.width
    nvec = -(-wo // LANES)
    act = s.activation

    @T.prim_func(private=True)
    def f(x: T.Buffer(s.arg_shapes[0], "float32"), w: T.Buffer(s.arg_shapes[1], "float32"),
          bias: T.Buffer(s.arg_shapes[2], "float32"), out: T.Buffer(s.arg_shapes[3], "float32")):
        flat = T.decl_buffer((planes * plane_size,), "float32", data=x.data)
        for t in T.parallel(planes):
            n: T.let = t // s.channels
            c: T.let = t % s.channels
            for oh in range(ho):
                prefetch(flat, T.min(t + 1, planes - 1) * plane_size, plane_size, oh, ho)
                for v in range(nvec):
                    ow0: T.let = T.min(v * LANES, wo - LANES)
                    acc = T.alloc_buffer((LANES,), "float32", scope=STACK)
                    for lane in T.vectorized(LANES):
                        acc[lane] = bias[c]
                    for kh in T.unroll(3):
                        i: T.let = oh * s.stride - 1 + kh
                        if 0 <= i and i < s.height:
                            add_row(acc, x, w, n, c, i, kh, v, ow0)
                    for lane in T.vectorized(LANES):
                        out[n, c, oh, ow0 + lane] = activate(acc[lane], act)

    return f
