"""Planning to a speedup or latency as measured on the target, not as predicted.

The cost model prices each kernel alone; inside a compiled model the kernels run slower, since
the other layers have taken the caches, and the small kernels of a pruned model more so than
the large ones of the dense one (pruned ResNet-50: 1.4x its kernels' isolated sum, dense:
1.1x; Intel Xeon VM, one thread). So a plan predicted at 1.5x can measure 1.75x. Here the
cost model still chooses *what* to prune; measurement corrects *how far*: the dense model and
each plan are compiled with TVM and timed side by side, and the model is re-planned at the
predicted speedup that should measure as asked (see `_next_goal`), until the measured speedup is
within `tolerance` of the asked one or `rounds` plans have been tried (the closest one is returned).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import nn

from sparsefx.backends.eager import measure_latencies
from sparsefx.capture.trace import as_inputs
from sparsefx.errors import SparsefxError
from sparsefx.log import get_logger
from sparsefx.planning.plan import Plan
from sparsefx.planning.planner import apply, plan
from sparsefx.planning.pricing import cost_model
from sparsefx.target import Target, resolve_target, with_precision

LOG = get_logger("planning")
Measure = Callable[[nn.Module, nn.Module, tuple, Target], tuple[float, float]]


class MeasurePair:
    """Median ms of the dense and the pruned model compiled with TVM, timed in alternating rounds.
    The dense build is made on the first call and timed again beside every later plan (one
    instance serves one planning run, whose dense model does not change)."""

    def __init__(self) -> None:
        self._dense = None

    def __call__(self, dense: nn.Module, pruned: nn.Module, inputs: tuple, target: Target) -> tuple[float, float]:
        from sparsefx.backends.tvm import compile  # TVM loads on first use only

        self._dense = self._dense or compile(dense, inputs, target=target, verbose=False)
        ms = measure_latencies({"dense": self._dense, "pruned": compile(pruned, inputs, target=target, verbose=False)},
                               inputs, repeat=30, rounds=6)
        return ms["dense"], ms["pruned"]


def plan_measured(model: nn.Module, example_inputs: object, target: object = "cpu", speedup: float | None = None,
                  latency_ms: float | None = None, rounds: int = 3, tolerance: float = 0.05, verbose: bool = True,
                  measure: Measure | None = None, **plan_options: object) -> Plan:
    """`sparsefx.plan` to a `speedup` or `latency_ms` that the compiled model reaches when timed on
    this host (see the module doc; `measure` defaults to a `MeasurePair`). Other keyword arguments
    go to `sparsefx.plan`. The returned plan records every round under `measured`."""
    target = resolve_target(target)
    if plan_options.get("precision"):  # the plans priced and the models timed at it
        target = with_precision(target, plan_options.pop("precision"))
    if target.is_gpu:
        raise SparsefxError(f"measured planning times models on this host's CPU, not on {target.name}; "
                            "plan from the cost model alone (sparsefx.plan, or rounds=1 on the command line)")
    if (speedup is None) == (latency_ms is None):
        raise SparsefxError("measured planning needs one budget, speedup=... or latency_ms=... "
                            "(a macs_ratio is exact without measuring: use sparsefx.plan)")
    if rounds < 1 or not 0 < tolerance < 1:
        raise SparsefxError(f"rounds={rounds!r} must be at least 1 and tolerance={tolerance!r} in (0, 1)")
    inputs = as_inputs(example_inputs)
    say = LOG.info if verbose else LOG.debug
    measure = measure or MeasurePair()
    plan_options["cost"] = plan_options.get("cost") or cost_model(target)  # one table read, one drift check
    budget = {"speedup": speedup} if speedup is not None else {"latency_ms": latency_ms}
    tried: list[tuple[float, Plan]] = []
    records: list[dict] = []
    asked = speedup  # a latency budget is a speedup once the dense model is measured
    for round_ in range(rounds):
        if round_ == 0:
            candidate = plan(model, inputs, target=target, verbose=verbose, **budget, **plan_options)
        else:
            goal = _next_goal([(r["predicted_speedup"], r["measured_speedup"]) for r in records], asked)
            try:
                candidate = plan(model, inputs, target=target, speedup=goal, verbose=verbose, **plan_options)
            except SparsefxError as error:  # the corrected goal is beyond what the groups allow
                say(f"stopping: {error}")
                break
            if any(r["predicted_speedup"] == candidate.predicted["speedup"] for r in records):
                break  # the same plan again: the groups' steps allow nothing in between
        dense_ms, planned_ms = measure(model, apply(model, candidate, inputs), inputs, target)
        asked = speedup if speedup is not None else dense_ms / latency_ms
        records.append({"predicted_speedup": candidate.predicted["speedup"], "dense_ms": dense_ms,
                        "planned_ms": planned_ms, "measured_speedup": dense_ms / planned_ms})
        miss = abs(math.log(records[-1]["measured_speedup"] / asked))
        tried.append((miss, candidate))
        say(f"round {round_ + 1}: predicted {candidate.predicted['speedup']:.2f}x, measured "
            f"{records[-1]['measured_speedup']:.2f}x ({dense_ms:.3f} -> {planned_ms:.3f} ms), asked {asked:.2f}x")
        if miss <= math.log1p(tolerance):
            break
    best = min(tried, key=lambda t: t[0])[1]
    chosen = next(r for r, (_, p) in zip(records, tried) if p is best)
    best.budget = {**budget, "measured": True}
    best.measured = {**chosen, "asked_speedup": asked, "tolerance": tolerance, "rounds": records}
    return best


def _next_goal(points: list[tuple[float, float]], asked: float) -> float:
    """The predicted speedup to plan for next, from the (predicted, measured) pairs so far: where
    plans measured on both sides of `asked`, interpolated between the nearest two (measured rises
    with predicted); else the last plan's excess over 1x, scaled by how far measured overshot it
    (a pruned model's small kernels lose more in a model than its large ones: the error grows with
    the pruning, so scaling the speedup itself oscillates)."""
    below = [p for p in points if p[1] < asked]
    above = [p for p in points if p[1] >= asked]
    if below and above:
        (p_lo, s_lo), (p_hi, s_hi) = max(below, key=lambda p: p[1]), min(above, key=lambda p: p[1])
        return p_lo + (asked - s_lo) * (p_hi - p_lo) / (s_hi - s_lo)
    predicted, measured = points[-1]
    if measured <= 1.0 or predicted <= 1.0:
        return predicted * asked / measured
    return 1 + (predicted - 1) * (asked - 1) / (measured - 1)
