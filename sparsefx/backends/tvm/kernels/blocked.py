"""A CPU TIR kernel for dense convolutions on channel-blocked activations, bias, residual add and
activation fused.

In NCHW, a 1x1 conv's register block (`pointwise`: 8 output channels x 32 pixels) reads each input
channel's row at a stride of the whole map: as many streams as input channels, which on a map past
L2 the prefetchers do not follow. On channel-blocked activations (`blocked_layout`: NCHW16c) each
step instead broadcasts 6 pixels' values of one input channel from the 16-channel vectors they sit
in, and multiplies them by 4 vectors of the weight (64 output channels): 24 accumulators, the input
read 6 x 16 floats at a time, the weight packed at compile time as [16 output][16 input] blocks
(`pack_weight`). One thread, this Xeon, one kernel alone (input in cache / cycled from memory):
ResNet-50's 256 -> 64 at 56x56 0.77 / 1.26 ms in NCHW, 0.61 / 0.68 blocked; 512 -> 128 at 28x28
0.72 / 0.86 against 0.61 / 0.66.

3x3 convs padded by 1 read their input in place too (`window_kernel`): the output positions whose
windows lie inside the input flat over their own rectangle, the border in runs that read only the taps
inside. Other strided and k x k convs (a stem, small maps) first copy the input, zero-padded, into
phase planes (`PhasePlanes`' geometry, each position a 16-channel vector, so a stride-2 copy moves
whole vectors), then compute over the planes' flat index as `direct` does. Output channels past the
conv's own (the layout stores whole 16-channel blocks) come out zero: their weights and bias are zero,
as is a residual's padding.

A fused residual takes the result in place (`call_tir_inplace`; `layout_chain` keeps a copy where
the residual is read later): each output vector is written where its residual vector was just read,
and no position is computed twice. One thread, this Xeon, the residual cycled from L3 as in the
model: ResNet-50's 64 -> 256 1x1 at 56x56 0.792 ms into a fresh output, 0.704 in place (the same
conv without a residual 0.667); 128 -> 512 at 28x28 0.671 against 0.644.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import tvm
from tvm.script import tirx as T

from sparsefx.backends.tvm.kernels.blocked_layout import BLOCK, blocked, stored
from sparsefx.backends.tvm.kernels.depthwise import activate, out_hw
from sparsefx.backends.tvm.kernels.phase_planes import PhasePlanes
from sparsefx.backends.tvm.sparse.kernels import OPAQUE, STACK

FUSES_RESIDUAL = True
RESIDUAL_IN_PLACE = True  # the result written over the residual, the kernel's last argument
POSITIONS = 6  # output positions per register block, each times up to 4 16-channel vectors (24 accumulators)
MAX_VECTORS = 4
# input channels a reduction step unrolls (a block's 16 in loops of 4): one thread, this Xeon, 12 convs of
# ResNet-50/18 and pruned shapes ran 0-12% faster than fully unrolled (ResNet-50's 256 -> 512 1x1 stride 2
# 1.455 -> 1.275 ms, 2048 -> 512 at 7x7 0.808 -> 0.724) and built in 1.56 s against 3.46: LLVM and TVM's
# simplifier and common-subexpression pass work on a quarter of the unrolled body
CI_UNROLL = 4
FEW = 4  # input channels taken in NCHW as they are (a stem's image), not padded to a block of 16
# a 1x1 conv with fewer input channels than a block but at least this many pads them to one block: a
# pruned MobileNetV2's expansions (8 -> 48 at 112x112, 12 -> 72 at 56x56) ran NCHW between blocked
# kernels, 0.37 ms of conversions around them; padded, the model took 2.04 ms against 2.41 (EfficientNet-B0
# 3.93 against 4.30). A 3x3 pads its window's work as well: Fashion-MNIST's small ResNet with 8-channel
# 3x3 convs at batch 64 took 2.39 ms padded against 1.80 NCHW with its conversions.
HALF_BLOCK = BLOCK // 2
TASKS = 16  # parallel tasks at least, where there are position blocks for them
# the next group's weight fetched ahead (`prefetch_lines`) on maps of up to 64 output positions, where a
# group's weight is reused by 11 position blocks at most, and where a group's weight is up to 512 KB:
# two side by side in L2 (2 MB here); past that the fetched group pushed out the one in use (ResNet-50's
# 512 -> 512 3x3 at 7x7, 1.18 MB a group: 2.28 -> 2.38 ms)
PREFETCH_POSITIONS = 64
PREFETCH_GROUP_BYTES = 512 << 10
# phase planes copied at once, for as many images as fit (`phase_plane_kernel`): about L2, so they are
# still there when read. ResNet-18 at 8 images, this Xeon, in the model, one image / 2 MB / 16 MB at a
# time: two threads, dense 103.3 / 104.0 / 106.5 ms, pruned 30.5 / 28.9 / 29.2; one thread, dense
# 204.3 / 208.7 / 209.5, pruned 56.4 / 56.6 / 57.2
PLANES_BYTES = 2 << 20
# a 3x3 conv reads its input in place (`windowed`) where at least this share of its output positions have
# their windows inside the input: 8 images, one thread, 96 -> 96 at 14x14 (144 of 196 inside) 1.70 -> 1.42 ms,
# 128 -> 256 stride 2 from 14x14 (36 of 49) 1.81 -> 1.48; 128 -> 128 at 7x7 (25 of 49) 0.86 -> 0.97
INSIDE_SHARE = 2 / 3
# a block of `window_kernel` at stride 2 from maps this wide or wider fetches the input row its window
# reads last this many blocks on (the prefetchers follow a stride-1 window's rows, not a stride-2 one's):
# 8 images, one thread, 64 -> 128 from 28x28 1.65 -> 1.52 ms, 32 -> 64 from 56x56 1.58 -> 1.50; at stride 1
# it was as fast or slower (64 -> 64 at 14x14 0.63 -> 0.67), and at stride 2 from 14x14 slower (1.43 -> 1.49)
FETCH_WIDTH = 28
FETCH_BLOCKS = 2
# an unstrided 1x1 conv whose group's weight is past this many bytes reduces in passes of PASS_BLOCKS input
# blocks (`chunked`): a pass's weight 32 KB for 4 vectors, in L1 (32 KB here, 48 KB on the Xeon). 128 -> 512
# (32 KB a group) ran as fast as ONNX Runtime's as it was; 256 -> 64 (64 KB) 1.41x its time (8 images, one thread)
CHUNKED_GROUP_BYTES = 32 << 10
PASS_BLOCKS = 8


@dataclass(frozen=True)
class BlockedSpec:
    """A dense conv on NCHW16c activations: square kernel, equal strides (1 or 2) and padding."""

    batch: int
    cin: int
    cout: int
    height: int
    width: int
    kernel: int = 1
    stride: int = 1
    padding: int = 0
    activation: str = "none"
    residual: bool = False

    @property
    def out_hw(self) -> tuple[int, int]:
        return out_hw(self)

    @property
    def nchw_in(self) -> tuple[int, int, int, int]:
        return (self.batch, self.cin, self.height, self.width)

    @property
    def nchw_out(self) -> tuple[int, int, int, int]:
        return (self.batch, self.cout, *self.out_hw)

    @property
    def nchw_input(self) -> bool:
        """A stem: its few input channels read from NCHW as they are, each phase-plane position
        holding them (stored as a block of 16, 3 channels made 5 times the work: 7.6 ms against
        `direct`'s 2.0 for ResNet's 7x7 stem)."""
        return self.cin <= FEW

    @property
    def in_lanes(self) -> int:
        """Input channels per step of the reduction: a block, or a stem's few."""
        return self.cin if self.nchw_input else BLOCK

    @property
    def in_blocks(self) -> int:
        return 1 if self.nchw_input else stored(self.cin) // BLOCK

    @property
    def in_shape(self) -> tuple[int, ...]:
        return self.nchw_in if self.nchw_input else blocked(self.nchw_in)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return blocked(self.nchw_out)

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        """PyTorch's weight shape (`pack_weight` turns it into `arg_shapes[1]`)."""
        return (self.cout, self.cin, self.kernel, self.kernel)

    @property
    def vector_floats(self) -> int:
        """Packed weight floats per 16-channel output vector: every input block's k x k taps x its lanes x 16."""
        return self.in_blocks * self.kernel ** 2 * self.in_lanes * BLOCK

    @property
    def arg_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Input (NCHW16c), packed weight, bias (stored channels), and the output (NCHW16c): the
        residual where there is one, written over."""
        weight = (stored(self.cout) // BLOCK * self.vector_floats,)
        return (self.in_shape, weight, (stored(self.cout),), self.out_shape)

    @property
    def group_sizes(self) -> tuple[tuple[int, int], ...]:
        """The output's 16-channel blocks in groups a register block holds, as (vectors, groups) runs:
        groups of 4, and a rest of 3, or 3 + 3 in place of a 4 and a rest of 2, or 3 + 3 + 3 in place
        of two 4s and a rest of 1 (3 + 2 for 5 blocks), so that no
        block is computed twice and no group holds one vector where the output has more (one vector's
        6 accumulators are too few to hide the multiply-adds' latency: 80 -> 80 channels 3x3 at 14x14
        took 0.170 ms as 5 groups of one vector, 0.087 for 64 -> 64 as one group of 4), and the time
        grows by the block, as the cost model's interpolation between channel counts assumes."""
        fours, rest = divmod(stored(self.cout) // BLOCK, MAX_VECTORS)
        if fours == 0 or rest in (0, 3):
            runs = ((MAX_VECTORS, fours), (rest, 1 if rest else 0))
        elif rest == 2:  # 3 + 3 ran 96 -> 96 3x3 at 14x14 in 0.183 ms, 4 + 2 in 0.198
            runs = ((MAX_VECTORS, fours - 1), (3, 2))
        else:
            runs = ((3, 1), (2, 1)) if fours == 1 else ((MAX_VECTORS, fours - 2), (3, 3))
        return tuple(run for run in runs if run[1])

    @property
    def group_bytes(self) -> int:
        """The packed weight of the largest group (`group_sizes`' first), in bytes."""
        return self.group_sizes[0][0] * self.vector_floats * 4

    @property
    def groups(self) -> int:
        return sum(count for _, count in self.group_sizes)

    @property
    def direct_read(self) -> bool:
        """An unstrided, unpadded 1x1 conv reads its input as it is; others read phase planes."""
        return self.kernel == 1 and self.stride == 1 and self.padding == 0 and not self.nchw_input

    @property
    def name(self) -> str:
        return f"blocked_{self.cin}to{self.cout}_{self.height}x{self.width}_k{self.kernel}s{self.stride}" \
               f"p{self.padding}_b{self.batch}_{self.activation}" + ("_res" if self.residual else "")


def supported(attrs: tuple[int, ...], shapes: tuple[tuple[int, ...], ...]) -> bool:
    """Whether a conv2d workload (dispatch's attrs and shapes) is one this kernel runs: no groups or
    dilation, a square window, equal strides of 1 or 2 and equal padding, at least one whole block
    of output positions, and an input of a block of channels or more, or of a stem's few (`FEW`), or of
    half a block or more into a 1x1 conv (`HALF_BLOCK`): between, padded to 16 they would make up to 3
    times the work (`direct` and `pointwise` run those)."""
    s0, s1, p0, p1, d0, d1, groups = attrs
    (_, cin, h, w), (_, _, kh, kw) = shapes[:2]
    ho, wo = (h + 2 * p0 - kh) // s0 + 1, (w + 2 * p0 - kw) // s0 + 1
    return groups == 1 and d0 == d1 == 1 and kh == kw and s0 == s1 in (1, 2) and p0 == p1 < kh \
        and ho * wo >= POSITIONS and (cin >= BLOCK or cin <= FEW or (kh == 1 and cin >= HALF_BLOCK))


def spec_of(attrs: tuple[int, ...], shapes: tuple[tuple[int, ...], ...], activation: str = "none",
            residual: bool = False) -> BlockedSpec:
    (n, ci, h, w), (co, _, k, _) = shapes[:2]
    return BlockedSpec(n, ci, co, h, w, k, attrs[0], attrs[2], activation, residual)


def pack_weight(s: BlockedSpec, weight: np.ndarray) -> np.ndarray:
    """PyTorch's (cout, cin, k, k) weight as one array of groups (`group_sizes`), each
    [input block][kh][kw][input channel][vector][16 output], zero past the conv's channels: a register
    block's weights one stream, in the order it reads them (ResNet-50's 512 -> 512 3x3 convs at 7x7,
    whose weight comes from memory: 2.29 ms a call with the 4 output blocks apart, 2.20 as one stream,
    1.66 with the weight in cache; one thread)."""
    padded = np.zeros((stored(s.cout), s.in_blocks * s.in_lanes, s.kernel, s.kernel), "float32")
    padded[:s.cout, :s.cin] = weight
    cob, k = stored(s.cout) // BLOCK, s.kernel
    blocks = padded.reshape(cob, BLOCK, s.in_blocks, s.in_lanes, k, k).transpose(0, 2, 4, 5, 3, 1)  # [cob][cib][kh][kw][ci][co]
    groups, first = [], 0
    for size, count in s.group_sizes:
        for _ in range(count):
            groups.append(blocks[first:first + size].transpose(1, 2, 3, 4, 0, 5).reshape(-1))
            first += size
    return np.ascontiguousarray(np.concatenate(groups))


def pack_bias(s: BlockedSpec, bias: np.ndarray) -> np.ndarray:
    return np.concatenate([bias.astype("float32"), np.zeros(stored(s.cout) - s.cout, "float32")])


def kernel(s: BlockedSpec) -> tvm.tirx.PrimFunc:
    """The scheduled PrimFunc: out = act(conv(x, w) + bias), or res = act(conv(x, w) + bias + res), all NCHW16c."""
    f = direct_read_kernel(s) if s.direct_read else window_kernel(s) if windowed(s) else phase_plane_kernel(s)
    return f.with_attr({"op_pattern": OPAQUE, "tirx.is_scheduled": True, "tirx.noalias": True})


@dataclass(frozen=True)
class Placement:
    """Where a register block's positions read and store (TIR expressions of its first position `q0`,
    an index or a tuple, and a position p in the block): `origin(q0, p)` is the flat position in the
    source of its window's first tap, `tap(kh, kw)` a tap's (phase, offset from the origin), and
    `place(q0, p)` its output (row, column)."""

    origin: Callable
    tap: Callable
    place: Callable
    taps: Callable  # q0 -> (kh0, kh1, kw0, kw1): the window's taps the block's positions all read
    first_block: Callable  # q0 -> its index among the map's blocks (where `prefetch_lines` fetches from)
    ahead: Callable | None = None  # q0 -> the source position of the input row a block fetches ahead


def plane_placement(s: BlockedSpec, row: int, phases: int) -> Placement:
    """Positions flat over the output map, read from phase planes of rows `row` long."""
    k, st, (_, wo) = s.kernel, s.stride, s.out_hw
    return Placement(lambda q0, p: (q0 + p) // wo * row + (q0 + p) % wo,
                     lambda kh, kw: (kh % st * phases + kw % st, kh // st * row + kw // st),
                     lambda q0, p: ((q0 + p) // wo, (q0 + p) % wo),
                     lambda _q0: (0, k, 0, k), lambda q0: q0 // POSITIONS)


def reduce_macro(s: BlockedSpec, at: Placement, vectors: int, count: int, lines: int):  # noqa: ANN201 (a TVMScript macro)
    """`reduce(acc, src, sn, w, g0, q0, cb0, cb1, ahead, step0, taps)`: into the accumulators `acc`
    (vectors x count positions x 16), input blocks cb0..cb1 of `vectors` output vectors from g0 x
    the block of positions from q0 on (`at`) over image sn of `src` (images, input blocks, phase,
    flat position, 16), over the taps (kh0, kh1, kw0, kw1) of its window, the group's weights from g0's
    share of the flat weight on; each step (input block and tap) also fetches `lines` cache lines
    ahead (to L2), from flat weight index `ahead`, the step0-th step's first."""
    k = s.kernel
    lanes = s.in_lanes
    per_vector = s.vector_floats
    last_line = s.arg_shapes[1][0] - BLOCK
    # a stem's few input channels make a tap's body short (3 x its FMAs): its window's columns unrolled
    # where the group leaves registers for them (up to 3 vectors: 18 accumulators): 7x7 stride 2 from 224x224,
    # one thread, 3 -> 32 0.902 -> 0.808 ms, 3 -> 48 1.238 -> 1.134, 3x3 3 -> 32 0.290 -> 0.226; 3 -> 64's
    # 24 accumulators spilled (1.58 -> 2.48)
    kw_loop = T.unroll if s.nchw_input and vectors < MAX_VECTORS else T.serial
    unrolled = CI_UNROLL if lanes % CI_UNROLL == 0 else lanes  # a stem's 3 channels all unrolled

    @T.macro
    def reduce(acc, src, sn, w, g0, q0, cb0, cb1, ahead, step0, taps):  # noqa: ANN001, ANN202
        for cb in range(cb0, cb1):
            # taps in loops, not unrolled: unrolled, LLVM kept the columns' shared loads in registers and spilled
            for kh in range(taps[0], taps[1]):
                for kw in kw_loop(taps[2], taps[3]):
                    for line in T.unroll(lines):  # a prefetch past the weight's end clamped to its last line
                        T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch", T.address_of(w[T.min(
                            ahead + ((step0 + ((cb - cb0) * k + kh) * k + kw) * lines + line) * BLOCK, last_line)]),
                            T.int32(0), T.int32(2), T.int32(1)))
                    for c0 in T.serial(lanes // unrolled):
                        for c1 in T.unroll(unrolled):
                            for j in T.unroll(vectors):
                                for p in T.unroll(count):
                                    for lane in T.vectorized(BLOCK):
                                        acc[j, p, lane] = acc[j, p, lane] + src[
                                            sn, cb, at.tap(kh, kw)[0], at.origin(q0, p) + at.tap(kh, kw)[1], c0 * unrolled + c1
                                        ] * w[g0 * per_vector + ((((cb * k + kh) * k + kw) * lanes + c0 * unrolled + c1)
                                                                 * vectors + j) * BLOCK + lane]

    return reduce


def start_macro(vectors: int, count: int):  # noqa: ANN201 (a TVMScript macro)
    """`start(acc, bias, g0)`: the accumulators set to the bias."""
    @T.macro
    def start(acc, bias, g0):  # noqa: ANN001, ANN202
        for j in T.unroll(vectors):
            for p in T.unroll(count):
                for lane in T.vectorized(BLOCK):
                    acc[j, p, lane] = bias[(g0 + j) * BLOCK + lane]

    return start


def finish_macro(s: BlockedSpec, at: Placement, vectors: int, count: int):  # noqa: ANN201 (a TVMScript macro)
    """`finish(acc, res, out, n, g0, q0)`: the residual added, the activation applied, the block stored."""

    @T.macro
    def finish(acc, res, out, n, g0, q0):  # noqa: ANN001, ANN202
        for p in T.unroll(count):
            for j in T.unroll(vectors):
                for lane in T.vectorized(BLOCK):
                    if T.bool(s.residual):
                        acc[j, p, lane] = acc[j, p, lane] + res[n, g0 + j, at.place(q0, p)[0], at.place(q0, p)[1], lane]
                    out[n, g0 + j, at.place(q0, p)[0], at.place(q0, p)[1], lane] = activate(acc[j, p, lane], s.activation)

    return finish


def block_macro(s: BlockedSpec, at: Placement, vectors: int, count: int):  # noqa: ANN201 (a TVMScript macro)
    """`block(src, sn, w, bias, res, out, n, g0, q0)`: a register block (`reduce_macro`) over all input
    blocks, from the bias to the stored output; a whole block also fetches its share of the next
    group's weight (`prefetch_lines`), and where `at` says, the input row its window reads last
    `FETCH_BLOCKS` blocks on (`window_kernel`)."""
    lines = prefetch_lines(s, vectors) if count == POSITIONS else 0
    steps = s.in_blocks * s.kernel ** 2
    start, reduce, finish = start_macro(vectors, count), reduce_macro(s, at, vectors, count, lines), \
        finish_macro(s, at, vectors, count)
    fetch = input_fetch_macro(s, at)

    @T.macro
    def block(src, sn, w, bias, res, out, n, g0, q0):  # noqa: ANN001, ANN202
        acc = T.alloc_buffer((vectors, count, BLOCK), "float32", scope=STACK)
        fetch(src, sn, q0)
        start(acc, bias, g0)
        reduce(acc, src, sn, w, g0, q0, 0, s.in_blocks, (g0 + vectors) * s.vector_floats, at.first_block(q0) * steps, at.taps(q0))
        finish(acc, res, out, n, g0, q0)

    return block


def input_fetch_macro(s: BlockedSpec, at: Placement):  # noqa: ANN201 (a TVMScript macro)
    """`fetch(src, sn, q0)`: each input block's cache lines of the row `at.ahead(q0)` on that the
    block's window will read (a window's span of positions), to L1; nothing where `at` fetches none."""
    span = POSITIONS * s.stride + s.kernel - 1
    last = s.height * s.width - 1

    @T.macro
    def fetch(src, sn, q0):  # noqa: ANN001, ANN202
        for cb in range(s.in_blocks):
            for line in T.unroll(span):
                T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch", T.address_of(
                    src[sn, cb, 0, T.min(at.ahead(q0) + line, last), 0]), T.int32(0), T.int32(3), T.int32(1)))

    @T.macro
    def none(src, sn, q0):  # noqa: ANN001, ANN202
        T.evaluate(0)

    return none if at.ahead is None else fetch


def prefetch_lines(s: BlockedSpec, vectors: int) -> int:
    """Cache lines of the next group's weight each step of a register block's reduction fetches ahead
    (to L2), so that over the map's position blocks the next group's weight arrives while this group
    computes: where the weight is read by few position blocks, the first of a group otherwise waited on
    it (ResNet-50 at 7x7, one thread, the weights cycled from memory as in the model: 2048 -> 512
    1.011 -> 0.862 ms, 512 -> 2048 with its residual 0.984 -> 0.829; on 1024 -> 256 at 14x14, 33 blocks
    a group, 0.709 -> 0.729). 0 elsewhere (`PREFETCH_POSITIONS`, `PREFETCH_GROUP_BYTES`)."""
    ho, wo = s.out_hw
    group_floats = vectors * s.vector_floats
    if ho * wo > PREFETCH_POSITIONS or group_floats * 4 > PREFETCH_GROUP_BYTES:
        return 0
    steps = ho * wo // POSITIONS * s.in_blocks * s.kernel ** 2  # of all the group's whole position blocks
    return -(-group_floats // BLOCK // steps)


def sliced(s: BlockedSpec) -> bool:
    """Whether a group runs input block by input block over all its position blocks (`sliced_group`):
    on maps of up to 64 positions, where a group's weight is past what two side by side in L2 allow
    (`PREFETCH_GROUP_BYTES`: there the next group's fetched weight would push out this one's)."""
    ho, wo = s.out_hw
    return ho * wo <= PREFETCH_POSITIONS and s.group_bytes > PREFETCH_GROUP_BYTES


def chunked(s: BlockedSpec) -> bool:
    """Whether an unstrided 1x1 conv's groups reduce in passes of `PASS_BLOCKS` input blocks over a
    task's position blocks (`sliced_group`), not over all input blocks in each register block: where a
    group's weight is past `CHUNKED_GROUP_BYTES`, each position block read all of it from L2."""
    return s.direct_read and not sliced(s) and s.group_bytes > CHUNKED_GROUP_BYTES


def sliced_group(s: BlockedSpec, at: Placement, vectors: int, positions: int, pass_blocks: int = 1,
                 chunks: int = 1):  # noqa: ANN201 (a TVMScript macro)
    """`run(src, sn, w, bias, res, out, n, g0, c)`: group g0's output over chunk c of `chunks` of its
    position blocks (the last chunk also the map's last few positions), the reduction in passes of
    `pass_blocks` input blocks' weight (k x k x 16 x its vectors x 16 floats each), the partial sums
    kept in memory between passes. One input block a pass (`sliced`), each step also fetching its
    share of the next pass's weight (the next group's first after the last): ResNet's 512 -> 512 3x3 at
    7x7, one thread, the weights cycled from memory as in the model: 2.34 -> 1.72 ms; stride 2 from
    14x14 2.72 -> 2.24; the same at 14x14 and 28x28 (33 and 131 position blocks) within 1% or slower.
    Eight a pass (`chunked`), 8 images, one thread, AMD EPYC Zen 4: 256 -> 64 at 28x28 2.49 -> 2.05 ms,
    512 -> 128 at 14x14 2.37 -> 2.01, 1024 -> 256 at 7x7 2.36 -> 2.08, 256 -> 1024 at 7x7 with its
    residual 2.20 -> 2.08."""
    whole, left = divmod(positions, POSITIONS)
    if pass_blocks > 1 and left and not tail_positions(s, positions):
        whole, left = whole + 1, 0  # the last block starts early to end at the map's end: no tail body to build
    taps = s.kernel ** 2
    slice_floats = vectors * taps * s.in_lanes * BLOCK
    passes = -(-s.in_blocks // pass_blocks)
    span = -(-whole // chunks)  # the most whole blocks a chunk holds
    # passes of several input blocks fetch nothing ahead: 8 images, one thread, 256 -> 64 at 28x28 2.79 ms
    # fetching against 2.34 not (a pass's weight is read by each of the chunk's blocks, from L1)
    lines = -(-slice_floats // BLOCK // (max(1, whole // chunks) * taps)) if pass_blocks == 1 else 0
    steps = {count: (start_macro(vectors, count), reduce_macro(s, at, vectors, count, lines if count == POSITIONS else 0),
                     finish_macro(s, at, vectors, count)) for count in {POSITIONS, left} - {0}}

    def step_macro(count: int):  # noqa: ANN202 (a TVMScript macro)
        start, reduce, finish = steps[count]

        @T.macro
        def step(src, sn, w, bias, res, out, n, g0, cp, b, q0, slot, partial):  # noqa: ANN001, ANN202
            acc = T.alloc_buffer((vectors, count, BLOCK), "float32", scope=STACK)
            if cp == 0:
                start(acc, bias, g0)
            else:
                for j in T.unroll(vectors):
                    for p in T.unroll(count):
                        for lane in T.vectorized(BLOCK):
                            acc[j, p, lane] = partial[slot, j, p, lane]
            reduce(acc, src, sn, w, g0, q0, cp * pass_blocks, T.min(cp * pass_blocks + pass_blocks, s.in_blocks),
                   g0 * s.vector_floats + T.min(cp * pass_blocks + pass_blocks, s.in_blocks) * slice_floats,
                   slot * pass_blocks * taps, at.taps(b))
            if cp == passes - 1:
                finish(acc, res, out, n, g0, q0)
            else:
                for j in T.unroll(vectors):
                    for p in T.unroll(count):
                        for lane in T.vectorized(BLOCK):
                            partial[slot, j, p, lane] = acc[j, p, lane]

        return step

    full = step_macro(POSITIONS)
    tail = step_macro(left) if left else full

    @T.macro
    def run(src, sn, w, bias, res, out, n, g0, c):  # noqa: ANN001, ANN202
        partial = T.alloc_buffer((span + 1, vectors, POSITIONS, BLOCK), "float32")
        b0: T.let = c * whole // chunks
        b1: T.let = (c + 1) * whole // chunks
        for cp in range(passes):
            for b in range(b0, b1):
                full(src, sn, w, bias, res, out, n, g0, cp, b, T.min(b * POSITIONS, positions - POSITIONS), b - b0, partial)
            if T.bool(left > 0):
                if c == chunks - 1:
                    tail(src, sn, w, bias, res, out, n, g0, cp, whole, whole * POSITIONS, span, partial)

    return run


def group_blocks(s: BlockedSpec, at: Placement, count: int = POSITIONS, make: object = None):  # noqa: ANN201 (a TVMScript macro)
    """`blocks(src, sn, w, bias, res, out, n, g, q0)`: group g's register block (`group_sizes`) of
    `count` positions: a `block_macro` per group size, the first size's groups first (`make(vectors)`
    in place of `block_macro` where given: `sliced_group`)."""
    make = make or (lambda vectors: block_macro(s, at, vectors, count))
    (main, mains), *rest = s.group_sizes
    first = make(main)
    if not rest:  # one size: one block parsed (parsing is most of what making a kernel takes)
        @T.macro
        def alike(src, sn, w, bias, res, out, n, g, q0):  # noqa: ANN001, ANN202
            first(src, sn, w, bias, res, out, n, g * main, q0)
        return alike
    tail = rest[0][0]
    other = make(tail)

    @T.macro
    def blocks(src, sn, w, bias, res, out, n, g, q0):  # noqa: ANN001, ANN202
        if g < mains:
            first(src, sn, w, bias, res, out, n, g * main, q0)
        else:
            other(src, sn, w, bias, res, out, n, mains * main + (g - mains) * tail, q0)

    return blocks


def positions_macro(s: BlockedSpec, at: Placement, positions: int):  # noqa: ANN201 (a TVMScript macro)
    """`run(src, sn, w, bias, res, out, n, g, c)`: chunk c of group g's position blocks of image n
    (`task_split`), the last chunk also the map's last few positions (`tail_positions`) where they have a
    block of their own; elsewhere the last block starts early to end at the map's end (its overlap
    computed twice). A `sliced` spec's group is one task, all its blocks input block by input block; a
    `chunked` spec's chunks reduce in passes of input blocks (`sliced_group`)."""
    if sliced(s) or chunked(s):
        _, _, chunks = task_split(s, positions)
        passes_of = PASS_BLOCKS if chunked(s) else 1
        return group_blocks(s, at, make=lambda vectors: sliced_group(s, at, vectors, positions, passes_of, chunks))
    block = group_blocks(s, at)
    _, blocks, chunks = task_split(s, positions)
    left = tail_positions(s, positions)

    @T.macro
    def run(src, sn, w, bias, res, out, n, g, c):  # noqa: ANN001, ANN202
        for b in range(c * blocks // chunks, (c + 1) * blocks // chunks):
            block(src, sn, w, bias, res, out, n, g, T.min(b * POSITIONS, positions - POSITIONS))

    if not left:
        return run
    last = group_blocks(s, at, left)

    @T.macro
    def run_and_tail(src, sn, w, bias, res, out, n, g, c):  # noqa: ANN001, ANN202
        run(src, sn, w, bias, res, out, n, g, c)
        if c == chunks - 1:
            last(src, sn, w, bias, res, out, n, g, positions - left)

    return run_and_tail


def tail_positions(s: BlockedSpec, positions: int) -> int:
    """Positions past the last whole block that get a block of their own: always where the result
    is written over the residual (a position computed twice would add it twice), elsewhere where the
    last block started early would repeat more than 2% of the map (ResNet's 7x7 maps: 49 positions
    as 8 blocks and one of 1, not 9 blocks, 10% of the work twice; a block of one position runs its
    4 accumulators at half the rate, a third of a whole block's time)."""
    left = positions % POSITIONS
    return left if left and (s.residual or (POSITIONS - left) * 50 > positions) else 0


def task_split(s: BlockedSpec, positions: int) -> tuple[int, int, int]:
    """(groups of output vectors, position blocks, chunks of position blocks per group) for the tasks:
    whole blocks, and one more ending at the map's end unless the positions left have their own (`tail_positions`)."""
    blocks = positions // POSITIONS if tail_positions(s, positions) else -(-positions // POSITIONS)
    if sliced(s):
        return s.groups, blocks, 1
    return s.groups, blocks, min(blocks, max(1, -(-TASKS // (s.batch * s.groups))))


def direct_read_kernel(s: BlockedSpec) -> tvm.tirx.PrimFunc:
    """An unstrided 1x1 conv: tasks take (image, group of output vectors, chunk of position blocks),
    the group outermost so a task's weight rows stay in cache while its positions run."""
    plane = s.height * s.width
    groups, _, chunks = task_split(s, plane)
    run = positions_macro(s, plane_placement(s, s.width, 1), plane)
    x_view = (s.batch, stored(s.cin) // BLOCK, 1, plane, BLOCK)

    @T.macro
    def body(x_in, w, bias, res, out):  # noqa: ANN001, ANN202
        x = T.decl_buffer(x_view, "float32", data=x_in.data)
        for t in T.parallel(s.batch * groups * chunks):
            n: T.let = t // (groups * chunks)
            g: T.let = t // chunks % groups
            c: T.let = t % chunks
            run(x, n, w, bias, res, out, n, g, c)

    return prim_func(s, body)


def phase_plane_kernel(s: BlockedSpec) -> tvm.tirx.PrimFunc:
    """The images' inputs copied, zero-padded, into phase planes (tasks by image and input block), then
    their outputs computed over them (tasks as in `direct_read_kernel`): two parallel regions for up to
    `PLANES_BYTES` of planes, where one image at a time took two per image (8 images, two threads, all
    at once: pruned ResNet-18's 3x3 stride-2 convs 0.93-1.02 -> 0.78-0.87 ms, its 1x1 stride 2 0.147 -> 0.112)."""
    k, st, pad = s.kernel, s.stride, s.padding
    ho, wo = s.out_hw
    geometry = PhasePlanes(s.height, s.width, k, st, pad, ho)
    row, ph, size = geometry.row, geometry.phases, geometry.size
    cib, lanes = s.in_blocks, s.in_lanes
    positions = ho * wo
    groups, _, chunks = task_split(s, positions)
    run = positions_macro(s, plane_placement(s, row, ph), positions)
    image_bytes = cib * ph * ph * size * lanes * 4
    images = max(d for d in range(1, s.batch + 1) if s.batch % d == 0 and (d == 1 or d * image_bytes <= PLANES_BYTES))

    def at(n, cb, i, j, lane):  # noqa: ANN001, ANN202 (TIR expressions): input (n, channel cb * 16 + lane, i, j)'s flat index
        if s.nchw_input:
            return ((n * s.cin + lane) * s.height + i) * s.width + j
        return (((n * cib + cb) * s.height + i) * s.width + j) * BLOCK + lane

    @T.macro
    def body(x, w, bias, res, out):  # noqa: ANN001, ANN202
        flat = T.decl_buffer((math.prod(s.in_shape),), "float32", data=x.data)
        planes = T.alloc_buffer((images, cib, ph * ph, size, lanes), "float32")
        for n0 in range(0, s.batch, images):
            for t in T.parallel(images * cib):
                sn: T.let = t // cib
                cb: T.let = t % cib
                for a in range(ph * ph):
                    for q in range(size):
                        for lane in T.vectorized(lanes):
                            planes[sn, cb, a, q, lane] = T.float32(0)
                for i in range(s.height):
                    if (i + pad) % st < ph:
                        for j in range(s.width):
                            if (j + pad) % st < ph:
                                for lane in T.vectorized(lanes):
                                    planes[sn, cb, (i + pad) % st * ph + (j + pad) % st,
                                           (i + pad) // st * row + (j + pad) // st, lane] = flat[at(n0 + sn, cb, i, j, lane)]
            for t in T.parallel(images * groups * chunks):
                sn: T.let = t // (groups * chunks)
                g: T.let = t // chunks % groups
                c: T.let = t % chunks
                run(planes, sn, w, bias, res, out, n0 + sn, g, c)

    return prim_func(s, body)


def inside(s: BlockedSpec) -> tuple[int, int, int, int]:
    """The output rows y0..y1 and columns x0..x1 (inclusive) whose windows lie within the input."""
    k, st, pad = s.kernel, s.stride, s.padding
    return -(-pad // st), (s.height - k + pad) // st, -(-pad // st), (s.width - k + pad) // st


def border_segments(s: BlockedSpec) -> list[tuple[int, ...]]:
    """The output positions outside `inside`'s, as runs (row, column, row step, column step, length,
    kh0, kh1, kw0, kw1) whose positions read the same taps kh0..kh1 x kw0..kw1 of their windows: the
    border rows' middles, the border columns within the inside rows, and each corner on its own."""
    k, st, pad = s.kernel, s.stride, s.padding
    ho, wo = s.out_hw
    y0, y1, x0, x1 = inside(s)

    def taps(o: int, extent: int) -> tuple[int, int]:
        return max(0, pad - o * st), min(k, extent + pad - o * st)

    runs = []
    for oy in [*range(y0), *range(y1 + 1, ho)]:
        for ox in [*range(x0), *range(x1 + 1, wo)]:
            runs.append((oy, ox, 0, 1, 1, *taps(oy, s.height), *taps(ox, s.width)))
        runs.append((oy, x0, 0, 1, x1 - x0 + 1, *taps(oy, s.height), 0, k))
    for ox in [*range(x0), *range(x1 + 1, wo)]:
        runs.append((y0, ox, 1, 0, y1 - y0 + 1, 0, k, *taps(ox, s.width)))
    return runs


def windowed(s: BlockedSpec) -> bool:
    """Whether a k x k conv reads its input where it is (`window_kernel`), not from phase planes:
    3x3 windows padded by 1 (a stem's NCHW input aside), where the positions whose windows lie inside
    the input are `INSIDE_SHARE` of the map or more, and its groups are not `sliced`."""
    ho, wo = s.out_hw
    y0, y1, x0, x1 = inside(s)
    return not s.nchw_input and s.kernel == 3 and s.padding == 1 and not sliced(s) \
        and (y1 - y0 + 1) * (x1 - x0 + 1) >= max(POSITIONS, INSIDE_SHARE * ho * wo)


def window_kernel(s: BlockedSpec) -> tvm.tirx.PrimFunc:
    """A 3x3 conv reading its input where it is: the positions whose windows lie inside the input
    (`inside`) flat over their own rectangle, as `direct_read_kernel`'s tasks do (fetching ahead where
    `FETCH_WIDTH` says); the border's runs (`border_segments`), which read only some of their windows'
    taps, in one more task per image and group. Over phase planes, whose copy of the whole input came
    first (MLAS reads in place too), 8 images, one thread / two: ResNet-18's 64 -> 64 at 56x56
    11.64 -> 10.87 ms / 5.76 -> 5.43, pruned 32 -> 32 3.21 -> 2.77 / 1.59 -> 1.38, 32 -> 64 stride 2
    1.81 -> 1.50 / 0.92 -> 0.75, 128 -> 128 at 28x28 11.37 -> 10.26 / 5.75 -> 5.19; one image, two
    threads: pruned 32 -> 32 0.238 -> 0.202, 32 -> 64 stride 2 0.149 -> 0.120."""
    k, st, pad, width = s.kernel, s.stride, s.padding, s.width
    y0, y1, x0, x1 = inside(s)
    cols = x1 - x0 + 1
    positions = (y1 - y0 + 1) * cols
    groups, _, chunks = task_split(s, positions)
    runs = border_segments(s)

    def origin(oy, ox):  # noqa: ANN001, ANN202 (TIR expressions): the input position of output (oy, ox)'s window's first tap
        return (oy * st - pad) * width + ox * st - pad

    def tap(kh, kw):  # noqa: ANN001, ANN202
        return 0, kh * width + kw

    interior = Placement(lambda q0, p: origin(y0 + (q0 + p) // cols, x0 + (q0 + p) % cols), tap,
                         lambda q0, p: (y0 + (q0 + p) // cols, x0 + (q0 + p) % cols),
                         lambda _q0: (0, k, 0, k), lambda q0: q0 // POSITIONS,
                         (lambda q0: origin(y0 + (q0 + FETCH_BLOCKS * POSITIONS) // cols,
                                            x0 + (q0 + FETCH_BLOCKS * POSITIONS) % cols) + (k - 1) * width)
                         if st == 2 and width >= FETCH_WIDTH else None)
    # a run's block's first position q0: (row, column, row step, column step, kh0, kh1, kw0, kw1)
    border = Placement(lambda q0, p: origin(q0[0] + p * q0[2], q0[1] + p * q0[3]), tap,
                       lambda q0, p: (q0[0] + p * q0[2], q0[1] + p * q0[3]),
                       lambda q0: q0[4:], lambda _q0: 0)
    run = positions_macro(s, interior, positions)
    whole, single = group_blocks(s, border), group_blocks(s, border, 1)

    # the runs' fields read from a table on the stack, opaque to TVM's simplifier: as Select chains on the run
    # inlined into every unrolled load's index, simplifying them took 1.8 of the kernel's 2.1 s build (64 -> 64
    # at 56x56; 0.3 s from the table), the kernel as fast
    fields, table_values = len(runs[0]), [value for run in runs for value in run]

    def table_value(i):  # noqa: ANN001, ANN202 (a TIR expression of an unrolled index)
        value = table_values[-1]
        for j in range(len(table_values) - 2, -1, -1):
            value = T.Select(i == j, table_values[j], value)
        return value

    @T.macro
    def edges(x, n, w, bias, res, out, g):  # noqa: ANN001, ANN202
        table = T.alloc_buffer((len(table_values),), "int32", scope="local")
        for i in T.unroll(len(table_values)):
            table[i] = table_value(i)
        for r in range(len(runs)):
            oy: T.let = table[r * fields]
            ox: T.let = table[r * fields + 1]
            dy: T.let = table[r * fields + 2]
            dx: T.let = table[r * fields + 3]
            length: T.let = table[r * fields + 4]
            kh0: T.let = table[r * fields + 5]
            kh1: T.let = table[r * fields + 6]
            kw0: T.let = table[r * fields + 7]
            kw1: T.let = table[r * fields + 8]
            taps = (kh0, kh1, kw0, kw1)
            for b in range(length // POSITIONS):
                whole(x, n, w, bias, res, out, n, g, (oy + b * POSITIONS * dy, ox + b * POSITIONS * dx, dy, dx, *taps))
            for t in range(length // POSITIONS * POSITIONS, length):
                single(x, n, w, bias, res, out, n, g, (oy + t * dy, ox + t * dx, dy, dx, *taps))

    x_view = (s.batch, s.in_blocks, 1, s.height * width, BLOCK)

    @T.macro
    def body(x_in, w, bias, res, out):  # noqa: ANN001, ANN202
        x = T.decl_buffer(x_view, "float32", data=x_in.data)
        for t in T.parallel(s.batch * groups * (chunks + 1)):
            n: T.let = t // (groups * (chunks + 1))
            g: T.let = t // (chunks + 1) % groups
            c: T.let = t % (chunks + 1)
            if c < chunks:
                run(x, n, w, bias, res, out, n, g, c)
            else:
                edges(x, n, w, bias, res, out, g)

    return prim_func(s, body)


def prim_func(s: BlockedSpec, body: object) -> tvm.tirx.PrimFunc:
    x_shape, w_shape, b_shape = s.arg_shapes[:3]

    @T.prim_func(private=True)
    def f(x: T.Buffer(x_shape, "float32"), w: T.Buffer(w_shape, "float32"), bias: T.Buffer(b_shape, "float32"),
          out: T.Buffer(s.out_shape, "float32")):
        body(x, w, bias, out, out)  # with a residual, `out` holds it on the way in
    return f
