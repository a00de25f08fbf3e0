"""A CPU TIR kernel for dense k x k convolutions (stride 1 or 2, no groups; 1x1 only strided), bias,
residual add and activation fused.

oneDNN runs ResNet's 3x3 convs at 120-150 GFLOP/s on one thread of this Xeon, but at 90-135 once
pruning halves their channels, and its stride-2 ones at 65-100 (pruned ResNet-18's 128 -> 256 at
14 -> 7: 0.44 ms, 0.23 here). This kernel copies each image's input, zero-padded, into `stride²`
phase planes (rows and columns split by their remainder mod the stride, as in `depthwise`), so
that every tap (kh, kw) of the window reads one contiguous run of a phase plane at a fixed offset
from the output's flat index. Outputs are then computed over that flat index as a matrix product,
`pointwise`'s 8-channel x 32-position register block running over input channels and taps; the
positions past each output row's end (the padding columns) are computed and dropped when the
result is written out with the residual and activation. On the shapes above it ran at 130-170
GFLOP/s. The dispatch times it beside PyTorch per workload (`supported` says where it applies).

Where the weight stays in cache and the map is tall enough, each parallel task takes a band of
output rows through all three steps (`banded_body`); elsewhere each step is split across the
threads on its own (`phases_first_body`). Whole models, one process, built before and after:
two threads, ResNet-18 0.89 of before (dense and pruned 50%), ResNet-50 0.94; one thread
0.99-1.00; MobileNetV2 and EfficientNet-B0 (a banded stem) within 1%.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm.script import tirx as T

from sparsefx.backends.tvm.kernels.depthwise import activate, out_hw
from sparsefx.backends.tvm.kernels.phase_planes import PhasePlanes
from sparsefx.backends.tvm.kernels.pointwise import (
    INPUT_IN_CACHE,
    PIXELS,
    ROWS,
    WEIGHT_IN_CACHE,
    conv_prim_func,
)
from sparsefx.backends.tvm.sparse.kernels import LANES, STACK

FUSES_RESIDUAL = True
BANDS = 8  # bands of output rows at most where `banded` (4 ran within 2% of 8 on two threads)
MIN_BANDS = 4  # fewer left two threads unequal shares (3 bands of 14 rows: 128 -> 128 at 14x14 0.23 -> 0.29 ms)


@dataclass(frozen=True)
class DirectSpec:
    """A dense conv, square kernel, equal strides and padding."""

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
        return (self.batch, self.cout, *self.out_hw)

    @property
    def arg_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Shapes of the kernel's arguments: input, weight, bias, [residual,] output."""
        residual = (self.out_shape,) if self.residual else ()
        return ((self.batch, self.cin, self.height, self.width), self.weight_shape, (self.cout,), *residual,
                self.out_shape)

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        """PyTorch's weight shape, which this kernel takes as it is."""
        return (self.cout, self.cin, self.kernel, self.kernel)

    @property
    def bands(self) -> int:
        """Bands of output rows for `banded`: at most `BANDS`, each at least two position blocks."""
        geometry = PhasePlanes(self.height, self.width, self.kernel, self.stride, self.padding, self.out_hw[0])
        return max(1, min(BANDS, self.out_hw[0], self.out_hw[0] * geometry.row // (2 * PIXELS)))

    @property
    def banded(self) -> bool:
        """Whether each task fills, computes and writes out a band of output rows on its own (`kernel`):
        where the weight, which every band reads again, stays in cache, and the map makes enough bands."""
        return self.cout * self.cin * self.kernel ** 2 * 4 <= WEIGHT_IN_CACHE and self.bands >= MIN_BANDS

    @property
    def name(self) -> str:
        return f"direct_{self.cin}to{self.cout}_{self.height}x{self.width}_k{self.kernel}s{self.stride}" \
               f"p{self.padding}_b{self.batch}_{self.activation}" + ("_res" if self.residual else "") + \
               ("_bd" if self.banded else "")


def supported(attrs: tuple[int, ...], shapes: tuple[tuple[int, ...], ...]) -> bool:
    """Whether a conv2d workload (dispatch's attrs and shapes) is one this kernel runs: no groups or
    dilation, a square window, equal strides of 1 or 2 and equal padding (an unstrided 1x1 is
    `pointwise`'s), and at least one whole block of output positions."""
    s0, s1, p0, p1, d0, d1, groups = attrs
    (_, _, _, w), (_, _, kh, kw), (_, _, oh, _) = shapes[:3]
    wq = -(-(w + 2 * p0) // s0)
    return groups == 1 and d0 == d1 == 1 and kh == kw and s0 == s1 in (1, 2) and (kh > 1 or s0 == 2) and p0 == p1 < kh \
        and oh * wq >= PIXELS


def spec_of(attrs: tuple[int, ...], shapes: tuple[tuple[int, ...], ...], activation: str = "none",
            residual: bool = False) -> DirectSpec:
    (n, ci, h, w), (co, _, k, _) = shapes[:2]
    return DirectSpec(n, ci, co, h, w, k, attrs[0], attrs[2], activation, residual)


def kernel(s: DirectSpec) -> tvm.tirx.PrimFunc:
    """The scheduled PrimFunc: out = act(conv(x, w) + bias [+ residual])."""
    return conv_prim_func(banded_body(s) if s.banded else phases_first_body(s), s)


def phases_first_body(s: DirectSpec):  # noqa: ANN201 (a TVMScript macro)
    """Each image's phase planes filled (split by input channels), then its blocks computed (split by
    channel blocks or by position blocks), then written out (split by output channels)."""
    k, st = s.kernel, s.stride
    ho, _ = s.out_hw
    geometry = PhasePlanes(s.height, s.width, k, st, s.padding, ho)
    fill, wq, ph = geometry.filler(), geometry.row, geometry.phases
    n_out = ho * wq  # flat positions computed (the columns past each output row's end are dropped)
    rows, pixels = min(ROWS, s.cout), PIXELS
    blocks, pixel_blocks = -(-s.cout // rows), -(-n_out // pixels)
    # channel blocks outermost where the phase planes fit in cache (each block re-reads all of them)
    by_channel = int(s.cin * ph * ph * geometry.size * 4 <= INPUT_IN_CACHE)
    outer, inner = (blocks, pixel_blocks) if by_channel else (pixel_blocks, blocks)
    block, write_out = block_macros(s, wq, ph)

    @T.macro
    def body(x, w, bias, _scale, res, out):  # noqa: ANN001, ANN202
        planes = T.alloc_buffer((s.cin, ph * ph, geometry.size), "float32")
        wide = T.alloc_buffer((s.cout, pixel_blocks * pixels), "float32")
        for n in range(s.batch):
            for c in T.parallel(s.cin):
                fill(x, planes, n, c, c, 0)
            for t in T.parallel(outer):
                for i in range(inner):
                    c0: T.let = T.min((t * by_channel + i * (1 - by_channel)) * rows, s.cout - rows)
                    q0: T.let = T.min((i * by_channel + t * (1 - by_channel)) * pixels, n_out - pixels)
                    block(w, bias, planes, wide, c0, q0)
            for co in T.parallel(s.cout):
                write_out(wide, res, out, n, co, 0, ho, 0)

    return body


def banded_body(s: DirectSpec):  # noqa: ANN201 (a TVMScript macro)
    """One parallel task per band of output rows: it fills the phase-plane rows its band reads
    (the window's reach below it filled by the next band as well), computes every channel block
    over them and writes the band out, so a thread reads only what it wrote, from its own cache,
    and the threads meet once per conv instead of three times. Two threads of the Xeon, one conv
    each: ResNet's 64 -> 64 3x3 at 56x56 1.07 -> 0.89 ms, 128 -> 128 at 28x28 0.98 -> 0.87,
    pruned ResNet-50's 32 -> 32 at 56x56 0.29 -> 0.23 (one thread within 3-7% either way); with a
    weight past `WEIGHT_IN_CACHE` every band re-reading it lost (256 -> 256 at 14x14 0.85 -> 1.15)."""
    k, st = s.kernel, s.stride
    ho, _ = s.out_hw
    geometry = PhasePlanes(s.height, s.width, k, st, s.padding, ho)
    wq, ph, bands = geometry.row, geometry.phases, s.bands
    band_out = -(-ho // bands)  # output rows of the largest band
    band_rows = band_out + (k - 1) // st + 1  # phase-plane rows it reads, one spare for the last vector's overrun
    fill = geometry.filler(band_rows)
    rows, pixels = min(ROWS, s.cout), PIXELS
    blocks = -(-s.cout // rows)
    block, write_out = block_macros(s, wq, ph)

    @T.macro
    def body(x, w, bias, _scale, res, out):  # noqa: ANN001, ANN202
        for t in T.parallel(s.batch * bands):
            n: T.let = t // bands
            r0: T.let = t % bands * ho // bands
            r1: T.let = (t % bands + 1) * ho // bands
            positions: T.let = (r1 - r0) * wq
            planes = T.alloc_buffer((s.cin, ph * ph, band_rows * wq), "float32", scope=STACK)
            wide = T.alloc_buffer((s.cout, band_out * wq), "float32", scope=STACK)
            for c in range(s.cin):
                fill(x, planes, n, c, c, r0)
            for b in range(blocks):
                for i in range(-(-positions // pixels)):
                    block(w, bias, planes, wide, T.min(b * rows, s.cout - rows), T.min(i * pixels, positions - pixels))
            for co in range(s.cout):
                write_out(wide, res, out, n, co, r0, r1, r0)

    return body


def block_macros(s: DirectSpec, wq: int, ph: int) -> tuple:
    """The macros both loop orders share: `block` computes output channels c0.. x positions q0.. (flat,
    over the phase planes) into `wide`; `write_out` writes output rows r0..r1 of channel co from
    `wide` (whose position 0 is output row `first`) with the residual and activation."""
    k, st = s.kernel, s.stride
    _, wo = s.out_hw
    rows, pixels = min(ROWS, s.cout), PIXELS

    @T.macro
    def block(w, bias, planes, wide, c0, q0):  # noqa: ANN001, ANN202
        acc = T.alloc_buffer((rows, pixels), "float32", scope=STACK)
        for r in T.unroll(rows):
            for lane in T.vectorized(pixels):
                acc[r, lane] = bias[c0 + r]
        for ci in range(s.cin):
            for kh in T.unroll(k):
                for kw in T.unroll(k):
                    for r in T.unroll(rows):
                        for lane in T.vectorized(pixels):
                            acc[r, lane] = acc[r, lane] + w[c0 + r, ci, kh, kw] * planes[
                                ci, kh % st * ph + kw % st, q0 + lane + kh // st * wq + kw // st]
        for r in T.unroll(rows):
            for lane in T.vectorized(pixels):
                wide[c0 + r, q0 + lane] = acc[r, lane]

    @T.macro
    def write_out(wide, res, out, n, co, r0, r1, first):  # noqa: ANN001, ANN202
        for oh in range(r0, r1):
            for ow0 in range(-(-wo // min(LANES, wo))):
                for owl in T.vectorized(min(LANES, wo)):
                    ow: T.let = T.min(ow0 * LANES, wo - min(LANES, wo)) + owl
                    if T.bool(s.residual):
                        out[n, co, oh, ow] = activate(wide[co, (oh - first) * wq + ow] + res[n, co, oh, ow], s.activation)
                    else:
                        out[n, co, oh, ow] = activate(wide[co, (oh - first) * wq + ow], s.activation)

    return block, write_out
