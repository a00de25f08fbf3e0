"""One kernel launch at one shape: the workload the cost model prices and the dispatch decides.

The fx latency pass makes a `Kernel` from a node, the TVM dispatch from a Relax call; both
end up with the same `key` for the same convolution or matmul, so a decision made for one is
the decision for the other. A convolution carries its epilogue (the activation and residual add
it runs fused) in `attrs`; `bare` drops it, which is the unit the dispatch decides on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

EPILOGUE_ACTIVATIONS = ("none", "relu", "relu6", "silu")  # codes in conv attrs and dispatched convs' calls
LAYOUT_IN, LAYOUT_OUT = "layout_in", "layout_out"  # activations into and out of a backend's own layout (`cost.layouts`)
CALIBRATED = ("elementwise", "reduce", "pool", LAYOUT_IN, LAYOUT_OUT)  # kernels whose only dimension is the bytes they move
CONV_GEOMETRY = 8  # conv attrs: kh, kw, sh, sw, ph, pw, dh, dw; an epilogue (activation code, residual) follows


@dataclass(frozen=True)
class Kernel:
    """One kernel launch. `dims` are the sizes the latency depends on; `steps[i]` > 0 marks
    dimension i as channel-like (rounded up to a multiple of steps[i]), 0 as exact.

    conv2d: dims (n, groups, ci, co, oh, ow, ih, iw) per group, attrs (kh, kw, sh, sw, ph, pw, dh, dw
    [, activation code, residual]); matmul: dims (batch, m, k, n), batch > 1 when both operands are
    activations; attention (PyTorch's SDPA): dims (batch, seq, heads, head dim, seq_kv, value dim),
    attrs (scale or 0, causal, adds a bias); another math op the dispatch may hand to PyTorch (gelu,
    softmax, ...): dims its input's shape, attrs its numeric attributes; element-wise/reduce/pool and
    layout conversions: dims (bytes moved,)."""

    op: str
    dims: tuple[int, ...]
    attrs: tuple[float, ...] = ()
    steps: tuple[int, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.op}|{','.join(map(str, self.dims))}|{','.join(map(str, self.attrs))}"

    @property
    def flops(self) -> float:
        if self.op == "conv2d":
            n, g, ci, co, oh, ow, _, _ = self.dims
            kh, kw = self.attrs[:2]
            return 2.0 * n * g * co * oh * ow * ci * kh * kw
        if self.op == "matmul":
            b, m, k, n = self.dims
            return 2.0 * b * m * k * n
        if self.op == "attention":
            b, s, heads, d, s_kv, d_v = self.dims
            return 2.0 * b * heads * s * s_kv * (d + d_v)
        return 0.0

    @property
    def bytes(self) -> float:
        if self.op in CALIBRATED:
            return float(self.dims[0])
        if self.op == "conv2d":
            n, g, ci, co, oh, ow, ih, iw = self.dims
            kh, kw = self.attrs[:2]
            return 4.0 * (n * g * ci * ih * iw + g * co * ci * kh * kw + n * g * co * oh * ow)
        if self.op == "matmul":
            b, m, k, n = self.dims
            return 4.0 * b * (m * k + k * n + m * n)
        if self.op == "attention":  # q, k, v and the output; a bias of the scores' size where it adds one
            b, s, heads, d, s_kv, d_v = self.dims
            return 4.0 * b * heads * (s * d + s_kv * (d + d_v) + s * d_v + s * s_kv * self.attrs[2])
        return 8.0 * math.prod(self.dims)  # a math op reads and writes its input's size

    def with_dims(self, dims: tuple[int, ...]) -> Kernel:
        return Kernel(self.op, tuple(dims), self.attrs, self.steps)

    def with_epilogue(self, activation: str, residual: bool) -> Kernel:
        """A conv that also applies `activation` (one of `EPILOGUE_ACTIVATIONS`) and adds a
        residual, as the compiled model runs it: fused into whichever kernel runs the conv."""
        code = EPILOGUE_ACTIVATIONS.index(activation)
        return Kernel(self.op, self.dims, (*self.attrs[:CONV_GEOMETRY], code, int(residual)), self.steps)

    @property
    def epilogue(self) -> tuple[str, bool]:
        """(activation, residual) a conv runs fused; ("none", False) for anything else."""
        act, residual = (self.attrs[CONV_GEOMETRY:] if self.op == "conv2d" else ()) or (0, 0)
        return EPILOGUE_ACTIVATIONS[int(act)], bool(residual)

    @property
    def bare(self) -> Kernel:
        """The kernel without its epilogue: what the dispatch decides an implementation for."""
        if self.op != "conv2d" or len(self.attrs) == CONV_GEOMETRY:
            return self
        return Kernel(self.op, self.dims, self.attrs[:CONV_GEOMETRY], self.steps)

    @property
    def conv_attrs(self) -> tuple[int, ...]:
        """A conv's (sh, sw, ph, pw, dh, dw, groups), the order PyTorch's and sparsefx's conv kernels take."""
        _, _, sh, sw, ph, pw, dh, dw = (int(a) for a in self.attrs[:CONV_GEOMETRY])
        return (sh, sw, ph, pw, dh, dw, self.dims[1])

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        """The tensors' shapes: conv (input, weight, output) in NCHW/OIHW; matmul (a, b, out), 2-D
        unless batched; anything else (input,)."""
        if self.op == "conv2d":
            n, g, ci, co, oh, ow, ih, iw = self.dims
            kh, kw = (int(a) for a in self.attrs[:2])
            return (n, g * ci, ih, iw), (g * co, ci, kh, kw), (n, g * co, oh, ow)
        if self.op == "matmul":
            b, m, k, n = self.dims
            return ((b, m, k), (b, k, n), (b, m, n)) if b > 1 else ((m, k), (k, n), (m, n))
        return (self.dims,)


def conv2d_kernel(x: tuple[int, ...], out: tuple[int, ...], groups: int, kernel: tuple[int, int],
                  stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int], lanes: int) -> Kernel:
    """A conv2d from its input and output shapes (NCHW); depthwise convs vary in `groups`."""
    n, cin, ih, iw = x
    _, cout, oh, ow = out
    ci, co = cin // groups, cout // groups
    # channel-like dims round up to the lanes (`cost.model`): a depthwise conv's groups, else both channel counts
    steps = (0, lanes if ci == 1 else 0, 0 if ci == 1 else lanes, 0 if ci == 1 else lanes, 0, 0, 0, 0)
    return Kernel("conv2d", (n, groups, ci, co, oh, ow, ih, iw), (*kernel, *stride, *padding, *dilation), steps)


def matmul_kernel(batch: int, m: int, k: int, n: int, lanes: int) -> Kernel:
    return Kernel("matmul", (batch, m, k, n), (), (0, 0, lanes, lanes))


def matmul_of_shapes(a: tuple[int, ...], b: tuple[int, ...], out: tuple[int, ...], lanes: int) -> Kernel:
    """`a @ b` giving `out`: against a 2-D weight the leading dimensions of `a` are rows of one
    matrix product (what the kernel runs); against a batched `b`, a batch of products."""
    if len(b) == 2:
        return matmul_kernel(1, math.prod(a[:-1]), a[-1], b[-1], lanes)
    return matmul_kernel(math.prod(out[:-2]), out[-2], a[-1], out[-1], lanes)
