"""Hardware cost model: the latency of one kernel at one shape on one target.

Sources, best first:
- measured: convolutions and matmuls are timed on the kernels the compiled model runs on
  this CPU (PyTorch's, which the dispatch picks for nearly every workload: a conv plain or
  on oneDNN with its weight prepacked, whichever is faster), at the
  exact shape or at points of a per-dimension grid, and interpolated between them;
- calibrated: element-wise, reduction and pooling kernels run as fused TIR; their cost is
  `overhead + bytes / bandwidth`, both fitted per kernel class from TVM builds on the target;
- roofline: FLOPs against the target's peak and bytes against its bandwidth, where nothing
  can be measured (CUDA targets on this host, `measure=False`).

Latency is a staircase in the channel count (SIMD width, blocked layouts): a channel-like
dimension is first rounded up to the target's vector lanes, then looked up. Measurements
are cached on disk per target (`cache_dir()/costmodel/<arch>-<cores>.json`).
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .target import Target, cache_dir, resolve_target, with_measured_peaks

MEASURED = ("conv2d", "matmul")
CALIBRATED = ("elementwise", "reduce", "pool")
GRID = (1 / 8, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4, 7 / 8, 1.0)
LAUNCH_MS = {"llvm": 0.004, "cuda": 0.005}  # roofline per-kernel overhead where not calibrated
ROOFLINE_EFFICIENCY = 0.5  # what a tuned kernel reaches of the peak, for unmeasured targets
EPILOGUE_ACTIVATIONS = ("none", "relu", "relu6", "silu")  # codes in Kernel attrs and dispatched convs' calls
TABLE_VERSION = 5  # bumped when what a measurement times changes; older tables are re-measured


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


@functools.cache
def _scratch() -> torch.Tensor:
    """Written before each timed run. Inside a model the caches hold other layers' activations and
    weights (dirty lines among them), so a kernel finds little of its own data there; rewriting
    half the last-level cache reproduces that (ResNet-18/50, MobileNetV2 and BERT-base at one
    thread: end to end median 8% off, where the L2 only left them 13-35% low). How much of it a
    model really evicts grows with its footprint: three quarters fitted the dense MobileNetV2 (1%)
    but over-predicted the pruned models by up to 60%. Made on first use, not at import."""
    units = {"K": 1 << 10, "M": 1 << 20}
    sizes = [int(text.rstrip("KM")) * units.get(text[-1], 1)
             for text in (f.read_text().strip() for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"))]
    return torch.zeros(max(sizes, default=32 << 20) // 8)  # float32: half the last-level cache (32 MiB if unknown)


def _time_ms(run: Callable[[], object], repeat: int = 15, budget_s: float = 0.25) -> float:
    """Fastest run in ms: on a shared CPU the minimum is what the kernel can do. Half the
    last-level cache is rewritten before each run (see `_scratch`)."""
    run()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < 3 or (len(times) < repeat and time.perf_counter() - started < budget_s):
        _scratch().add_(1.0)
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def time_kernel(kernel: Kernel) -> float:
    """Fastest ms of the PyTorch kernel a dispatched op runs: a conv with its bias, plain or on
    oneDNN with the weight prepacked, whichever is faster (the dispatch makes the same choice)."""
    if kernel.op == "conv2d":
        from .backends.tvm.torch_kernels import conv_time

        n, g, ci, co, oh, ow, ih, iw = kernel.dims
        kh, kw, sh, sw, ph, pw, dh, dw, *epilogue = kernel.attrs
        act, residual = epilogue or (0, 0)
        x, w, b = torch.randn(n, g * ci, ih, iw), torch.randn(g * co, ci, kh, kw), torch.randn(g * co)
        add = torch.randn(n, g * co, oh, ow) if residual else None  # BN folds into the bias
        return conv_time(x, w, b, (sh, sw, ph, pw, dh, dw, g), _time_ms, EPILOGUE_ACTIVATIONS[act], add)[0]
    b, m, k, n = kernel.dims
    a, w = (torch.randn(m, k), torch.randn(k, n)) if b == 1 else (torch.randn(b, m, k), torch.randn(b, k, n))
    return _time_ms(lambda: torch.matmul(a, w))


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

    def __init__(self, target: object = "cpu", measure: bool = True, path: Path | None = None) -> None:
        self.target: Target = resolve_target(target)
        self.measure = measure and not self.target.is_gpu
        self.lanes = max(1, (self.target.vector_bits or 128) // 32) if not self.target.is_gpu else 8
        self.path = path or cache_dir() / "costmodel" / f"{self.target.arch}-{self.target.cores}.json"
        data = json.loads(self.path.read_text()) if self.path.exists() else {}
        data = data if data.get("version") == TABLE_VERSION else {}
        self.table: dict[str, float] = data.get("kernels", {})
        self.calibration: dict[str, list[float]] = data.get("calibration", {})
        self.sources: dict[str, int] = {}
        self._dirty = False
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

    def save(self) -> None:
        if not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"version": TABLE_VERSION, "target": self.target.as_dict(), "calibration": self.calibration,
                                   "kernels": self.table}, indent=0))
        tmp.replace(self.path)
        self._dirty = False

    def measured(self, kernel: Kernel) -> float:
        """Time `kernel` at exactly its shape (cached)."""
        key = kernel.key
        if key not in self.table:
            with _threads(self.target.cores), torch.inference_mode():
                self.table[key] = time_kernel(kernel) + self.dispatch_overhead()
            self._dirty = True
            if self.progress:
                self.progress(1)
        self.sources["measured"] = self.sources.get("measured", 0) + 1
        return self.table[key]

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
        total = 0.0
        for corner in itertools.product((0, 1), repeat=len(axes)):
            weight, point = 1.0, list(dims)
            for bit, (i, lo, hi, d) in zip(corner, axes):
                t = (d - lo) / (hi - lo)
                weight *= t if bit else 1 - t
                point[i] = hi if bit else lo
            if weight == 0:
                continue
            # A zero-sized corner (below the smallest grid point) costs the call overhead only.
            total += weight * (self.measured(kernel.with_dims(tuple(point))) if min(point) > 0
                               else self.dispatch_overhead())
        self.sources["interpolated"] = self.sources.get("interpolated", 0) + 1
        return total

    @staticmethod
    def _stair(d: int, ref: int, step: int) -> int:
        return min(ref, math.ceil(d / step) * step) if step and d != ref else d

    def _roofline(self, kernel: Kernel) -> float:
        if self.target.kind == "llvm" and not self.target.peak_gflops:
            self.target = with_measured_peaks(self.target)  # measured once per host, only when needed
        peak = (self.target.peak_gflops or 100.0) * ROOFLINE_EFFICIENCY
        bandwidth = self.target.bandwidth_gbs or 20.0
        self.sources["roofline"] = self.sources.get("roofline", 0) + 1
        return max(kernel.flops / peak / 1e6, kernel.bytes / bandwidth / 1e6) + LAUNCH_MS.get(self.target.kind, 0.005)

    def _calibrated(self, kernel: Kernel) -> float:
        if not self.measure:
            return self._roofline(kernel)
        overhead, gbs = self._fit(kernel.op)
        self.sources["calibrated"] = self.sources.get("calibrated", 0) + 1
        return overhead + kernel.bytes / gbs / 1e6

    def dispatch_overhead(self) -> float:
        """ms a kernel the compiled model dispatches to PyTorch costs beyond the kernel itself."""
        return self._calibration("dispatch")[0]

    def _fit(self, op: str) -> tuple[float, float]:
        overhead, gbs = self._calibration(op)
        return overhead, gbs

    def _calibration(self, entry: str) -> list[float]:
        if entry not in self.calibration:
            from .backends.tvm.calibrate import calibrate

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
