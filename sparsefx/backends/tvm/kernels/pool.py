"""A CPU TIR kernel for 2-D max and average pooling (NCHW, stride 1 or 2), the pools' legalization.

TVM's legalization pads the input into a buffer of its own and takes each output's maximum one
window element at a time; with stride 2 every vector of it is a gather. ResNet's 3x3 stride-2 pool
of 64 x 112x112 took 0.59 ms on one thread of this Xeon, ONNX Runtime's 0.13 ms. This kernel works
one (image, channel) plane at a time, one output row at a time: the window's rows combined, whole
vectors along the input row, into a row buffer; then the window's columns combined from that buffer,
2 x 16 contiguous lanes split by a shuffle at stride 2. A max pool needs no -inf padding: a window
always holds an input row and column (PyTorch allows padding up to half the window, and in ceil mode
starts a last window only inside the input or its left padding), so a row or column past the edge
is read as the nearest edge one, which the window holds anyway. An average pool adds zeros there
instead and divides by PyTorch's count (the window, or only its part inside the input or its padding). ResNet's pool: 0.136
ms. The kernel's function has a root block only because TVM's RewriteDataflowReshape checks every
one-input call_tir's function for a reshape and fails on a body without one.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass

import tvm
from tvm import relax, tirx
from tvm.script import tirx as T

from sparsefx.backends.tvm.kernels.depthwise import PlaneWindow
from sparsefx.backends.tvm.sparse.kernels import LANES, OPAQUE, STACK


@dataclass(frozen=True)
class PoolSpec(PlaneWindow):
    """A max pool, or an average pool (`average`; `count_pad`: padding counted in the divisor, PyTorch's
    count_include_pad); no dilation. `ceil`: PyTorch's ceil_mode (a last, partial window where one
    starts inside the input or its left padding)."""

    ceil: bool = False
    average: bool = False
    count_pad: bool = True

    @property
    def out_hw(self) -> tuple[int, int]:
        if not self.ceil:
            return super().out_hw
        sizes = []
        for n in (self.height, self.width):
            out = -(-(n + 2 * self.padding - self.kernel) // self.stride) + 1
            sizes.append(out - 1 if (out - 1) * self.stride >= n + self.padding else out)
        return tuple(sizes)

    @property
    def name(self) -> str:
        return f"{'avg' if self.average else 'max'}_pool_{self.batch}x{self.channels}x{self.height}x{self.width}_k{self.kernel}s{self.stride}" \
               f"p{self.padding}" + ("_ceil" if self.ceil else "") + ("" if self.count_pad else "_nopad")


POOLS = ("relax.nn.max_pool2d", "relax.nn.avg_pool2d")


@dataclass(frozen=True)
class Window:
    """A Relax 2-D pool's window as its attributes give it, in NCHW: every pool-taking pass reads it
    here (`window_of`) and then asks for what its own kernel can run."""

    size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int, int, int]  # top, left, bottom, right
    dilation: tuple[int, int]
    ceil: bool

    @property
    def square(self) -> tuple[int, int, int] | None:
        """(window, stride, padding) where both axes share them, every side is padded alike and
        nothing is dilated, else None."""
        (kh, kw), (sh, sw) = self.size, self.stride
        if kh != kw or sh != sw or len(set(self.padding)) != 1 or self.dilation != (1, 1):
            return None
        return kh, sh, self.padding[0]

    @property
    def symmetric(self) -> bool:
        """Each side padded like its opposite, by at most half the window (what PyTorch's pools take)."""
        (top, left, bottom, right), (kh, kw) = self.padding, self.size
        return (top, left) == (bottom, right) and 2 * top <= kh and 2 * left <= kw


def window_of(call: relax.Expr, ops: tuple[str, ...] = POOLS) -> Window | None:
    """The window of a Relax pool call (one of `ops`) in NCHW in and out, else None."""
    if not (isinstance(call, relax.Call) and getattr(call.op, "name", None) in ops):
        return None
    a = call.attrs
    if a.layout != "NCHW" or a.out_layout != "NCHW":
        return None
    size, stride, padding, dilation = (tuple(int(v) for v in x) for x in (a.pool_size, a.strides, a.padding, a.dilation))
    return Window(size, stride, padding, dilation, bool(a.ceil_mode))


def spec_of(call: relax.Call) -> PoolSpec | None:
    """The spec of a Relax max_pool2d or avg_pool2d call this kernel runs, else None."""
    window = window_of(call)
    ty = call.args[0].ty if window else None
    shape = getattr(ty, "shape", None)
    if window is None or str(ty.dtype) != "float32" or window.square is None \
            or shape is None or len(shape) != 4 or not all(isinstance(d, tirx.IntImm) for d in shape):
        return None
    (kernel_size, stride, padding), average = window.square, call.op.name == "relax.nn.avg_pool2d"
    spec = PoolSpec(*(int(d) for d in shape), kernel_size, stride, padding, window.ceil, average,
                    not average or bool(call.attrs.count_include_pad))
    if stride not in (1, 2) or 2 * padding > kernel_size or min(spec.out_hw) < 1 \
            or [int(d) for d in call.ty.shape] != list(spec.out_shape):  # output sizes worked out alike
        return None
    return spec


def kernel(s: PoolSpec) -> tvm.tirx.PrimFunc:
    k, st, p, h, w = s.kernel, s.stride, s.padding, s.height, s.width
    ho, wo = s.out_hw
    in_lanes, out_lanes = min(LANES, w), min(LANES, wo)
    span = st * out_lanes  # row-buffer elements one output vector's tap reads
    row_len = max(w + 2 * p, st * (wo - out_lanes) + k - 1 + span)  # the last vector's reads stay inside
    evens = [tirx.IntImm("int32", 2 * m) for m in range(out_lanes)]

    combine = operator.add if s.average else T.max

    def row_of(x, n, c, oh, kh, iw):  # noqa: ANN001, ANN202 (TIR expressions): a window row, the nearest
        ih = oh * st - p + kh  # in the input where it is past the edge (a max pool's), else zeros (an average's)
        value = x[n, c, T.max(T.min(ih, h - 1), 0), iw]
        return T.if_then_else(tirx.all(ih >= 0, ih < h), value, T.float32(0)) if s.average else value

    def over_rows(x, n, c, oh, iw):  # noqa: ANN001, ANN202 (TIR expressions): the window rows combined
        return functools.reduce(combine, [row_of(x, n, c, oh, kh, iw) for kh in range(k)])

    def over_columns(row, first):  # noqa: ANN001, ANN202 (TIR expressions): a vector of outputs from `first`
        if st == 1:
            taps = [row[tirx.Ramp(first + kw, 1, out_lanes)] for kw in range(k)]
        else:
            taps = [tirx.Shuffle([row[tirx.Ramp(first * 2 + kw, 1, span)]], evens) for kw in range(k)]
        return functools.reduce(combine, taps)

    reach = p if s.count_pad else 0  # how far past the input a window's divisor counts

    def divisor(o, size):  # noqa: ANN001, ANN202 (TIR expressions): window positions counted along one axis
        start = o * st - p
        return T.min(start + k, size + reach) - T.max(start, -reach)

    @T.prim_func(private=True, s_tir=True)
    def f(x: T.Buffer((s.batch, s.channels, h, w), "float32"), out: T.Buffer(s.out_shape, "float32")):
        with T.sblock("root"):  # TVM's reshape check (RewriteDataflowReshape) wants a root block
            for plane in T.parallel(s.batch * s.channels):
                n: T.let = plane // s.channels
                c: T.let = plane % s.channels
                row = T.alloc_buffer((row_len,), "float32", scope=STACK)
                for oh in range(ho):
                    for i0 in range(-(-w // in_lanes)):
                        for il in T.vectorized(in_lanes):
                            iw: T.let = T.min(i0 * in_lanes, w - in_lanes) + il
                            row[p + iw] = over_rows(x, n, c, oh, iw)
                    for j in range(p):
                        row[j] = T.float32(0) if s.average else row[p]
                    for j in range(p + w, row_len):
                        row[j] = T.float32(0) if s.average else row[p + w - 1]
                    for o0 in range(-(-wo // out_lanes)):
                        first: T.let = T.min(o0 * out_lanes, wo - out_lanes)
                        if T.bool(s.average):  # PyTorch's divisor per output: it shrinks at the edges of ceil mode's last
                            sums = T.alloc_buffer((out_lanes,), "float32", scope=STACK)  # windows, and without count_pad
                            sums[tirx.Ramp(0, 1, out_lanes)] = over_columns(row, first)
                            for ol in T.vectorized(out_lanes):
                                out[n, c, oh, first + ol] = sums[ol] / T.Cast(
                                    "float32", divisor(oh, h) * divisor(first + ol, w))
                        else:
                            out[n, c, oh, tirx.Ramp(first, 1, out_lanes)] = over_columns(row, first)

    return f.with_attr({"op_pattern": OPAQUE, "tirx.is_scheduled": True, "tirx.noalias": True})
