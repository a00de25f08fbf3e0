"""Zero-padded phase planes: the input layout of sparsefx's depthwise and k x k conv kernels.

A plane of the input is copied, zero-padded, into `stride²` phase planes (rows and columns split by
their remainder mod the stride), so a strided window becomes an unstrided one and every tap of it
reads one contiguous run at a fixed offset from the output's flat index. At stride 2 the copy reads
every other input column: TIR lowers such a strided vector load to one load per lane, which took
two thirds of a 112x112 stride-2 depthwise conv (EfficientNet-B0's 96 channels: 0.34 of 0.51 ms,
one thread). Rows of even width are instead read 32 columns at a time and split into their even
and odd columns by two shuffles.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import tirx
from tvm.script import tirx as T

from sparsefx.backends.tvm.sparse.kernels import LANES


@dataclass(frozen=True)
class PhasePlanes:
    """Where the input rows of a conv with a square `kernel`, equal `stride` and `padding` land."""

    height: int
    width: int
    kernel: int
    stride: int
    padding: int
    out_height: int

    @property
    def phases(self) -> int:
        """Phases per axis some tap reads (a strided 1x1 reads only the first)."""
        return min(self.kernel, self.stride)

    @property
    def row(self) -> int:
        """Phase-plane row length: holds every input column and an output row's window."""
        return -(-(self.width + 2 * self.padding) // self.stride)

    @property
    def rows(self) -> int:
        """Phase-plane rows, one spare: the last vector's window may run over the last output row."""
        reach = (self.kernel - 1) // self.stride
        return max(self.out_height + reach + 1, (self.height - 1 + self.padding) // self.stride + 1)

    @property
    def size(self) -> int:
        return self.rows * self.row

    def filler(self, rows: int | None = None):  # noqa: ANN201 (a TVMScript macro)
        """A macro `fill(x, planes, n, c, pc, r0)`: zero `planes[pc]` (phases², `rows` phase-plane rows,
        default all of them) and copy into it the rows of plane (n, c) of `x` that land in phase-plane
        rows r0 .. r0 + rows (r0 = 0 and every row: the whole plane)."""
        st, p, wq, ph = self.stride, self.padding, self.row, self.phases
        rows = self.rows if rows is None else rows
        size = rows * wq
        firsts = [(b - p) % st for b in range(2)]  # first input column landing in phase column b
        counts = [-(-(self.width - f) // st) for f in firsts]
        lanes = [min(LANES, n) for n in counts]
        zero_lanes = min(LANES, size)

        def dest(i, b, r0):  # noqa: ANN001, ANN202 (TIR expressions): phase plane and start of row i's columns in it
            return (i + p) % st * ph + b, ((i + p) // st - r0) * wq + (firsts[b] + p) // st

        @T.macro
        def copy_columns(x, planes, n, c, pc, i, b, r0):  # noqa: ANN001, ANN202
            plane, start = dest(i, b, r0)
            for j0 in range(-(-counts[b] // lanes[b])):
                for jl in T.vectorized(lanes[b]):
                    j: T.let = T.min(j0 * LANES, counts[b] - lanes[b]) + jl
                    planes[pc, plane, start + j] = x[n, c, i, firsts[b] + j * st]

        @T.macro
        def copy_pair(x, planes, n, c, pc, i, b, r0):  # noqa: ANN001, ANN202
            # input columns of parity firsts[b], 2 * LANES at a time; the last step shifted back (by an
            # even count: the width is even) rather than made ragged
            plane, start = dest(i, b, r0)
            for q in range(-(-self.width // (2 * LANES))):
                first: T.let = T.min(q * 2 * LANES, self.width - 2 * LANES)
                planes[pc, plane, tirx.Ramp(start + first // 2, 1, LANES)] = tirx.Shuffle(
                    [x[n, c, i, tirx.Ramp(first, 1, 2 * LANES)]],
                    [tirx.IntImm("int32", 2 * m + firsts[b]) for m in range(LANES)])

        copy = copy_pair if st == 2 and self.width % 2 == 0 and self.width >= 2 * LANES else copy_columns

        @T.macro
        def fill(x, planes, n, c, pc, r0):  # noqa: ANN001, ANN202
            for a in range(ph * ph):
                for q0 in range(-(-size // zero_lanes)):
                    for q in T.vectorized(zero_lanes):
                        planes[pc, a, T.min(q0 * zero_lanes, size - zero_lanes) + q] = T.float32(0)
            for i in range(T.max(r0 * st - p, 0), T.min((r0 + rows) * st - p, self.height)):
                if (i + p) % st < ph:
                    copy(x, planes, n, c, pc, i, 0, r0)
                    if T.bool(ph == 2):
                        copy(x, planes, n, c, pc, i, 1, r0)

        return fill
