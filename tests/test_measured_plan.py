"""Measured planning: re-planning until the compiled model's measured speedup is the asked one."""

import pytest
import torch

import sparsefx
from sparsefx.capture.models import load_model
from sparsefx.cost.model import CostModel
from sparsefx.planning.measured import MeasurePair, plan_measured
from sparsefx.planning.plan import Plan
from sparsefx.target import resolve_target


def _default():
    torch.manual_seed(0)
    return load_model("default", input_shape=(1, 3, 128, 128))


def _overshooting(calls, dense_ms=10.0):
    """A stand-in for timing: the pruned model measures faster than MACs suggest (as small
    kernels do on a CPU), by a fixed law, so the loop's correction can be checked exactly."""
    def measure(dense, pruned, inputs, target):
        calls.append(pruned)
        macs_speedup = sparsefx.count_macs(dense, inputs) / sparsefx.count_macs(pruned, inputs)
        return dense_ms, dense_ms / (1 + 2 * (macs_speedup - 1))
    return measure


def test_the_loop_corrects_a_misprediction_and_records_every_round(tmp_path):
    model, inputs = _default()
    calls = []
    cost = CostModel("cpu", measure=False)  # roofline: deterministic, nothing timed
    result = plan_measured(model, inputs, speedup=1.3, rounds=4, tolerance=0.05, verbose=False, cost=cost,
                           measure=_overshooting(calls))
    rounds = result.measured["rounds"]
    assert len(rounds) == len(calls) >= 2  # the first plan, predicted at 1.3x, measures far faster
    assert rounds[0]["measured_speedup"] > 1.3 * 1.05
    assert result.measured["measured_speedup"] == pytest.approx(1.3, rel=0.05)
    assert result.predicted["speedup"] < rounds[0]["predicted_speedup"]  # asked the predictor for less
    assert result.budget == {"speedup": 1.3, "measured": True}
    pruned = sparsefx.apply(model, result, inputs)  # the returned plan is the one measured
    assert _overshooting([])(model, pruned, inputs, None)[1] == pytest.approx(result.measured["planned_ms"])
    loaded = Plan.load(result.save(tmp_path / "plan.json"))
    assert loaded.measured == result.measured
    assert "measured on this host" in loaded.explain()


def test_a_latency_budget_is_asked_as_the_speedup_it_means_on_the_measured_dense_model():
    model, inputs = _default()
    cost = CostModel("cpu", measure=False)
    # the first round plans the latency as predicted; the fake host runs the dense model at the predicted
    # time (the roofline uses this host's measured peaks, so milliseconds differ from host to host)
    dense_ms = sparsefx.plan(model, inputs, speedup=1.05, cost=cost, verbose=False).predicted["dense_ms"]
    latency = 0.7 * dense_ms
    result = plan_measured(model, inputs, latency_ms=latency, rounds=4, verbose=False,
                           cost=cost, measure=_overshooting([], dense_ms))
    assert result.measured["asked_speedup"] == pytest.approx(dense_ms / latency)
    # this small model's groups move in steps: the plan returned is the closest one measured
    assert len(result.measured["rounds"]) >= 2
    closest = min(abs(r["planned_ms"] - latency) for r in result.measured["rounds"])
    assert abs(result.measured["planned_ms"] - latency) == pytest.approx(closest)


@pytest.mark.slow
def test_measure_pair_times_the_compiled_models():
    torch.manual_seed(0)
    inputs = (torch.randn(1, 64, 56, 56),)
    wide, narrow = torch.nn.Conv2d(64, 256, 3, padding=1).eval(), torch.nn.Conv2d(64, 16, 3, padding=1).eval()
    wide_ms, narrow_ms = MeasurePair()(wide, narrow, inputs, resolve_target("cpu"))
    assert wide_ms > 3 * narrow_ms  # 16x the MACs (alternating rounds, so load hits both alike)


@pytest.mark.parametrize("kwargs, message", [
    ({"target": "cuda:sm_90", "speedup": 1.5}, "host's CPU"),
    ({}, "one budget"),
    ({"speedup": 1.5, "latency_ms": 3.0}, "one budget"),
    ({"macs_ratio": 0.5}, "one budget"),
    ({"speedup": 1.5, "rounds": 0}, "rounds"),
])
def test_bad_arguments_fail_before_any_work(kwargs, message):
    model, inputs = _default()

    def measure(*args):
        raise AssertionError("nothing should be timed")
    with pytest.raises(sparsefx.SparsefxError, match=message):
        plan_measured(model, inputs, verbose=False, measure=measure, **kwargs)
