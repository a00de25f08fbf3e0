"""A CPU TIR kernel for bf16 convolutions on AVX512-BF16 (`vdpbf16ps`), bias, residual add and activation fused.

For CPUs with AVX512-BF16 but no AMX tiles (AMD Zen 4 and later, Intel Cooper Lake), in the tile
kernels' layout (`tile_layout`: NHWC bf16 bits, channels in 16-channel steps on these CPUs), so the chain of
`amx_depthwise`, max-pools and `amx_linear` around it is the same as on AMX CPUs. Without it bf16
convs ran on PyTorch's oneDNN, whose calls and casts cost more than their bf16 arithmetic saved on
pruned shapes (pruned ResNet-50, batch 1, one thread, this session's Zen 4: 16.4 ms in bf16 against
20.5 in float32 and OpenVINO's bf16 11.0).

`vdpbf16ps` multiplies 16 pairs of bf16 and adds each pair's two products to one float32 lane: one
instruction does two input channels for 16 outputs. A task holds a register block of `POSITIONS`
output positions x `vectors` of 16 output channels and runs over the taps and input channel pairs:
per pair it loads the block's weight vectors (packed at compile time as `amx.pack_weight` does:
[16 outputs][2 inputs] per pair, the instruction's operand) and broadcasts each position's two input
channels (one 32-bit load, folded into the instruction as an embedded broadcast). The input is read
from a zero-padded copy (stride 2: phase planes) where the window needs one; a block's positions are
the output's own, each read from its row and column (the padded rows' flat index, as `amx` runs over,
computed 63 positions for a 7x7 map's 49), and a map's last block starts early over its
predecessor's positions (stored once: a residual is written over in place).

TVM lowers bf16 values to float32 (`BF16ComputeLegalize`) and its LLVM code generator has no bf16
vectors, while LLVM's intrinsic takes `<32 x bfloat>`: the call goes through `sfx_dpbf16`, four lines
of LLVM IR linked into the kernel (`pragma_import_llvm`) that bitcast 32-bit lanes to bf16 pairs;
inlined, it is the one instruction.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import tirx
from tvm.script import tirx as T

from sparsefx.backends.tvm.kernels import amx
from sparsefx.backends.tvm.kernels.amx import AmxSpec, folded, pack_bias, pack_weight
from sparsefx.backends.tvm.kernels.depthwise import activate
from sparsefx.backends.tvm.kernels.tile_layout import FEW, STEP, to_bf16_vector, to_float
from sparsefx.backends.tvm.sparse.kernels import LANES, OPAQUE, STACK

__all__ = ["Dpbf16Spec", "kernel", "pack_bias", "pack_weight", "spec_of", "supported"]

FUSES_RESIDUAL = True
RESIDUAL_IN_PLACE = True  # the result written over the residual, the kernel's last argument
# register blocks by output vectors, in order of preference: positions held for 4, 5, 3, 2 or 1
# vectors of 16 output channels (accumulators plus the pair's weight vectors within AVX-512's 32
# registers; the input is broadcast from memory inside the instruction, one load per position and pair)
POSITIONS = {4: 6, 5: 5, 3: 8, 2: 12, 1: 14}
DOT = "sfx_dpbf16"
DOT_IR = f"""
declare <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float>, <32 x bfloat>, <32 x bfloat>)
define linkonce_odr <16 x float> @{DOT}(<16 x float> %acc, <16 x i32> %a, <16 x i32> %b) alwaysinline {{
  %x = bitcast <16 x i32> %a to <32 x bfloat>
  %y = bitcast <16 x i32> %b to <32 x bfloat>
  %r = call <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float> %acc, <32 x bfloat> %x, <32 x bfloat> %y)
  ret <16 x float> %r
}}
"""


@dataclass(frozen=True)
class Dpbf16Spec(AmxSpec):
    """A dense bf16 conv in the tile layout; arguments and packed weight as `amx`'s."""

    @property
    def name(self) -> str:
        return "dpbf16" + super().name.removeprefix("amx")


def supported(attrs: tuple[int, ...], shapes: tuple[tuple[int, ...], ...]) -> bool:
    """Whether a conv2d workload runs here: where `amx` runs it, a folded stem's positions starting on
    whole pairs (stride x channels even)."""
    ci = shapes[0][1]
    return amx.supported(attrs, shapes) and (ci > FEW or attrs[0] * ci % 2 == 0)


def spec_of(attrs: tuple[int, ...], shapes: tuple[tuple[int, ...], ...], activation: str = "none",
            residual: bool = False) -> Dpbf16Spec:
    (n, ci, h, w), (co, _, k, _) = shapes[:2]
    return Dpbf16Spec(n, ci, co, h, w, k, attrs[0], attrs[2], activation, residual)


def vectors(s: Dpbf16Spec) -> int:
    """Output vectors per register block: the first of `POSITIONS`' counts that divides the stored
    outputs' (each position's input pair is read once for all of them: 3 vectors for 144 channels,
    not 1)."""
    count = s.cout_stored // LANES
    return next(v for v in POSITIONS if count % v == 0)


def positions(vecs: int, n_out: int) -> int:
    """Positions per register block: `POSITIONS[vecs]`, or, in blocks of 3 vectors or more, one fewer
    where its blocks issue fewer instructions over the map (per pair a block's `vdpbf16ps` plus its
    loads, a broadcast per position and a weight per vector; the last block moved back recomputes its
    predecessor's positions): a 7x7 map's 49 as 10 blocks of 5, not 9 of 6. 8 images, one thread, this
    Zen 4: 256 -> 256 3x3 at 7x7 2.31 -> 2.13 ms, 1024 -> 256 1x1 0.99 -> 0.93, 160 -> 48 0.036 -> 0.028,
    48 -> 144 at 14x14 (3 vectors, 28 blocks of 7 or 25 of 8) 0.129 -> 0.123; at 14x14 with 4 vectors 6
    stays (2.10 against 2.17 ms). With 2 vectors 11 positions ran slower than 12 where they saved
    instructions (192 -> 32 at 14x14: 0.102 against 0.093 ms): not taken there."""
    top = POSITIONS[vecs]
    counts = (top, top - 1) if vecs >= 3 else (top,)
    return min((min(m, n_out) for m in counts), key=lambda m: (-(-n_out // m) * (m * vecs + m + vecs), -m))


def dot(acc, weight, pair):  # noqa: ANN001, ANN201 (TIR expressions): acc + weight . pair, 16 lanes
    return T.call_pure_extern(f"float32x{LANES}", DOT, acc, weight, T.Broadcast(pair, LANES))


def kernel(s: Dpbf16Spec) -> tvm.tirx.PrimFunc:
    """The scheduled PrimFunc: out = act(conv(x, w) + bias [+ residual]), all NHWC."""
    k, st, p = s.kernel, s.stride, s.padding
    ci, co = s.cin_stored, s.cout_stored
    ho, wo = s.out_hw
    fold = folded(s)
    copied = k > 1 or p > 0 or st > 1  # else the input is read as it is
    reach = (k - 1) // st
    # a folded tap's last pair reads a value past its row's end (its weight zero): a spare zero row
    rows_in, row = (ho + reach + fold, -(-(s.width + 2 * p) // st)) if copied else (s.height, s.width)
    n_out = ho * wo
    vecs = vectors(s)
    m = positions(vecs, n_out)
    pos_blocks, groups = -(-n_out // m), co // LANES // vecs
    blocks = s.batch * pos_blocks * groups
    if fold:  # planes of every st-th padded row, whole rows (st * row pixels): a position is st pixels on
        ph, plane, taps = st, rows_in * row * st, k  # a tap is a window row, its columns x channels the pairs
        pairs, stored_pairs, step = -(-k * ci // 2), STEP // 2, st * ci // 2
    else:  # phase planes per axis
        ph, plane, taps = min(k, st), rows_in * row, k * k
        pairs = stored_pairs = step = ci // 2
    planes = ph if fold else ph * ph
    # output channels outermost where the weight outweighs the input (read from L2 for all positions)
    by_channels = co * ci * taps > s.height * s.width * ci * s.batch
    src_len = s.batch * planes * plane * ci
    lanes = LANES if ci % LANES == 0 else ci

    def block(b):  # noqa: ANN001, ANN202 (TIR expressions): (image, position block, output vector group) of block b
        if by_channels:
            return b // pos_blocks % s.batch, b % pos_blocks, b // (s.batch * pos_blocks)
        return b // (pos_blocks * groups), b // groups % pos_blocks, b % groups

    def flat(q):  # noqa: ANN001, ANN202 (TIR expressions): output position q's place in the padded rows
        return q // wo * row + q % wo

    def tap_offset(tap):  # noqa: ANN001, ANN202 (TIR expressions): where a tap's inputs start, from a position's, in pairs
        if fold:
            return (tap % st * plane + tap // st * row * st) * ci // 2
        kh, kw = tap // k, tap % k
        return ((kh % st * ph + kw % st) * plane + kh // st * row + kw // st) * (ci // 2)

    @T.macro
    def fill_rows(x, src):  # noqa: ANN001, ANN202 (a TVMScript macro): a stem's images zero-padded, rows split by phase
        for r0 in T.parallel(s.batch * ph * rows_in):
            for e in range(row * st * ci):
                n: T.let = r0 // (ph * rows_in)
                ih: T.let = r0 % rows_in * st + r0 // rows_in % ph - p
                iw: T.let = e // ci - p
                src[r0 * row * st * ci + e] = T.if_then_else(
                    0 <= ih and ih < s.height and 0 <= iw and iw < s.width,
                    x[n, T.min(T.max(ih, 0), s.height - 1), T.min(T.max(iw, 0), s.width - 1), e % ci], T.uint16(0))

    @T.macro
    def fill(x, src):  # noqa: ANN001, ANN202 (a TVMScript macro): the images zero-padded, split into phase planes
        for r0 in T.parallel(s.batch * ph * ph * rows_in):
            for c in range(row):
                for l0 in range(ci // lanes):
                    for lane in T.vectorized(lanes):
                        n: T.let = r0 // (ph * ph * rows_in)
                        a: T.let = r0 // rows_in % (ph * ph)
                        ih: T.let = r0 % rows_in * st + a // ph - p
                        iw: T.let = c * st + a % ph - p
                        src[(r0 * row + c) * ci + l0 * lanes + lane] = T.if_then_else(
                            0 <= ih and ih < s.height and 0 <= iw and iw < s.width,
                            x[n, T.min(T.max(ih, 0), s.height - 1), T.min(T.max(iw, 0), s.width - 1), l0 * lanes + lane],
                            T.uint16(0))

    @T.macro
    def body(x, w, bias, out):  # noqa: ANN001, ANN202
        src = T.alloc_buffer((src_len,) if copied else (1,), "uint16")
        if T.bool(fold):
            fill_rows(x, src)
        elif T.bool(copied):
            fill(x, src)
        src32 = T.decl_buffer((src_len // 2,), "uint32", data=src.data if copied else x.data)
        w32 = T.decl_buffer((co // LANES * taps * stored_pairs * LANES,), "uint32", data=w.data)
        for b in T.parallel(blocks):
            acc = T.alloc_buffer((m, vecs, LANES), "float32", scope=STACK)
            done = T.alloc_buffer((LANES,), "float32", scope=STACK)
            n: T.let = block(b)[0]
            nominal: T.let = block(b)[1] * m
            q0: T.let = T.min(nominal, n_out - m)  # the last block moved back to end with the map
            ob: T.let = block(b)[2] * vecs
            for i in T.unroll(m):
                for v in T.unroll(vecs):
                    for lane in T.vectorized(LANES):
                        acc[i, v, lane] = T.float32(0)
            for tap in range(taps):
                start: T.let = n * planes * plane * ci // 2 + tap_offset(tap)
                for j in range(pairs):
                    for i in T.unroll(m):
                        for v in T.unroll(vecs):
                            acc[i, v, tirx.Ramp(0, 1, LANES)] = dot(
                                acc[i, v, tirx.Ramp(0, 1, LANES)],
                                w32[tirx.Ramp((((ob + v) * taps + tap) * stored_pairs + j) * LANES, 1, LANES)],
                                src32[start + flat(q0 + i) * step + j])
            for i in T.unroll(m):
                q: T.let = q0 + i
                if q >= nominal:  # stored once (a residual is written over)
                    for v in T.unroll(vecs):
                        c0: T.let = (ob + v) * LANES
                        for lane in T.vectorized(LANES):
                            if T.bool(s.residual):
                                done[lane] = activate(acc[i, v, lane] + bias[c0 + lane]
                                                      + to_float(out[n, q // wo, q % wo, c0 + lane]), s.activation)
                            else:
                                done[lane] = activate(acc[i, v, lane] + bias[c0 + lane], s.activation)
                        out[n, q // wo, q % wo, tirx.Ramp(c0, 1, LANES)] = to_bf16_vector(
                            done[tirx.Ramp(0, 1, LANES)])

    x_shape, w_shape, b_shape = s.arg_shapes[:3]

    @T.prim_func(private=True)
    def f(x: T.Buffer(x_shape, "uint16"), w: T.Buffer(w_shape, "uint16"), bias: T.Buffer(b_shape, "float32"),
          out: T.Buffer(s.out_shape, "uint16")):
        with T.attr(0, "pragma_import_llvm", DOT_IR):
            body(x, w, bias, out)  # with a residual, `out` holds it on the way in
    return f.with_attr({"op_pattern": OPAQUE, "tirx.is_scheduled": True, "tirx.noalias": True})

