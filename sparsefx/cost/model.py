"""Hardware cost model: the latency of one kernel at one shape on one target.

Sources, best first:
- measured: convolutions, matmuls and attention are timed by the backend's `Timer` (`cost.timing`) on
  every implementation the compiled model could run them on, and the one the compiler's
  dispatch would pick (`cost.timing.choose`, decided on the conv without its epilogue, as the
  dispatch decides) is priced with its epilogue, at the exact shape or at points of a
  per-dimension grid, and interpolated between them;
- calibrated: element-wise, reduction and pooling kernels run as fused TIR, and conversions into and
  out of a backend's own activation layout (`cost.layouts`); their cost is `overhead + bytes / bandwidth`,
  both fitted per kernel class by the timer on the target;
- roofline: FLOPs against the target's peak and bytes against its bandwidth, where nothing
  can be measured (no timer, CUDA targets on this host, `measure=False`).

Measured kernels run as a layer inside a model does: on a weight from memory (see
`cost.timing`), with the code of the call path warm. Nothing is added for writing the output:
charging it at the bandwidth of writing memory last written 256 MiB ago (as tables v6-v13 did)
over-predicted every pruned model on an Intel Xeon with AMX (MobileNetV2 at half its channels
by 83%); without it the pruned ResNets and MobileNetV2 came within 5% of their compiled runs.

Latency is a staircase in the channel count (SIMD width, blocked layouts): a channel-like
dimension is first rounded up to the target's vector lanes, then looked up; in steps of a
quarter of its unpruned size where that is finer (a 16-channel layer pruned to 5 ran in a third
of the 16-channel time on sparsefx's direct conv, not in the same time). Measurements
are cached on disk per target (`cache_dir()/costmodel/<arch>-<cores>.json`, calibrations beside it).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from sparsefx.cache import Table, cache_dir
from sparsefx.cost.fusion import EPILOGUE_RULES, FusionRules
from sparsefx.cost.kernel import CALIBRATED, Kernel
from sparsefx.cost.timing import PROBES, Timer, Times, charged, choose, probe_ms
from sparsefx.errors import SparsefxError
from sparsefx.target import Target, resolve_target, with_measured_peaks

MEASURED = ("conv2d", "matmul", "attention")
# `estimate`'s guesses are scaled by work alone, unshaded. Shaded 10% low (0.9), a second plan on the first one's
# tables took the same moves, but each shaded guess drew a measurement: cold plans at 2x, in one process on
# fresh caches (AMD EPYC, 2 threads), 0.9 -> 1.0: ResNet-50 193 -> 160 kernels, 61.0 -> 44.6 s, importance
# kept 0.927 -> 0.928; MobileNetV2 184 -> 142, 31.4 -> 26.2 s, 0.929 -> 0.939; ResNet-18 101 -> 71, 45.7 ->
# 37.6 s, 0.944 -> 0.950 (1.1: 78, 94, 33 kernels, 0.925, 0.935, 0.956). A second plan now gets the first
# one's back (`planning.kept`)
GUESS_MARGIN = 1.0
GRID = (1 / 8, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4, 7 / 8, 1.0)
LAUNCH_MS = {"llvm": 0.004, "cuda": 0.005}  # roofline per-kernel overhead where not calibrated
ROOFLINE_EFFICIENCY = 0.5  # what a tuned kernel reaches of the peak, for unmeasured targets
# bumped when what a measurement times changes; older tables are re-measured (v10: the backend's timer,
# rivals in turn, the implementation chosen on the bare conv as the dispatch does, its call overhead;
# v11: a weight copy per round, made cold by `cost.timing.cold_traffic`; v12: TIR kernels' parallel
# loops on PyTorch's OpenMP pool, `backends.tvm.parallel`; v13: float32 matmuls also on oneDNN prepacked;
# v14: no output-write charge in the entries; v15, v16: small-map 1x1 and depthwise convs vectorised over channels;
# v17: depthwise rows stored straight into the output; v18: only the depthwise channel tile's padding zeroed;
# v20: bf16 convs on AMX tiles, `kernels.amx`; v21: PyTorch's bf16 linear charged beside `amx_linear`; v22: tile layout's 16-channel half step;
# v23: `direct` in bands of output rows; v24: LayerNorm's TIR on `kernels.layer_norm`; v25: float32 Linear layers on `kernels.linear`; v26: `pointwise` copies bands of large inputs;
# v27: PyTorch's float32 kernels timed on freshly released memory, `measure.host.release_freed_memory`; v28: convs only; v29: float32 convs on a just-written input;
# v30: float32 convs on the blocked kernels (NCHW16c); v31: no one-vector register blocks in `blocked`;
# v32: stems on `blocked`; v33: `blocked` output groups of 4, 3 and 2 vectors; v34: conv steps aligned with their dims;
# v35: `blocked` maps' last few positions in a block of their own; v36: `linear` for fewer rows than a block;
# v37: `linear` blocks of 6 rows x 64 outputs, up to 768 inputs; v38: PyTorch's call overhead timed cold,
# layout answers (`LAYOUT_PREFIX`); v39: 1x1 convs on 8-15 channels on `blocked`; v40: `blocked` unrolls 4 input
# channels a step, own kernels timed apart from PyTorch's unless near a tie; v41: `amx` writes over its residual,
# `amx_linear` takes up to 16 rows; v42: `blocked` copies several images' phase planes at once; v43: up to 2 MB;
# v44: `linear` up to 1536 inputs; v45: `blocked` 3x3 convs read their input in place; v46: `blocked` 1x1 convs
# with big group weights reduce in passes; v47: bf16 convs on AVX512-BF16, `kernels.dpbf16`; v48: kernels built
# without TIR's CSE, `backends.tvm.build_config`; v49: attention on `kernels.attention`; v50: the tile layout in
# 16-channel steps without AMX, `dpbf16` blocks of 5 and 3 vectors; v51: `dpbf16` blocks one position short where
# that computes less, `dpbf16.positions`; v52: float32 3x3 convs on Winograd F(4x4, 3x3), `kernels.winograd`;
# v53: bf16 ones on F(2x2, 3x3), `kernels.winogradbf16`, the direct kernels timed beside them)
TABLE_VERSION = 53
PROBE_PREFIX = "probe-median|"  # the drift probes' own entries (`drift`), apart from the kernels' timings
LAYOUT_PREFIX = "layout|"  # `in_layout`'s answers (reads + 2 * writes), kept so a warm plan needs no backend
CALIBRATION_VERSION = 6  # v3: timed in turn (`cost.timing`), no "dispatch" entry (the timer's overheads); v4: no "cold_write"; v5: max_pool2d on sparsefx's kernel; v6: layout conversions


def table_paths(target: Target, device: str = "", path: Path | None = None) -> tuple[Path, Path]:
    """Where the cost tables of `target` (timed on `device`, "" for this host) are kept, at `path` where
    given: kernel times and, beside them, the element-wise calibration."""
    suffix = (f"-{device}" if device else "") + ("" if target.precision == "fp32" else f"-{target.precision}")
    path = path or cache_dir() / "costmodel" / f"{target.arch}-{target.cores}{suffix}.json"
    return path, path.with_name(f"{path.stem}.calibration.json")


class CostModel:
    """Predicted latency (ms) of kernels on `target`, from measurements where it can."""

    def __init__(self, target: object = "cpu", measure: bool = True, path: Path | None = None,
                 timer: Timer | None = None, fusion: FusionRules = EPILOGUE_RULES) -> None:
        """`timer` times kernels (the backend's, see `sparsefx.planning.pricing.cost_model`); a timer
        for another device (`timer.device`, e.g. a TVM RPC device) keeps a table of its own and prices
        element-wise kernels by `target`'s roofline. Without a timer only the roofline prices: on a
        CPU target that can be measured, `measure=False` must say so. `fusion`: what the backend
        fuses, as the latency pass reads it (`cost.fusion`)."""
        self.target: Target = resolve_target(target)
        self.timer, self.fusion = timer, fusion
        self.device = timer.device if timer is not None else ""
        if measure and timer is None and not self.target.is_gpu:
            raise SparsefxError("a measuring CostModel needs a timer: build it with "
                                "sparsefx.planning.pricing.cost_model(target), or pass measure=False for the roofline")
        self.measure = measure and timer is not None and (bool(self.device) or not self.target.is_gpu)
        self.lanes = max(1, (self.target.vector_bits or 128) // 32) if not self.target.is_gpu else 8
        self.path, calibration = table_paths(self.target, self.device, path)
        # calibrations are re-fitted when either version changes, kernels re-measured with TABLE_VERSION
        self.tables = (Table(self.path, TABLE_VERSION), Table(calibration, f"{TABLE_VERSION}.{CALIBRATION_VERSION}"))
        self.table: dict[str, float] = self.tables[0].entries
        self.calibration: dict[str, list[float]] = self.tables[1].entries
        self.sources: dict[str, int] = {}
        self._dirty = False
        self._drift: list[tuple[str, float, float]] | None = None
        self._priced: dict[tuple[Kernel, Kernel], tuple[float, int, bool]] = {}  # (kernel, reference) -> `_interpolated`
        self.progress: Callable[[int], None] | None = None
        self._families: dict[tuple[str, str], tuple[list, dict]] | None = None  # (op, attrs) -> (measured, alike) (`_family`)

    # --- public -------------------------------------------------------------------------
    def latency(self, kernel: Kernel, reference: Kernel | None = None) -> float:
        """Predicted ms of `kernel`; `reference` (the same kernel unpruned) defines its grid."""
        if kernel.op == "free":
            return 0.0
        if kernel.op in CALIBRATED:
            return self._calibrated(kernel)
        if not self.measure or kernel.op not in MEASURED:
            return self._roofline(kernel)
        return self._interpolated(kernel, reference or kernel)

    def estimate(self, kernel: Kernel, reference: Kernel | None = None) -> tuple[float, bool]:
        """(ms, exact): `latency` where the table holds every kernel that reads (exact), else a guess
        that measures nothing: each missing grid kernel scaled by work from the measured kernel of its
        family (the same but for channel-like dimensions) nearest above it in work, times
        `GUESS_MARGIN`. A kernel's time mostly shrinks more slowly than its work, so a guessed saving
        is optimistic, and a search that measures its best-looking moves before taking them
        (`planning.planner`) seldom passes over a move it would have taken on measured times. A cold
        plan of ResNet-50 at 2x measured 332 kernels where the moves it took read 103; guessing, ~160."""
        if kernel.op not in MEASURED or kernel.op in CALIBRATED or not self.measure:
            return self.latency(kernel, reference), True
        reference = reference or kernel
        if (kernel, reference) in self._priced:
            return self.latency(kernel, reference), True
        points = self._points(kernel, reference)
        if all(k.key in self.table for _, k in points if min(k.dims) > 0):
            return self.latency(kernel, reference), True
        guess = lambda k: self.table[k.key] if k.key in self.table else self._scaled(k, reference)
        total = sum(weight * (guess(k) if min(k.dims) > 0 else self.dispatch_overhead()) for weight, k in points)
        return total, False

    def _scaled(self, kernel: Kernel, reference: Kernel) -> float:
        """`kernel`'s ms guessed from its family's measured kernel nearest above it in work (its
        reference, unpruned, where none nearer is measured), scaled by work."""
        free = tuple(i for i, step in enumerate(reference.steps) if step)
        above = [(work, self.table[key]) for work, key in self._family(kernel, free) if work >= kernel.flops]
        work, ms = min(above) if above else (reference.flops, self.latency(reference))
        return GUESS_MARGIN * (ms * kernel.flops / work if work else ms)

    def _family(self, kernel: Kernel, free: tuple[int, ...]) -> list[tuple[float, str]]:
        """(work, key) of the table's measured kernels that differ from `kernel` only in the `free`
        dimensions, kept up to date as `measure_all` adds to the table (`_index`)."""
        if self._families is None:
            self._families = {}
            for key in list(self.table):
                self._index(key)
        op, _, attrs = kernel.key.split("|")
        fixed = tuple(d for i, d in enumerate(kernel.dims) if i not in free)
        measured, alike = self._families.setdefault((op, attrs), ([], {}))
        if (free, fixed) not in alike:
            alike[(free, fixed)] = [(work, key) for dims, work, key in measured
                                    if tuple(d for i, d in enumerate(dims) if i not in free) == fixed]
        return alike[(free, fixed)]

    def _index(self, key: str) -> None:
        """The table's `key` into `_family`'s lists, where it is a measured kernel's."""
        op, *rest = key.split("|")
        if self._families is None or op not in MEASURED or len(rest) != 2:
            return
        kernel = Kernel(op, tuple(map(int, rest[0].split(","))), tuple(float(a) for a in rest[1].split(",") if a))
        measured, alike = self._families.setdefault((op, rest[1]), ([], {}))
        measured.append((kernel.dims, kernel.flops, key))
        for (free, fixed), found in alike.items():
            if tuple(d for i, d in enumerate(kernel.dims) if i not in free) == fixed:
                found.append((kernel.flops, key))

    def in_layout(self, conv: Kernel) -> tuple[bool, bool]:
        """(reads, writes): whether the backend runs this conv on its input, and its output, in an
        activation layout of its own (`FusionRules.layout`; asking loads the backend, so the answer is
        kept in the table)."""
        if self.fusion.layout is None or conv.op != "conv2d":
            return False, False
        key = f"{LAYOUT_PREFIX}{conv.bare.key}"
        if key not in self.table:
            reads, writes = self.fusion.layout(conv)
            self.table[key], self._dirty = float(reads + 2 * writes), True
        code = int(self.table[key])
        return bool(code & 1), bool(code & 2)

    def drift(self) -> list[tuple[str, float, float]]:
        """(probe, ms in the table, ms now) for the drift probes (`timing.PROBES`: a compute-bound
        matmul and a memory-bound add) timed afresh. On a shared host the same kernels run tens of
        percent faster or slower an hour later (tables measured while this VM's host was busier
        over-predicted MobileNetV2 by 32-53% in a quieter spell); a table whose probes moved no longer
        describes the machine. Each probe's reference is an entry of its own (PROBE_PREFIX + name);
        a table without them takes them now. A probe is a plain PyTorch op timed here
        (`timing.probe_ms`): a change of speed shows on any implementation, and no kernel is built for
        it (timing every rival through the timer took 1 s of a 9 s warm plan).
        Timed once per CostModel: a planning run that plans several times asks again."""
        if self._drift is not None:
            return self._drift
        self._drift = []
        if not self.measure or self.device:
            return self._drift
        for name, (shapes, _) in PROBES.items():
            now, key = probe_ms(name, self.target.cores), f"{PROBE_PREFIX}{name}|{shapes}"
            if key not in self.table:
                self.table[key], self._dirty = now, True
            self._drift.append((name, self.table[key], now))
        return self._drift

    def save(self) -> None:
        if not self._dirty:
            return
        for table in self.tables:
            table.save()
        self._dirty = False

    def prefetch(self, pairs: Iterable[tuple[Kernel, Kernel | None]]) -> None:
        """Measure together every table entry that pricing these (kernel, reference) pairs reads
        (see `latency`), so their own kernels are built in one LLVM build per kind: asked one
        at a time, as a search prices its moves, ResNet-50's plan made 480 builds of ~2 kernels."""
        wanted = [k for kernel, reference in pairs
                  if kernel.op in MEASURED and kernel.op not in CALIBRATED and self.measure
                  and (kernel, reference or kernel) not in self._priced
                  for _, k in self._points(kernel, reference or kernel) if min(k.dims) > 0]
        self.measure_all(wanted)

    def measured(self, kernel: Kernel) -> float:
        """Time `kernel` at exactly its shape (cached)."""
        self.measure_all([kernel])
        self.sources["measured"] = self.sources.get("measured", 0) + 1
        return self.table[kernel.key]

    def measure_all(self, kernels: list[Kernel]) -> None:
        """Time those of `kernels` the table lacks, together (see `time_all`), into the table."""
        missing = list({k.key: k for k in kernels if k.key not in self.table}.values())
        if not missing:
            return
        for kernel, ms in zip(missing, self.time_all(missing), strict=True):
            self.table[kernel.key] = ms
            self._index(kernel.key)
            self._dirty = True
            if self.progress:
                self.progress(1)

    def time_now(self, kernel: Kernel) -> float:
        """ms of `kernel` as the compiled model runs it, timed now (uncached), see `time_all`."""
        return self.time_all([kernel])[0]

    def implementations(self, kernels: list[Kernel]) -> list[str]:
        """The implementation the compiler's dispatch picks for each kernel (see `_decide`)."""
        return self._decide(kernels)[0]

    def _decide(self, kernels: list[Kernel], ahead: Sequence[Kernel] = ()) -> tuple[list[str], list[Times]]:
        """Each kernel's implementation and the times it was chosen from: timed by the backend's
        timer and decided by `choose`, on the kernel without its epilogue, as the dispatch decides
        (`ahead`: the timer's, kernels timed next)."""
        times = self.timer.time([k.bare for k in kernels], ahead=ahead)  # on target.cores threads
        overheads = self.timer.overheads()
        return [choose(t, overheads) for t in times], times

    def time_all(self, kernels: list[Kernel]) -> list[float]:
        """ms of each kernel as the compiled model runs it, timed now (uncached): the implementation
        the dispatch picks (`implementations`) with the kernel's epilogue fused (timed so, unless the
        implementation applies that epilogue in the bare kernel's time: the timer's `free_epilogues`),
        plus its call overhead."""
        chosen, bare = self._decide(kernels, ahead=[k for k in kernels if k.bare != k and k.epilogue[1]])
        times = [{impl: t[impl]} for impl, t in zip(chosen, bare, strict=True)]
        free = self.timer.free_epilogues  # epilogues that cost the chosen implementation nothing: not timed again
        dressed = [i for i, k in enumerate(kernels)
                   if k.bare != k and (k.epilogue[1] or k.epilogue[0] not in free.get(chosen[i], ()))]
        for i, t in zip(dressed, self.timer.time([kernels[i] for i in dressed], [[chosen[i]] for i in dressed]),
                        strict=True):
            # the chosen implementation cannot fuse this epilogue (a residual add on the depthwise
            # kernel): approximated by the cheapest one that can (the model runs the chosen kernel
            # and the add as an element-wise TIR kernel)
            times[i] = t or self.timer.time([kernels[i]])[0]
        overheads = self.timer.overheads()
        return [min(charged(t, overheads).values()) for t in times]

    # --- sources ------------------------------------------------------------------------
    def _interpolated(self, kernel: Kernel, reference: Kernel) -> float:
        """Multilinear interpolation over grid points of each dimension that differs from the
        reference, after rounding channel-like dimensions up to the vector width."""
        known = self._priced.get((kernel, reference))
        if known is not None:
            total, measured, interpolated = known
            self.sources["measured"] = self.sources.get("measured", 0) + measured
        else:
            points = self._points(kernel, reference)
            self.measure_all([k for _, k in points if min(k.dims) > 0])  # the corners' own kernels in one build
            # A zero-sized corner (below the smallest grid point) costs the call overhead only.
            total = sum(weight * (self.measured(k) if min(k.dims) > 0 else self.dispatch_overhead())
                        for weight, k in points)
            measured, interpolated = sum(min(k.dims) > 0 for _, k in points), len(points) > 1
            # a search prices the same kernels over and over: remembered, with what they count as
            self._priced[(kernel, reference)] = (total, measured, interpolated)
        if interpolated:  # a kernel on the grid counts as measured only
            self.sources["interpolated"] = self.sources.get("interpolated", 0) + 1
        return total

    def _points(self, kernel: Kernel, reference: Kernel) -> tuple[tuple[float, Kernel], ...]:
        """The weighted kernels `kernel` is priced from: its grid `corners`, or itself where the backend
        runs it in another layout than a corner (another kernel: a conv pruned to 13 input channels
        runs NCHW, its grid point at 16 blocked, 0.17 ms against 0.08 at batch 64)."""
        points = corners(kernel, reference)
        if any(self.in_layout(k) != self.in_layout(kernel) for _, k in points if min(k.dims) > 0):
            return ((1.0, kernel),)
        return points

    def _roofline(self, kernel: Kernel) -> float:
        if self.target.kind == "llvm" and not self.target.peak_gflops and not self.device:
            self.target = with_measured_peaks(self.target)  # measured once per host, only when needed
        peak = (self.target.peak_gflops or 100.0) * ROOFLINE_EFFICIENCY
        bandwidth = self.target.bandwidth_gbs or 20.0
        self.sources["roofline"] = self.sources.get("roofline", 0) + 1
        return max(kernel.flops / peak / 1e6, kernel.bytes / bandwidth / 1e6) + LAUNCH_MS.get(self.target.kind, 0.005)

    def _calibrated(self, kernel: Kernel) -> float:
        if not self.measure or self.device:  # calibrations are of this host's TIR and PyTorch
            return self._roofline(kernel)
        overhead, gbs = self._calibration(kernel.op)
        self.sources["calibrated"] = self.sources.get("calibrated", 0) + 1
        return overhead + kernel.bytes / gbs / 1e6

    def dispatch_overhead(self) -> float:
        """ms a kernel the compiled model dispatches to PyTorch costs beyond the kernel itself."""
        return self.timer.overheads().get("torch", 0.0) if self.timer is not None else 0.0

    def _calibration(self, entry: str) -> list[float]:
        if entry not in self.calibration:
            self.calibration.update(self.timer.calibrate())
            self._dirty = True
            self.save()
        return self.calibration[entry]


@functools.lru_cache(maxsize=1 << 16)
def corners(kernel: Kernel, reference: Kernel) -> tuple[tuple[float, Kernel], ...]:
    """The grid kernels `kernel` is interpolated from, with their weights (one, of weight 1,
    where every dimension is on the grid). Cached: a search asks for the same ones to measure and
    then to price."""
    steps = [_step(ref, step) for ref, step in zip(reference.dims, kernel.steps or (0,) * len(kernel.dims))]
    dims = [_stair(d, ref, step) for d, ref, step in zip(kernel.dims, reference.dims, steps)]
    axes = []
    for i, (d, ref) in enumerate(zip(dims, reference.dims)):
        if d == ref:
            continue
        points = grid(ref, steps[i])
        if d in points:
            continue
        lo = max(p for p in points if p < d) if any(p < d for p in points) else 0
        hi = min(p for p in points if p > d)
        axes.append((i, lo, hi, d))
    found = []
    for corner in itertools.product((0, 1), repeat=len(axes)):
        weight, point = 1.0, list(dims)
        for bit, (i, lo, hi, d) in zip(corner, axes):
            t = (d - lo) / (hi - lo)
            weight *= t if bit else 1 - t
            point[i] = hi if bit else lo
        if weight:
            found.append((weight, kernel.with_dims(tuple(point))))
    return tuple(found)


def _step(ref: int, lanes_step: int) -> int:
    """A dimension's staircase step: the vector lanes, or a power of two near a quarter of its
    unpruned size where that is finer (a 16-channel layer has a grid of 4, 8, 12 and 16)."""
    return min(lanes_step, 1 << max(0, (ref // 4).bit_length() - 1)) if lanes_step else 0


def _stair(d: int, ref: int, step: int) -> int:
    return min(ref, math.ceil(d / step) * step) if step and d != ref else d


def grid(ref: int, step: int) -> list[int]:
    """The measured sizes of a dimension whose unpruned size is `ref`."""
    points = {ref}
    for fraction in GRID:
        size = ref * fraction
        size = math.ceil(size / step) * step if step else math.ceil(size)
        if 0 < size <= ref:
            points.add(int(size))
    return sorted(points)


def fit_line(bytes_moved: list[float], ms: list[float]) -> tuple[float, float]:
    """Least-squares `ms = overhead + bytes / (GB/s * 1e6)` in relative error (small kernels
    matter as much as large ones); returns (overhead ms, GB/s)."""
    y = np.asarray(ms, dtype=float)
    slope, intercept = np.polyfit(np.asarray(bytes_moved, dtype=float), y, 1, w=1 / y)
    slope = max(float(slope), 1e-12)
    return max(float(intercept), 0.0), 1.0 / slope / 1e6
