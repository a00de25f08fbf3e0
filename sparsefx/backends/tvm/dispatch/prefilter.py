"""Dispatch pre-filter: build in TIR only the workloads where TIR could plausibly win.

Timing a workload on PyTorch costs milliseconds; building it in TIR costs an LLVM build plus
slow untuned runs (EfficientNet-B0's ~80 distinct convs took minutes). Default TIR schedules
reach a fairly stable GFLOP/s per op class on a target, so a workload whose PyTorch time already
beats `MARGIN` times the best TIR GFLOP/s measured for its class is decided 'torch' without a
TIR build. A class with fewer than `CALIBRATE` TIR measurements has no ceiling yet: its
workloads that PyTorch runs slowest (the likeliest TIR wins) are measured first to set it.
Workloads PyTorch runs in under `TINY_MS` are always built: their time is mostly PyTorch's
call-out, not throughput (EfficientNet's squeeze-excite convs on 1x1 maps: 4 us on PyTorch, 2-3
in TIR), and they neither set nor meet a ceiling; a tiny one left on PyTorch also keeps its
sigmoid from fusing with the conv, so the sigmoid fuses into the broadcast multiply after it and
runs once per pixel instead of once per channel (pruned EfficientNet-B0: 0.6 -> 2.7 ms).

sparsefx's compute-bound own kernels (`kernels.registry`: `OWN_FILTERED`) are filtered the same
way with a ceiling per kind (`ceilings`) and a smaller margin (`OWN_MARGIN`): where the kind's
ceiling is below PyTorch's, PyTorch is timed first and the own kernel built only
where PyTorch does not beat the kind's ceiling; where it is above, the own kernel is timed first and
PyTorch only where the own kernel does not beat PyTorch's ceiling (on an Intel Xeon with AMX, at two
threads, the blocked kernels ran ResNet-50's convs at a median 224 GFLOP/s, PyTorch at 198 at best).
PyTorch's ceiling for a conv is its best over the conv's `family` (the same window, stride and maps,
other channel counts: a pruned layer's variants) where PyTorch has run one: its best over all convs
came from the shapes it runs fastest, and small or odd ones never beat it. In a cold plan of
ResNet-50 (AMD EPYC Zen 4, 2 threads) PyTorch was timed beside 91 own-first convs, won none (its
time 1.15-28x the own kernel's, median 3.5x), and the family's ceiling would have left out 86.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from sparsefx.cost.kernel import CONV_GEOMETRY, Kernel

MARGIN = 2.0  # TIR's GFLOP/s varies with shape; only skip when PyTorch wins by more than this
# sparsefx's own kernels run closer to their best: in a cold plan of ResNet-50 (AMD EPYC, 2 threads), skipping
# them where PyTorch beat 1.25x their best GFLOP/s so far (after two measurements per kind) would have skipped
# 293 of 477 and no kernel they won (1.5x: 162; 2x: 1)
OWN_MARGIN = 1.25
# only the compute-bound kinds: a depthwise conv's GFLOP/s says little of what it can do (memory-bound, and
# its first timings in a process ran 1.7x slow: a ceiling of two such runs ruled out kernels that won), and a
# kind needs this many measurements before its ceiling rules anything out
OWN_FILTERED, OWN_CALIBRATE = ("winograd", "blocked", "pointwise", "direct"), 4
CALIBRATE = 2  # TIR measurements a class needs before its ceiling is trusted
TINY_MS = 0.05  # PyTorch time below which a workload is always built in TIR


@dataclass(frozen=True)
class Candidate:
    """What the filter needs of a workload: its key, op class, work and PyTorch time."""

    key: str
    op_class: str
    gflop: float
    torch_ms: float

    @property
    def torch_gflops(self) -> float:
        return self.gflop / self.torch_ms * 1e3


def op_class(kernel: Kernel) -> str:
    """Grouped/depthwise convs are memory-bound and schedule differently from dense ones."""
    if kernel.op == "conv2d":
        return "conv2d_grouped" if kernel.dims[1] > 1 else "conv2d"
    return kernel.op


def family(kernel: Kernel) -> str | None:
    """A conv's key without its channel counts (the variants pruning makes of one layer); None for other ops."""
    if kernel.op != "conv2d":
        return None
    n, groups, _, _, *maps = kernel.dims
    return f"{n},{groups},{','.join(map(str, maps))}|{','.join(map(str, kernel.attrs[:CONV_GEOMETRY]))}"


def gflop(kernel: Kernel) -> float:
    """GFLOPs of a conv or matmul; for a math op (`math_ops`) its output's element count, in billions."""
    return (kernel.flops or math.prod(kernel.dims)) / 1e9


def tir_ceilings(entries: Iterable[dict]) -> dict[str, tuple[float, int]]:
    """Per op class: the best TIR GFLOP/s measured so far and how many measurements back it."""
    best: dict[str, tuple[float, int]] = {}
    for entry in entries:
        if entry.get("tir_ms") is not None and "op_class" in entry and entry["torch_ms"] >= TINY_MS:
            _raise_ceiling(best, entry["op_class"], entry["gflop"] / entry["tir_ms"] * 1e3)
    return best


def ceilings(entries: Iterable[dict], kinds: Iterable[str]) -> dict[str, tuple[float, int]]:
    """Per kind (an own kernel's, or "torch" for PyTorch's): the best GFLOP/s it has run at (entries'
    `<kind>_ms`, as the dispatch table records them; PyTorch left out of a conv has no time) and how
    many measurements back it."""
    best: dict[str, tuple[float, int]] = {}
    for entry in entries:
        for kind in kinds:
            ms = entry.get(f"{kind}_ms")
            if ms and ms < math.inf and entry.get("torch_ms", 0.0) >= TINY_MS:
                _raise_ceiling(best, kind, entry["gflop"] / ms * 1e3)
    return best


def family_ceilings(entries: Iterable[dict]) -> dict[str, float]:
    """Per conv family (`family`): the best GFLOP/s PyTorch has run one of its convs at."""
    best: dict[str, float] = {}
    for entry in entries:
        ms = entry.get("torch_ms")
        if entry.get("family") and ms and ms < math.inf and ms >= TINY_MS:
            best[entry["family"]] = max(best.get(entry["family"], 0.0), entry["gflop"] / ms * 1e3)
    return best


def _raise_ceiling(best: dict[str, tuple[float, int]], key: str, gflops: float) -> None:
    """One more measurement of `key`: its ceiling the higher of the two, its count one more."""
    top, count = best.get(key, (0.0, 0))
    best[key] = (max(top, gflops), count + 1)


def calibration(candidates: list[Candidate], entries: Iterable[dict]) -> list[Candidate]:
    """For each class short of `CALIBRATE` measurements, its candidates PyTorch runs slowest."""
    ceilings = tir_ceilings(entries)
    picked = []
    for cls in sorted({c.op_class for c in candidates}):
        missing = CALIBRATE - ceilings.get(cls, (0.0, 0))[1]
        if missing > 0:
            ranked = sorted((c for c in candidates if c.op_class == cls and c.torch_ms >= TINY_MS),
                            key=lambda c: c.torch_gflops)
            picked += ranked[:missing]
    return picked


def skip(candidate: Candidate, ceilings: dict[str, tuple[float, int]], margin: float = MARGIN) -> float | None:
    """The ceiling (GFLOP/s) that rules the candidate out, or None when it must be built."""
    ceiling, count = ceilings.get(candidate.op_class, (0.0, 0))
    if count < CALIBRATE or candidate.torch_ms < TINY_MS or candidate.torch_gflops <= margin * ceiling:
        return None
    return ceiling
