"""A CPU TIR kernel for 1x1 convolutions (stride 1, no groups), bias, residual add and activation fused.

A 1x1 conv in NCHW is a matrix product per image, out[co, p] = sum_ci w[co, ci] x[ci, p] over
the flat pixel index p. PyTorch runs it on oneDNN, which reorders activations into 8/16-channel
blocks on the way in and out and pads channel counts that are not multiples of them: on the
small channel counts pruning leaves it falls far below its speed on the dense model (MobileNetV2
pruned 12 -> 72 channels at 56x56: 0.11 ms on oneDNN, 0.036 ms here, one thread). This kernel
keeps an 8-channel x 32-pixel block of outputs in registers (16 AVX-512 accumulators) while it
runs over the input channels: each step loads two vectors of one input row and broadcasts eight
weights. The last block of channels and of pixels is shifted back to end at the edge rather
than made ragged (its overlap is computed twice, with the same result), so every block is whole.
The dispatch times it beside PyTorch per workload (`supported` says where it applies).

On small maps (14x14 and below) a 32-pixel block wastes much of its lanes (49 pixels take two
blocks, 64 lanes) and each block runs over few pixels, so there the kernel vectorises over output
channels instead (`by_channels`): a block of 32 output channels (two vectors, lanes of a weight
repacked at compile time as [block][cin][32], `pack_weight`) x 7-14 pixels (each input value
broadcast from memory into its multiply-add), the pixel count picked to divide the map. One thread,
weights in cache: ResNet-50's 512 -> 2048 at 7x7 0.83 -> 0.63 ms (oneDNN 0.86), 1024 -> 256 at
14x14 0.77 -> 0.54 (oneDNN 0.68), MobileNetV2's 960 -> 160 at 7x7 0.114 -> 0.087. It lost at 28x28,
and with cold weights where cin is large (`MAX_CIN`). Whole models, one process, compiled before and
after: one thread 2-5% faster (ResNet-50, MobileNetV2, EfficientNet-B0), two threads within 1%.

Threads split the blocks by output channels, or, where the input is large and the weight stays in
cache, by bands of the map (`bands`), so that on two threads a kernel reads the input rows its own
core wrote: ResNet-50 pruned 50% 5.8% faster at two threads, MobileNetV2 3.2% (6.1% pruned),
EfficientNet-B0 1.9% (4.3%); one thread within 1.7% (same dispatch decisions, one process).
Where the input comes from memory (several images, or one large map) and has many channels, each
band's input rows are first copied together (`packed_band_body`), so that the blocks do not read
one stream per input channel: ResNet-50 at 8 images 0.95 of the time before (one thread), 0.88 (two).

A `scaled` kernel also takes a per-image, per-input-channel scale (squeeze-and-excitation's
`x * s`, which `own_kernels.own_kernel_pass` folds in): conv(x * s, w) = conv(x, w * s), so each
block scales its rows of the weight once (rows x cin products against the block's rows x cin x
pixels multiply-adds) instead of a separate kernel reading and writing all of x (EfficientNet-B0
has one such multiply before each block's last 1x1 conv).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm.script import tirx as T

from sparsefx.backends.tvm.kernels.depthwise import activate, blocks_starting
from sparsefx.backends.tvm.sparse.kernels import LANES, OPAQUE, STACK

ROWS, PIXELS = 8, 32  # output channels x pixels held in registers; (8, 32) beat (4|6|12|16, 16-64) on MobileNetV2
CHANNEL_BLOCK = 2 * LANES  # output channels x `pixel_block` pixels in registers where `by_channels`
SMALL_PLANE = 14 * 14  # the largest map vectorised over channels (it lost at 28x28)
# the most input channels vectorised over channels: each pixel block re-reads its block's packed weight,
# cin x 32 floats; timed with cold weights, 2048 -> 512 at 7x7 lost (0.98 vs 0.89 ms), 1152 -> 192 won
MAX_CIN = 1280
TASKS = 16  # parallel tasks at least, where the map has enough pixel blocks (threads go up to 16 here)
INPUT_IN_CACHE = 1 << 20  # bytes of input read once per channel block at most (half this Xeon's L2)
BAND_INPUT = 1 << 18  # bytes of input per band of the map at most (`bands`)
WEIGHT_IN_CACHE = 1 << 20  # bytes of weight that bands re-read from cache
FUSES_RESIDUAL = True
# fewer input channels or channel blocks: the copy cost more than it saved (`packed_band_body`)
PACKED_MIN_CIN, PACKED_MIN_BLOCKS = 64, 3


@dataclass(frozen=True)
class PointwiseSpec:
    batch: int
    cin: int
    cout: int
    height: int
    width: int
    activation: str = "none"
    residual: bool = False
    scaled: bool = False

    @property
    def out_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.cout, self.height, self.width)

    @property
    def arg_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Shapes of the kernel's arguments: input, weight, bias, [scale,] [residual,] output."""
        scale = ((self.batch, self.cin, 1, 1),) if self.scaled else ()
        residual = (self.out_shape,) if self.residual else ()
        weight = (self.channel_blocks, self.cin, CHANNEL_BLOCK) if self.by_channels else self.weight_shape
        return ((self.batch, self.cin, self.height, self.width), weight, (self.cout,), *scale, *residual,
                self.out_shape)

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        """PyTorch's weight shape (`pack_weight` turns it into `arg_shapes[1]`)."""
        return (self.cout, self.cin, 1, 1)

    @property
    def plane(self) -> int:
        return self.height * self.width

    @property
    def pixel_block(self) -> int:
        """Pixels per block where `by_channels`: the count of 7-14 that wastes least on this map,
        two loads and stores per block counted as two pixels (49 pixels: 10, 196: 14)."""
        return min(range(7, 15), key=lambda b: (-(-self.plane // b) * (b + 2), -b))

    @property
    def channel_blocks(self) -> int:
        return -(-self.cout // CHANNEL_BLOCK)

    @property
    def by_channels(self) -> bool:
        """Vectorise over output channels: on a small map, where its blocks waste fewer lanes than 8 x 32
        pixel blocks would (the last block of each kind is shifted back, its overlap computed twice)."""
        if self.plane > SMALL_PLANE or self.cout < CHANNEL_BLOCK or self.cin > MAX_CIN:
            return False
        plane, cout = self.plane, self.cout
        wasted_here = self.channel_blocks * CHANNEL_BLOCK / cout * -(-plane // self.pixel_block) * self.pixel_block
        wasted_by_pixels = -(-cout // ROWS) * ROWS / cout * -(-plane // PIXELS) * PIXELS
        return wasted_here <= wasted_by_pixels

    @property
    def pixel_bands(self) -> int:
        """Bands of the map the pixel-vector bodies split it into (`bands`, over `PIXELS`-pixel blocks)."""
        return bands(-(-self.plane // PIXELS), self.cin * self.plane * 4, self.cin * self.cout * 4)

    @property
    def packs_bands(self) -> bool:
        """Whether each band's input rows are copied together before its blocks run (`packed_band_body`):
        where the map is split into bands, enough of them for the threads (`TASKS`), and the input has
        the channels to pay for the copy."""
        if self.by_channels or self.scaled or self.cin < PACKED_MIN_CIN or -(-self.cout // ROWS) < PACKED_MIN_BLOCKS:
            return False
        return self.pixel_bands > 1 and self.batch * self.pixel_bands >= TASKS

    @property
    def name(self) -> str:
        return f"pointwise_{self.cin}to{self.cout}_{self.height}x{self.width}_b{self.batch}_{self.activation}" + \
            ("_scaled" if self.scaled else "") + ("_res" if self.residual else "") + ("_cv" if self.by_channels else "") + \
            ("_pk" if self.packs_bands else "")


def pack_weight(s: PointwiseSpec, weight: np.ndarray) -> np.ndarray:
    """PyTorch's (cout, cin, 1, 1) weight in the kernel's layout: unchanged, or where `by_channels`
    [block][cin][32], block b holding output channels from min(32 b, cout - 32) on."""
    if not s.by_channels:
        return weight
    rows = weight.reshape(s.cout, s.cin)
    return np.ascontiguousarray(np.stack([rows[c:c + CHANNEL_BLOCK].T for c in blocks_starting(s.cout, CHANNEL_BLOCK)]),
                                dtype=np.float32)


def supported(attrs: tuple[int, ...], shapes: tuple[tuple[int, ...], ...]) -> bool:
    """Whether a conv2d workload (dispatch's attrs and shapes) is one this kernel runs: 1x1, stride 1,
    no padding or groups, and at least one whole block of pixels (smaller maps stay on PyTorch)."""
    (_, _, h, w), (_, _, kh, kw) = shapes[:2]
    return attrs == (1, 1, 0, 0, 1, 1, 1) and kh == kw == 1 and h * w >= PIXELS


def spec_of(attrs: tuple[int, ...], shapes: tuple[tuple[int, ...], ...], activation: str = "none",
            residual: bool = False, scaled: bool = False) -> PointwiseSpec:
    (n, ci, h, w), (co, *_) = shapes[:2]
    return PointwiseSpec(n, ci, co, h, w, activation, residual, scaled)


def kernel(s: PointwiseSpec) -> tvm.tirx.PrimFunc:
    """The scheduled PrimFunc: out = act(conv1x1(x [* scale], w) + bias [+ residual])."""
    if s.by_channels:
        return conv_prim_func(channel_vector_body(s), s)
    return conv_prim_func(packed_band_body(s) if s.packs_bands else pixel_vector_body(s), s)


def bands(pixel_blocks: int, input_bytes: int, weight_bytes: int) -> int:
    """Bands of pixel blocks a conv kernel splits the map into where its input is large (1: none).
    Tasks then run band by band, channel blocks innermost, and each thread takes one
    contiguous run of tasks, so a thread writes (and the next kernel, split alike, reads) bands of
    the map: the next kernel finds its input in its own core's cache. Split by channels, each
    thread read every input channel, half of them just written by the other core, at a stride no
    prefetcher follows (two threads, ResNet-50's 256 -> 64 at 28x28 after its 64 -> 256: 0.180 ms,
    in bands 0.115). A band's input stays in cache while the thread runs its channel blocks over it
    (`BAND_INPUT`). Each band re-reads the weight, so a weight too large to stay in cache, or an
    input small enough to come from cache anyway, keeps channel blocks outermost; so does an input
    that fits in cache on a map of few pixel blocks, where bands of unequal size would leave a
    thread idle (an input that does not fit is re-read from memory by every channel block)."""
    if weight_bytes > WEIGHT_IN_CACHE or input_bytes <= BAND_INPUT:
        return 1
    wanted = max(2, -(-input_bytes // BAND_INPUT))
    if input_bytes <= INPUT_IN_CACHE and pixel_blocks < 6 * wanted:
        return 1
    return min(pixel_blocks, wanted)


def pixel_block_macros(s: PointwiseSpec) -> tuple:
    """The macros both pixel-vector bodies share, on a `ROWS` x `PIXELS` block of outputs in registers:
    `start` sets it to the bias of channels c0..; `accumulate` adds the products of weight rows row0..
    and input positions p0.. of image n over every input channel; `finish` adds the residual, applies
    the activation and stores it at channels c0.., pixels p0.. of image n."""
    rows, pixels = min(ROWS, s.cout), PIXELS

    @T.macro
    def start(acc, bias, c0):  # noqa: ANN001, ANN202
        for r in T.unroll(rows):
            for lane in T.vectorized(pixels):
                acc[r, lane] = bias[c0 + r]

    @T.macro
    def accumulate(acc, x, w, row0, n, p0):  # noqa: ANN001, ANN202
        for k in range(s.cin):
            for r in T.unroll(rows):
                for lane in T.vectorized(pixels):
                    acc[r, lane] = acc[r, lane] + w[row0 + r, k] * x[n, k, p0 + lane]

    @T.macro
    def finish(acc, res, out, n, c0, p0):  # noqa: ANN001, ANN202
        for r in T.unroll(rows):
            for lane in T.vectorized(pixels):
                if T.bool(s.residual):
                    acc[r, lane] = acc[r, lane] + res[n, c0 + r, p0 + lane]
                out[n, c0 + r, p0 + lane] = activate(acc[r, lane], s.activation)

    return start, accumulate, finish


def pixel_vector_body(s: PointwiseSpec):  # noqa: ANN201 (a TVMScript macro)
    rows, pixels, plane = min(ROWS, s.cout), PIXELS, s.plane
    blocks = -(-s.cout // rows)
    pixel_blocks, groups = -(-plane // pixels), s.pixel_bands
    flat = (s.batch, s.cout, plane)
    k_lanes = min(LANES, s.cin)
    start, accumulate, finish = pixel_block_macros(s)

    @T.macro
    def body(x_in, w_in, bias, scale_in, res_in, out_in):  # noqa: ANN001, ANN202
        x = T.decl_buffer((s.batch, s.cin, plane), "float32", data=x_in.data)
        w = T.decl_buffer((s.cout, s.cin), "float32", data=w_in.data)
        scale = T.decl_buffer((s.batch, s.cin), "float32", data=scale_in.data)
        res = T.decl_buffer(flat, "float32", data=res_in.data)
        out = T.decl_buffer(flat, "float32", data=out_in.data)
        for t in T.parallel(s.batch * groups * blocks):
            n: T.let = t // (groups * blocks)
            g: T.let = t // blocks % groups
            c0: T.let = T.min(t % blocks * rows, s.cout - rows)
            scaled = T.alloc_buffer((rows, s.cin), "float32", scope=STACK)  # the block's weight rows times the scale
            if T.bool(s.scaled):
                for r in T.unroll(rows):
                    for k0 in range(-(-s.cin // k_lanes)):
                        for kl in T.vectorized(k_lanes):
                            k: T.let = T.min(k0 * k_lanes, s.cin - k_lanes) + kl
                            scaled[r, k] = w[c0 + r, k] * scale[n, k]
            for i in range(g * pixel_blocks // groups, (g + 1) * pixel_blocks // groups):
                p0: T.let = T.min(i * pixels, plane - pixels)
                acc = T.alloc_buffer((rows, pixels), "float32", scope=STACK)
                start(acc, bias, c0)
                if T.bool(s.scaled):
                    accumulate(acc, x, scaled, 0, n, p0)
                else:
                    accumulate(acc, x, w, c0, n, p0)
                finish(acc, res, out, n, c0, p0)

    return body


def packed_band_body(s: PointwiseSpec):  # noqa: ANN201 (a TVMScript macro)
    """One task per band of the map (`bands`): it copies the band's input rows, input channel after
    channel, into one buffer, then runs every channel block over that copy. Blocks read the input
    at a stride of the whole map per input channel, as many streams as input channels, which the
    hardware prefetchers do not follow; where the input comes from memory (several images, or one
    large map) each block waited on them. The copy reads each row in order. One kernel alone, one
    thread, input not in cache: ResNet-50's 256 -> 64 at 56x56, 8 images, 0.74-0.78 of the time
    without the copy (two threads 0.76), 4 images 0.90, 2 images 0.94, one image at 112x112 0.86;
    144 -> 24 at 56x56, 8 images, 0.94-0.96. A task per band is fewer tasks, which left two threads
    unequal shares on one image (512 -> 128 at 28x28: 1.21x the time), and with few input channels or
    few channel blocks to share it the copy costs more than it saves (32 -> 16 at 112x112, 8 images:
    1.09x; in MobileNetV2 pruned to half, 8 images, 96 -> 16 at 28x28 1.10x): `packs_bands` says where."""
    rows, pixels, plane = min(ROWS, s.cout), PIXELS, s.plane
    blocks = -(-s.cout // rows)
    pixel_blocks, groups = -(-plane // pixels), s.pixel_bands
    width = -(-pixel_blocks // groups) * pixels + pixels  # a band's pixels at most, its first block shifted back
    flat = (s.batch, s.cout, plane)
    start, accumulate, finish = pixel_block_macros(s)

    @T.macro
    def body(x_in, w_in, bias, _scale, res_in, out_in):  # noqa: ANN001, ANN202
        x = T.decl_buffer((s.batch, s.cin, plane), "float32", data=x_in.data)
        w = T.decl_buffer((s.cout, s.cin), "float32", data=w_in.data)
        res = T.decl_buffer(flat, "float32", data=res_in.data)
        out = T.decl_buffer(flat, "float32", data=out_in.data)
        for t in T.parallel(s.batch * groups):
            n: T.let = t // groups
            i0: T.let = t % groups * pixel_blocks // groups
            i1: T.let = (t % groups + 1) * pixel_blocks // groups
            lo: T.let = T.min(i0 * pixels, plane - pixels)  # the band's copy starts at its first block's first pixel
            span: T.let = T.min(i1 * pixels, plane) - lo
            band = T.alloc_buffer((1, s.cin, width), "float32", scope=STACK)
            for k in range(s.cin):
                for j0 in range((span + LANES - 1) // LANES):
                    for lane in T.vectorized(LANES):
                        j: T.let = T.min(j0 * LANES, span - LANES) + lane
                        band[0, k, j] = x[n, k, lo + j]
            for b in range(blocks):
                c0: T.let = T.min(b * rows, s.cout - rows)
                for i in range(i0, i1):
                    p0: T.let = T.min(i * pixels, plane - pixels)
                    acc = T.alloc_buffer((rows, pixels), "float32", scope=STACK)
                    start(acc, bias, c0)
                    accumulate(acc, band, w, c0, 0, p0 - lo)
                    finish(acc, res, out, n, c0, p0)

    return body


def channel_vector_body(s: PointwiseSpec):  # noqa: ANN201 (a TVMScript macro)
    """Blocks of 32 output channels (lanes) x `pixel_block` pixels; channel blocks outermost, so a
    block's packed weight (scaled per image first where the spec is `scaled`) is read from cache by
    each pixel block."""
    lanes, pixels, plane, blocks = CHANNEL_BLOCK, s.pixel_block, s.plane, s.channel_blocks
    pixel_blocks = -(-plane // pixels)
    banded = bands(pixel_blocks, s.cin * plane * 4, s.cin * s.cout * 4)
    # more pixel groups where there are fewer channel blocks than TASKS, else 96 output channels
    # made 3 tasks for 2 threads (MobileNetV2 ran 2% slower at 2 threads than pixel blocks did)
    groups = max(banded, min(pixel_blocks, -(-TASKS // (s.batch * blocks))))
    g_stride, b_stride = (blocks, 1) if banded > 1 else (1, groups)  # band by band, else block by block
    flat = (s.batch, s.cout, plane)

    @T.macro
    def accumulate(acc, x, w, b, n, p0):  # noqa: ANN001, ANN202
        for k in range(s.cin):
            for p in T.unroll(pixels):
                for lane in T.vectorized(lanes):
                    acc[p, lane] = acc[p, lane] + x[n, k, p0 + p] * w[b, k, lane]

    @T.macro
    def body(x_in, w, bias, scale_in, res_in, out_in):  # noqa: ANN001, ANN202
        x = T.decl_buffer((s.batch, s.cin, plane), "float32", data=x_in.data)
        scale = T.decl_buffer((s.batch, s.cin), "float32", data=scale_in.data)
        res = T.decl_buffer(flat, "float32", data=res_in.data)
        out = T.decl_buffer(flat, "float32", data=out_in.data)
        for t in T.parallel(s.batch * groups * blocks):
            n: T.let = t // (groups * blocks)
            g: T.let = t // g_stride % groups
            b: T.let = t // b_stride % blocks
            c0: T.let = T.min(b * lanes, s.cout - lanes)
            # the block's weight times the scale (a stub where there is none: a large scratch buffer is heap-allocated)
            scaled = T.alloc_buffer((1, s.cin if s.scaled else 1, lanes), "float32", scope=STACK)
            if T.bool(s.scaled):
                for k in range(s.cin):
                    for lane in T.vectorized(lanes):
                        scaled[0, k, lane] = w[b, k, lane] * scale[n, k]
            for i in range(g * pixel_blocks // groups, (g + 1) * pixel_blocks // groups):
                p0: T.let = T.min(i * pixels, plane - pixels)
                acc = T.alloc_buffer((pixels, lanes), "float32", scope=STACK)
                for p in T.unroll(pixels):
                    for lane in T.vectorized(lanes):
                        acc[p, lane] = bias[c0 + lane]
                if T.bool(s.scaled):
                    accumulate(acc, x, scaled, 0, n, p0)
                else:
                    accumulate(acc, x, w, b, n, p0)
                for p in T.unroll(pixels):
                    for lane in T.vectorized(lanes):
                        if T.bool(s.residual):
                            acc[p, lane] = acc[p, lane] + res[n, c0 + lane, p0 + p]
                        out[n, c0 + lane, p0 + p] = activate(acc[p, lane], s.activation)

    return body


def conv_prim_func(body: object, s: PointwiseSpec) -> tvm.tirx.PrimFunc:
    """The scheduled PrimFunc of a conv kernel whose `body` macro takes (x, w, bias, scale, res, out)
    with `s.arg_shapes`; `scale` and `res` are not read where the spec has none (their branches are
    compiled out) and get `out`. Only the variant `s` needs is parsed: TVMScript parsing is most of
    the time it takes to make a kernel (the cost model makes one per shape it prices)."""
    x_shape, w_shape, b_shape = s.arg_shapes[:3]
    scaled = getattr(s, "scaled", False)
    if scaled and s.residual:
        @T.prim_func(private=True)
        def f(x: T.Buffer(x_shape, "float32"), w: T.Buffer(w_shape, "float32"),
              bias: T.Buffer(b_shape, "float32"), scale: T.Buffer(s.arg_shapes[3], "float32"),
              res: T.Buffer(s.out_shape, "float32"), out: T.Buffer(s.out_shape, "float32")):
            body(x, w, bias, scale, res, out)
    elif scaled:
        @T.prim_func(private=True)
        def f(x: T.Buffer(x_shape, "float32"), w: T.Buffer(w_shape, "float32"),
              bias: T.Buffer(b_shape, "float32"), scale: T.Buffer(s.arg_shapes[3], "float32"),
              out: T.Buffer(s.out_shape, "float32")):
            body(x, w, bias, scale, out, out)
    elif s.residual:
        @T.prim_func(private=True)
        def f(x: T.Buffer(x_shape, "float32"), w: T.Buffer(w_shape, "float32"),
              bias: T.Buffer(b_shape, "float32"), res: T.Buffer(s.out_shape, "float32"),
              out: T.Buffer(s.out_shape, "float32")):
            body(x, w, bias, out, res, out)
    else:
        @T.prim_func(private=True)
        def f(x: T.Buffer(x_shape, "float32"), w: T.Buffer(w_shape, "float32"),
              bias: T.Buffer(b_shape, "float32"), out: T.Buffer(s.out_shape, "float32")):
            body(x, w, bias, out, out, out)
    return f.with_attr({"op_pattern": OPAQUE, "tirx.is_scheduled": True, "tirx.noalias": True})
