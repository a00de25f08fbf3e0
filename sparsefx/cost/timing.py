"""One way to time kernels and one way to pick the implementation that runs them.

A backend implements `Timer` (the TVM backend: `backends/tvm/measure`); the cost model and the
backend's compiler both call it and both decide with `choose`, so the planner prices exactly the
implementation the compiler will run. The cost model never imports a backend: whoever builds it
passes the timer in.

How a kernel is timed (`time_in_turn`): every implementation of one kernel runs in turn, round
after round, each on a weight cycled through distinct copies (`weight_copies`), and the fastest
run of each counts. Inside a model a layer's input was just written by its producer but its
weight was last read one inference ago, with the whole model's data in between: from memory,
not cache. Cycling copies reproduces that and leaves the code of the call path warm, as it is in
a model. Each copy is timed once, so only as many copies as rounds exist; after the warm-up
(each copy's first run, which prepacks it) as much other data streams through the caches as a
span of 256 copies (at most `COLD_BYTES`) before the timed rounds (`cold_traffic`). Running the
kernel on all 256 copies did the same and took 90% of a plan's measuring time: ResNet-50's convs
took 0.4-1.7 s each to warm up against 0.02-0.05 s for their timed rounds. (Flushing the caches
before each run evicted that code too: on an Intel Xeon VM a 1x1 conv on a 4x4 input took 5 us
hot and 67 us after the flush, and MobileNetV2 pruned to half its
channels was predicted 37% slow. Timed hot, PyTorch's convs looked 2-3x faster than they ran in
the model and won near-ties they lose there.) Timing the rivals in turn keeps a drift of a
shared host's speed out of the comparison; on a shared CPU the minimum is what a kernel can do.
"""

from __future__ import annotations

import functools
import math
import os
import statistics
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Protocol

import torch

from sparsefx.cost.kernel import Kernel

Times = dict[str, float]  # implementation name -> ms of one run
COLD_BYTES = 256 << 20  # what a weight's timed copies span (see `weight_copies`)
ROUNDS = (5, 15)  # rounds every implementation gets at least, and at most within `BUDGET_S`
BUDGET_S = 0.25
ALIGN = 16  # float32s in 64 bytes, the alignment TVM's kernels assume of their arguments


class Timer(Protocol):
    """Times kernels on one device as a compiled model runs them.

    `device`: "" for this host; otherwise the device's name (the cost model keeps its table apart,
    and calibrates nothing there). `free_epilogues`: implementation -> the activations it applies
    to a conv's output in the time of the conv without them (bias included); the cost model then
    prices the conv with that epilogue by the bare conv's time instead of timing it again."""

    device: str
    free_epilogues: Mapping[str, Collection[str]]

    def time(self, kernels: list[Kernel], implementations: Sequence[Sequence[str]] | None = None,
             ahead: Sequence[Kernel] = ()) -> list[Times]:
        """ms of each implementation that can run each kernel (only those in `implementations[i]`
        where given; an implementation that cannot run a kernel is left out of its Times). `ahead`:
        kernels a later call will likely time (a conv with its residual add, once its bare conv has
        been decided); a timer that builds kernels may build theirs with this call's."""
        ...

    def overheads(self) -> dict[str, float]:
        """ms an implementation costs the compiled model per call beyond what `time` measures
        (a call out of the VM); implementations not listed cost nothing more."""
        ...

    def calibrate(self) -> dict[str, list[float]]:
        """{kernel class: [overhead ms, GB/s]} for element-wise, reduce and pool kernels."""
        ...


def charged(times: Times, overheads: Mapping[str, float]) -> Times:
    """What each implementation costs the model: its time plus its call overhead."""
    return {impl: ms + overheads.get(impl, 0.0) for impl, ms in times.items()}


def choose(times: Times, overheads: Mapping[str, float]) -> str:
    """The implementation that runs a kernel: the cheapest once call overheads are charged (on a
    tie, the one listed first). The dispatch and the cost model both decide here."""
    if not times:
        raise ValueError("no implementation was timed for this kernel")
    cost = charged(times, overheads)
    return min(cost, key=lambda impl: cost[impl])


def time_in_turn(rivals: Mapping[str, Sequence[Callable[[], object]]], rounds: tuple[int, int] = ROUNDS,
                 budget_s: float = BUDGET_S, between: Callable[[], object] | None = None,
                 stateless: Collection[str] = (), statistic: Callable[[list[float]], float] = min,
                 before: Mapping[str, Callable[[], object]] | None = None) -> Times:
    """ms of each rival (the `statistic` of its runs), its runs (one per weight copy) taken in turn
    with the other rivals' round after round, after a warm-up and then `between` (the traffic that makes the copies cold
    again, `cold_traffic`; see the module doc). The warm-up runs every run once, as a first run
    with a new weight makes what a rival keeps per weight (a prepacked copy); `stateless` rivals
    keep nothing per weight, and their first run alone warms the code (`between` evicts the data
    either way): a third of ResNet-50's planning time went to warm-ups. By default the fastest run
    counts: what the kernel can do on a shared CPU. `before`: rival -> an untimed call before each of
    its timed runs (what the model does between two of its calls, e.g. `release_freed_memory`)."""
    names = [name for name, runs in rivals.items() if runs]
    for name in names:
        for run in rivals[name][:1] if name in stateless else rivals[name]:
            run()
    if between is not None:
        between()
    samples: dict[str, list[float]] = {name: [] for name in names}
    started, done = time.perf_counter(), 0
    while done < rounds[0] or (done < rounds[1] and time.perf_counter() - started < budget_s):
        for name in names:
            runs = rivals[name]
            run = runs[done % len(runs)]
            if before and name in before:
                before[name]()
            t0 = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - t0)
        done += 1
    return {name: statistic(runs) * 1e3 for name, runs in samples.items()}


def _matmul_probe() -> Callable[[], object]:
    a, b, out = torch.randn(3136, 576), torch.randn(576, 64), torch.empty(3136, 64)
    return functools.partial(torch.mm, a, b, out=out)


def _add_probe() -> Callable[[], object]:
    n, gap = 1 << 20, 256  # operands apart by a 1 KB stagger: their offsets mod 4 KB fixed, not the allocator's
    pool = torch.randn(3 * (n + gap))
    a, b, out = (pool[i * (n + gap):i * (n + gap) + n] for i in range(3))
    return functools.partial(torch.add, a, b, out=out)


# Drift probes (`CostModel.drift`): name -> (its shapes, what makes its run). Both write into buffers made
# once (`out=`): PyTorch's conv allocates its output each call, and whether that memory came back from
# the allocator or was faulted in afresh depended on what the process had run before. A depthwise conv
# probe took 0.33 ms in a fresh process and 0.41 after 20 calls of a compiled ResNet-18 in the same one
# (1.2 with glibc's mmap threshold at 64 KB): it warned of drift 10 times in one quiet planner run.
PROBES: dict[str, tuple[str, Callable[[], Callable[[], object]]]] = {
    "matmul": ("3136x576 @ 576x64", _matmul_probe),  # compute-bound: a 64 -> 64 3x3 conv at 56x56 as a matmul
    "memory add": ("3 x 1M floats", _add_probe),  # memory-bound: two 4 MB operands and a 4 MB result, past L2
}
WARM_PROBE_RUNS = 5  # a process's first matmul ran 1.4x slower with one warm-up run (MKL's first calls)


def probe_ms(name: str, threads: int) -> float:
    """Median ms of the drift probe `name` (`PROBES`) at `threads` threads (put back after), over
    `ROUNDS[1]` runs after a warm-up. The median, not the fastest run, so that a neighbour taking the
    CPU shows (with one memory-streaming process per core, the fastest of 15 runs moved 5-15%, inside
    the drift tolerance)."""
    run = PROBES[name][1]()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            for _ in range(WARM_PROBE_RUNS):
                run()
            return time_in_turn({"probe": [run]}, rounds=(ROUNDS[1], ROUNDS[1]), statistic=statistics.median)["probe"]
    finally:
        torch.set_num_threads(before)


@functools.cache
def _pool() -> torch.Tensor:
    """Random float32s that timed weights are cut from (made on first use, not at import)."""
    return torch.randn(COLD_BYTES // 4)


def weight_copies(shape: tuple[int, ...]) -> list[torch.Tensor]:
    """Distinct random weights of `shape` for a timing to take in turn: one per round it can run
    (`ROUNDS[1]`), fewer where they would not fit in `COLD_BYTES` (at least two), cut from the
    start of the pool (see `cold_traffic`), each 64-byte aligned so a TVM kernel can take it as
    it is (`tvm.runtime.from_dlpack`; copying 15 copies of a 512x512x3x3 weight took 70 ms)."""
    size, stride, count = math.prod(shape), _stride(shape), copy_count(shape)
    if stride * count > _pool().numel():
        return [torch.randn(shape) for _ in range(count)]
    return [_pool()[i * stride:i * stride + size].view(shape) for i in range(count)]


def _stride(shape: tuple[int, ...]) -> int:
    """Pool elements from one copy's start to the next: its size rounded up to 64 bytes."""
    return -(-math.prod(shape) // ALIGN) * ALIGN


def copy_count(shape: tuple[int, ...]) -> int:
    """How many weight copies of `shape` a timing takes in turn (`weight_copies`)."""
    return min(ROUNDS[1], max(2, COLD_BYTES // 4 // max(_stride(shape), 1)))


def cold_traffic(shape: tuple[int, ...], copies: int | None = None) -> Callable[[], None]:
    """A run that reads as much of the pool, past the `copies` weights of `shape` cut from its start
    (`weight_copies`'s), as 256 copies would span (at most `COLD_BYTES`): between the warm-up and
    the timed rounds it puts through the caches what the rest of a model would, so each copy is
    read as a layer's weight is, one inference after its last use."""
    size, stride = math.prod(shape), _stride(shape)
    count = copy_count(shape) if copies is None else copies  # counted, not made: big weights are fresh tensors
    start = min(stride * count, _pool().numel())
    end = min(_pool().numel(), start + max(0, min(256 * size, COLD_BYTES // 4) - size * count))
    return functools.partial(_read, start, end)


def _read(start: int, end: int) -> None:
    if end > start:
        _pool()[start:end].sum()


def neighbours_cores(window_s: float = 0.15) -> float | None:
    """How many cores other processes kept busy over `window_s` while this one slept: the host's busy
    time in /proc/stat over the window, less this process's, over the window (None where /proc/stat
    cannot be read). The drift probes alone missed a neighbour: with one memory-streaming process per
    core they moved 0-3x from one plan to the next, their sub-millisecond runs fitting between the
    scheduler's slices; the CPU share the neighbours take is asked directly."""
    def busy_ticks() -> int:
        with open("/proc/stat") as stat:
            user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in stat.readline().split()[1:8])
        return user + nice + system + irq + softirq

    try:
        before, own_before, started = busy_ticks(), sum(os.times()[:2]), time.perf_counter()
        time.sleep(window_s)
        ticks, own = busy_ticks() - before, sum(os.times()[:2]) - own_before
        wall = time.perf_counter() - started
    except (OSError, ValueError):
        return None
    return max(0.0, ticks / os.sysconf("SC_CLK_TCK") - own) / wall
