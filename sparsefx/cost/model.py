"""Hardware cost model: the latency of one kernel at one shape on one target.

Sources, best first:
- measured: convolutions and matmuls are timed on the kernels the compiled model runs on
  this CPU (PyTorch's, which the dispatch picks for nearly every workload: a conv plain or
  on oneDNN with its weight prepacked, whichever is faster; for a depthwise or 1x1 conv also
  sparsefx's TIR kernel, and the faster counts), at the
  exact shape or at points of a per-dimension grid, and interpolated between them;
- calibrated: element-wise, reduction and pooling kernels run as fused TIR; their cost is
  `overhead + bytes / bandwidth`, both fitted per kernel class from TVM builds on the target;
- roofline: FLOPs against the target's peak and bytes against its bandwidth, where nothing
  can be measured (CUDA targets on this host, `measure=False`).

Measured kernels run as a layer inside a model does: on a weight from memory (copies cycled, see
`weight_copies`), writing an output buffer out of cache (`CostModel.output_ms`), with the code of
the call path warm.

Latency is a staircase in the channel count (SIMD width, blocked layouts): a channel-like
dimension is first rounded up to the target's vector lanes, then looked up. Measurements
are cached on disk per target (`cache_dir()/costmodel/<arch>-<cores>.json`, calibrations beside it).
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sparsefx.cache import Table, cache_dir
from sparsefx.target import Target, resolve_target, with_measured_peaks

MEASURED = ("conv2d", "matmul")
CALIBRATED = ("elementwise", "reduce", "pool")
GRID = (1 / 8, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4, 7 / 8, 1.0)
LAUNCH_MS = {"llvm": 0.004, "cuda": 0.005}  # roofline per-kernel overhead where not calibrated
ROOFLINE_EFFICIENCY = 0.5  # what a tuned kernel reaches of the peak, for unmeasured targets
EPILOGUE_ACTIVATIONS = ("none", "relu", "relu6", "silu")  # codes in Kernel attrs and dispatched convs' calls
TABLE_VERSION = 9  # bumped when what a measurement times changes; older tables are re-measured (v9: stride-2 phase planes by shuffles)
CALIBRATION_VERSION = 2  # v2: reductions also timed on PyTorch (dispatched softmax); older ones re-fitted


@dataclass(frozen=True)
class Kernel:
    """One kernel launch. `dims` are the sizes the latency depends on; `steps[i]` > 0 marks
    dimension i as channel-like (rounded up to a multiple of steps[i]), 0 as exact."""

    op: str
    dims: tuple[int, ...]
    attrs: tuple[int, ...] = ()
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
        return 0.0

    @property
    def bytes(self) -> float:
        if self.op in CALIBRATED:
            return float(self.dims[0])
        if self.op == "conv2d":
            n, g, ci, co, oh, ow, ih, iw = self.dims
            kh, kw = self.attrs[:2]
            return 4.0 * (n * g * ci * ih * iw + g * co * ci * kh * kw + n * g * co * oh * ow)
        b, m, k, n = self.dims
        return 4.0 * b * (m * k + k * n + m * n)

    def with_dims(self, dims: tuple[int, ...]) -> Kernel:
        return Kernel(self.op, tuple(dims), self.attrs, self.steps)

    def with_epilogue(self, activation: str, residual: bool) -> Kernel:
        """A conv that also applies `activation` (one of `EPILOGUE_ACTIVATIONS`) and adds a
        residual, as the compiled model runs it: a oneDNN post-op or one more pass over the output."""
        code = EPILOGUE_ACTIVATIONS.index(activation)
        return Kernel(self.op, self.dims, (*self.attrs[:8], code, int(residual)), self.steps)


def conv2d_kernel(x: tuple[int, ...], out: tuple[int, ...], groups: int, kernel: tuple[int, int],
                  stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int], lanes: int) -> Kernel:
    """A conv2d from its input and output shapes (NCHW); depthwise convs vary in `groups`."""
    n, cin, ih, iw = x
    _, cout, oh, ow = out
    ci, co = cin // groups, cout // groups
    steps = (lanes if ci == 1 else 0, 0 if ci == 1 else lanes, 0 if ci == 1 else lanes, 0, 0, 0, 0, 0)
    return Kernel("conv2d", (n, groups, ci, co, oh, ow, ih, iw), (*kernel, *stride, *padding, *dilation), steps)


def matmul_kernel(batch: int, m: int, k: int, n: int, lanes: int) -> Kernel:
    return Kernel("matmul", (batch, m, k, n), (), (0, 0, lanes, lanes))


COLD_BYTES = 256 << 20  # what a weight's timed copies span (see `weight_copies`)


@functools.cache
def _pool() -> torch.Tensor:
    """Random float32s that timed weights are cut from (made on first use, not at import)."""
    return torch.randn(COLD_BYTES // 4)


def weight_copies(shape: tuple[int, ...], limit: int = 256) -> list[torch.Tensor]:
    """Distinct random weights of `shape`, as many as fit in `COLD_BYTES` (at least two), which a
    timing cycles through (see `_time_ms`). Inside a model a layer's input was just written by its
    producer, but its weight was last read one inference ago, with the whole model's data in
    between: from memory, not cache. Cycling through copies reproduces that and leaves the code
    of the call path warm, as it is in a model. Rewriting half the last-level cache before each
    run, as this did before, evicted that code too: on an Intel Xeon VM a 1x1 conv on a 4x4
    input took 5 us hot and 67 us after the write, and MobileNetV2 pruned to half its channels
    was predicted 37% slow."""
    size = math.prod(shape)
    count = min(limit, max(2, COLD_BYTES // 4 // max(size, 1)))
    if size * count > _pool().numel():
        return [torch.randn(shape) for _ in range(count)]
    return [_pool()[i * size:(i + 1) * size].view(shape) for i in range(count)]


def _time_ms(runs: list[Callable[[], object]], repeat: int = 15, budget_s: float = 0.25) -> float:
    """Fastest run in ms, taking `runs` (the same kernel on different copies of its weight) in
    turn after running each once: on a shared CPU the minimum is what the kernel can do."""
    for run in runs:
        run()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < 3 or (len(times) < repeat and time.perf_counter() - started < budget_s):
        run = runs[len(times) % len(runs)]
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


@functools.cache
def l2_bytes() -> int:
    """This CPU's per-core L2 cache (1 MiB where /sys does not say)."""
    units = {"K": 1 << 10, "M": 1 << 20}
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        if (index / "level").read_text().strip() == "2":
            text = (index / "size").read_text().strip()
            return int(text.rstrip("KM")) * units.get(text[-1], 1)
    return 1 << 20


def cold_write_gbs() -> float:
    """GB/s of writing memory last written long ago (a 256 MiB region, 1 MiB at a time)."""
    region, chunk = torch.zeros(COLD_BYTES // 4), (1 << 20) // 4
    chunks = region.split(chunk)
    ms = _time_ms([lambda part=part: part.fill_(1.0) for part in chunks], repeat=30)
    return chunk * 4 / ms / 1e6


def _conv_workload(kernel: Kernel) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...], str, bool]:
    """A conv kernel as the dispatch sees it: attrs (strides, padding, dilation, groups), shapes
    (input, weight, output), its epilogue activation and whether it adds a residual."""
    n, g, ci, co, oh, ow, ih, iw = kernel.dims
    kh, kw, sh, sw, ph, pw, dh, dw, *epilogue = kernel.attrs
    act, residual = epilogue or (0, 0)
    shapes = ((n, g * ci, ih, iw), (g * co, ci, kh, kw), (n, g * co, oh, ow))
    return (sh, sw, ph, pw, dh, dw, g), shapes, EPILOGUE_ACTIVATIONS[act], bool(residual)


def time_kernel(kernel: Kernel) -> float:
    """Fastest ms of the PyTorch kernel a dispatched op runs: a conv with its bias, plain or on
    oneDNN with the weight prepacked, whichever is faster (the dispatch makes the same choice)."""
    if kernel.op == "conv2d":
        from sparsefx.backends.tvm.dispatch.torch_kernels import conv_time

        attrs, (x_shape, w_shape, out_shape), act, residual = _conv_workload(kernel)
        x, b = torch.randn(x_shape), torch.randn(w_shape[0])
        add = torch.randn(out_shape) if residual else None  # BN folds into the bias
        return conv_time(x, weight_copies(w_shape), b, attrs, _time_ms, act, add)[0]
    b, m, k, n = kernel.dims
    if b > 1:  # attention's batched matmuls multiply two activations, both just written
        x, y = torch.randn(b, m, k), torch.randn(b, k, n)
        return _time_ms([lambda: torch.matmul(x, y)])
    x = torch.randn(m, k)
    return _time_ms([lambda w=w: torch.matmul(x, w) for w in weight_copies((k, n))])


def own_kernel_spec(kernel: Kernel) -> tuple[str, object] | None:
    """(kind, spec) of the sparsefx TIR kernel (`own_kernels`) that can run this conv with its
    bias, activation and residual fused, else None."""
    if kernel.op != "conv2d":
        return None
    from sparsefx.backends.tvm.kernels import registry as own_kernels

    attrs, shapes, act, residual = _conv_workload(kernel)
    kind = own_kernels.kind_of(attrs, shapes)
    if kind is None:
        return None
    module = own_kernels.KERNELS[kind]
    if residual and not module.FUSES_RESIDUAL:
        return None  # the residual add would be a kernel of its own: PyTorch's fused one is priced
    return kind, module.spec_of(attrs, shapes, act, residual=True) if residual else module.spec_of(attrs, shapes, act)


def time_own_kernels(kind: str, specs: list, target: Target) -> list[float]:
    """Fastest ms of sparsefx's TIR kernels for `specs` (all of one `kind`, one LLVM build: a build
    costs 0.1-0.3 s, more than the timing), each weight (the second argument) cycled through copies
    as for PyTorch's kernels."""
    import tvm

    from sparsefx.backends.tvm.kernels import registry as own_kernels

    library = own_kernels.build(kind, specs, target.to_tvm())
    times = []
    for spec in specs:
        run = library[spec.name]  # looked up once: lookups cost 10-80 us
        args = [tvm.runtime.tensor(np.random.randn(*shape).astype("float32")) for shape in spec.arg_shapes]
        weights = [tvm.runtime.tensor(w.numpy()) for w in weight_copies(spec.arg_shapes[1])]
        times.append(_time_ms([lambda w=w, run=run, args=args: run(args[0], w, *args[2:]) for w in weights]))
    return times


@contextmanager
def _threads(count: int) -> Iterator[None]:
    saved = torch.get_num_threads()
    torch.set_num_threads(max(1, count))
    try:
        yield
    finally:
        torch.set_num_threads(saved)


class CostModel:
    """Predicted latency (ms) of kernels on `target`, from measurements where it can."""

    def __init__(self, target: object = "cpu", measure: bool = True, path: Path | None = None,
                 rpc: tuple[str, str] | None = None) -> None:
        """`rpc=("HOST:PORT", key)` times conv/matmul kernels on the device a TVM RPC tracker serves
        under `key` (pure TIR, as a `dispatch=False` build runs there; other kernels: roofline of
        `target`'s declared peaks), in a table of its own."""
        self.target: Target = resolve_target(target)
        self.remote = None
        if rpc is not None:
            from sparsefx.backends.tvm.measure.remote_kernels import RemoteKernels

            self.remote = RemoteKernels(*rpc, self.target)
        self.measure = measure and (self.remote is not None or not self.target.is_gpu)
        self.lanes = max(1, (self.target.vector_bits or 128) // 32) if not self.target.is_gpu else 8
        device = f"-rpc-{rpc[1]}" if rpc else ""
        self.path = path or cache_dir() / "costmodel" / f"{self.target.arch}-{self.target.cores}{device}.json"
        # calibrations are re-fitted when either version changes, kernels re-measured with TABLE_VERSION
        self.tables = (Table(self.path, TABLE_VERSION), Table(self.path.with_name(f"{self.path.stem}.calibration.json"),
                                                              f"{TABLE_VERSION}.{CALIBRATION_VERSION}"))
        self.table: dict[str, float] = self.tables[0].entries
        self.calibration: dict[str, list[float]] = self.tables[1].entries
        self.sources: dict[str, int] = {}
        self._dirty = False
        self._drift: list[tuple[str, float, float]] | None = None
        self.progress: Callable[[int], None] | None = None

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

    def drift(self) -> list[tuple[str, float, float]]:
        """(probe, ms in the table, ms now) for two probe kernels timed afresh: a dense 3x3 conv
        (compute-bound) and a depthwise one (memory-bound). On a shared host the same kernels run
        tens of percent faster or slower an hour later (tables measured while this VM's host was
        busier over-predicted MobileNetV2 by 32-53% in a quieter spell); a table whose probes
        moved no longer describes the machine. A probe missing from the table is measured into it.
        Timed once per CostModel: a planning run that plans several times asks again."""
        if self._drift is not None:
            return self._drift
        self._drift = []
        if not self.measure or self.remote is not None:
            return self._drift
        probes = {"3x3 conv": conv2d_kernel((1, 64, 56, 56), (1, 64, 56, 56), 1, (3, 3), (1, 1), (1, 1), (1, 1), self.lanes),
                  "depthwise conv": conv2d_kernel((1, 96, 56, 56), (1, 96, 56, 56), 96, (3, 3), (1, 1), (1, 1), (1, 1),
                                                  self.lanes)}
        for name, kernel in probes.items():
            then = self.table.get(kernel.key)
            now = self.measured(kernel) if then is None else self.time_now(kernel)
            self._drift.append((name, then or now, now))
        return self._drift

    def save(self) -> None:
        if not self._dirty:
            return
        for table in self.tables:
            table.save()
        self._dirty = False

    def measured(self, kernel: Kernel) -> float:
        """Time `kernel` at exactly its shape (cached)."""
        self.measure_all([kernel])
        self.sources["measured"] = self.sources.get("measured", 0) + 1
        return self.table[kernel.key]

    def measure_all(self, kernels: list[Kernel]) -> None:
        """Time those of `kernels` the table lacks, together (see `time_all`), into the table."""
        missing = list({k.key: k for k in kernels if k.key not in self.table}.values())
        for kernel, ms in zip(missing, self.time_all(missing), strict=True):
            self.table[kernel.key] = ms
            self._dirty = True
            if self.progress:
                self.progress(1)

    def time_now(self, kernel: Kernel) -> float:
        """ms of `kernel` as the compiled model runs it, timed now (uncached), see `time_all`."""
        return self.time_all([kernel])[0]

    def time_all(self, kernels: list[Kernel]) -> list[float]:
        """ms of each kernel as the compiled model runs it, timed now (uncached): PyTorch's kernel
        plus the call out of the VM, or sparsefx's own TIR kernel (depthwise, 1x1, k x k; one build
        per kind for all of `kernels`) plus a TIR call where that is faster; plus the cold output
        (see `output_ms`). On an RPC device: the TIR kernel timed there."""
        if self.remote is not None:
            return [self.remote.time(kernel) for kernel in kernels]
        with _threads(self.target.cores), torch.inference_mode():
            ms = [time_kernel(kernel) + self.dispatch_overhead() for kernel in kernels]
            own = {i: spec for i, kernel in enumerate(kernels) if (spec := own_kernel_spec(kernel)) is not None}
            for kind in {kind for kind, _ in own.values()}:
                picked = [i for i, (k, _) in own.items() if k == kind]
                times = time_own_kernels(kind, [own[i][1] for i in picked], self.target)
                for i, t in zip(picked, times, strict=True):
                    ms[i] = min(ms[i], t + self._calibration("elementwise")[0])
        return [m + self.output_ms(kernel) for m, kernel in zip(ms, kernels, strict=True)]

    def output_ms(self, kernel: Kernel) -> float:
        """What writing the output costs in a model beyond a timing loop: the loop's output lands
        in the buffer the previous run freed, still in L2, where a model's layer writes a buffer
        last written an inference ago. The part of the output the L2 would hold is charged at the
        calibrated cold-write bandwidth. MobileNetV2's 1x1 conv from 32 to 192 channels at 28x28:
        0.10 ms in the loop, 0.16-0.25 ms in the model (Intel Xeon VM, one thread)."""
        d = kernel.dims  # conv: n, groups, ci, co, oh, ow, ...; matmul: batch, m, k, n
        elements = d[0] * d[1] * d[3] * d[4] * d[5] if kernel.op == "conv2d" else d[0] * d[1] * d[3]
        return min(4 * elements, l2_bytes()) / self._calibration("cold_write")[0] / 1e6

    # --- sources ------------------------------------------------------------------------
    def _interpolated(self, kernel: Kernel, reference: Kernel) -> float:
        """Multilinear interpolation over grid points of each dimension that differs from the
        reference, after rounding channel-like dimensions up to the vector width."""
        steps = kernel.steps or (0,) * len(kernel.dims)
        dims = [self._stair(d, ref, step) for d, ref, step in zip(kernel.dims, reference.dims, steps)]
        axes = []
        for i, (d, ref) in enumerate(zip(dims, reference.dims)):
            if d == ref:
                continue
            points = _grid(ref, steps[i])
            if d in points:
                continue
            lo = max(p for p in points if p < d) if any(p < d for p in points) else 0
            hi = min(p for p in points if p > d)
            axes.append((i, lo, hi, d))
        if not axes:
            return self.measured(kernel.with_dims(tuple(dims)))
        corners = []
        for corner in itertools.product((0, 1), repeat=len(axes)):
            weight, point = 1.0, list(dims)
            for bit, (i, lo, hi, d) in zip(corner, axes):
                t = (d - lo) / (hi - lo)
                weight *= t if bit else 1 - t
                point[i] = hi if bit else lo
            if weight:
                corners.append((weight, kernel.with_dims(tuple(point))))
        self.measure_all([k for _, k in corners if min(k.dims) > 0])  # the corners' own kernels in one build
        # A zero-sized corner (below the smallest grid point) costs the call overhead only.
        total = sum(weight * (self.measured(k) if min(k.dims) > 0 else self.dispatch_overhead()) for weight, k in corners)
        self.sources["interpolated"] = self.sources.get("interpolated", 0) + 1
        return total

    @staticmethod
    def _stair(d: int, ref: int, step: int) -> int:
        return min(ref, math.ceil(d / step) * step) if step and d != ref else d

    def _roofline(self, kernel: Kernel) -> float:
        if self.target.kind == "llvm" and not self.target.peak_gflops and self.remote is None:
            self.target = with_measured_peaks(self.target)  # measured once per host, only when needed
        peak = (self.target.peak_gflops or 100.0) * ROOFLINE_EFFICIENCY
        bandwidth = self.target.bandwidth_gbs or 20.0
        self.sources["roofline"] = self.sources.get("roofline", 0) + 1
        return max(kernel.flops / peak / 1e6, kernel.bytes / bandwidth / 1e6) + LAUNCH_MS.get(self.target.kind, 0.005)

    def _calibrated(self, kernel: Kernel) -> float:
        if not self.measure or self.remote is not None:  # calibrations are of this host's TIR and PyTorch
            return self._roofline(kernel)
        overhead, gbs = self._calibration(kernel.op)
        self.sources["calibrated"] = self.sources.get("calibrated", 0) + 1
        return overhead + kernel.bytes / gbs / 1e6

    def dispatch_overhead(self) -> float:
        """ms a kernel the compiled model dispatches to PyTorch costs beyond the kernel itself."""
        return self._calibration("dispatch")[0]

    def _calibration(self, entry: str) -> list[float]:
        if entry not in self.calibration:
            from sparsefx.backends.tvm.measure.calibrate import calibrate

            self.calibration.update(calibrate(self.target))
            self._dirty = True
            self.save()
        return self.calibration[entry]


def _grid(ref: int, step: int) -> list[int]:
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
