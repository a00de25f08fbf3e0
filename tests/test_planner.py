"""Planner, plan files and apply: budgets met on the applied model, editable JSON, clear errors."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import sparsefx
from sparsefx.capture.models import load_model
from sparsefx.channels.record import fingerprint
from sparsefx.cost.model import CostModel
from sparsefx.planning.plan import Plan, PlanError
from sparsefx.planning.planner import Planner, apply, plan, uniform_if_better

from .models_zoo import CASES


def _case(name):
    torch.manual_seed(0)
    model_cls, make_inputs = CASES[name]
    return model_cls().eval(), make_inputs()


@pytest.mark.parametrize("name", ["residual", "concat", "depthwise", "squeeze_excite", "attention", "packed_attention"])
def test_predicted_macs_equal_the_applied_models(name):
    """The shape simulation the planner searches with agrees with the real rewrite."""
    model, inputs = _case(name)
    result = plan(model, inputs, macs_ratio=0.6, verbose=False)
    pruned = apply(model, result, inputs)
    actual = sparsefx.count_macs(pruned, inputs) / sparsefx.count_macs(model, inputs)
    assert actual == pytest.approx(result.predicted["macs_ratio"], abs=1e-4)
    assert actual <= 0.6 + 1e-9
    with torch.inference_mode():
        assert pruned(*inputs).shape == model(*inputs).shape


def test_latency_plan_meets_its_predicted_speedup_and_rounds_to_vector_widths():
    model, inputs = load_model("default", input_shape=(1, 3, 128, 128))
    cost = CostModel("cuda:sm_90")  # roofline only: deterministic, nothing measured
    result = plan(model, inputs, target="cuda:sm_90", speedup=1.3, cost=cost, verbose=False)
    assert result.predicted["speedup"] >= 1.3
    for entry in result.entries:
        assert entry.keep % cost.lanes == 0 or entry.channels < 2 * cost.lanes


def test_the_plan_keeps_at_least_the_importance_of_a_uniform_ratio_at_the_same_latency():
    """Where the greedy ends below the uniform ratio that meets the same budget, the plan is that ratio."""
    model, inputs = load_model("default", input_shape=(1, 3, 128, 128))
    cost = CostModel("cuda:sm_90")
    result = plan(model, inputs, target="cuda:sm_90", speedup=1.3, cost=cost, verbose=False)
    planner = Planner(model, inputs, cost=cost)
    goal = planner.dense / 1.3
    best_uniform = max((planner.retained(planner.uniform(r / 100)) for r in range(0, 90)
                        if planner.evaluate(planner.uniform(r / 100)) <= goal), default=0.0)
    assert result.predicted["importance_retained"] >= best_uniform - 0.02  # uniform here is not lane-aligned
    assert result.predicted["speedup"] >= 1.3


def test_plan_roundtrips_and_an_edit_changes_the_result(tmp_path):
    model, inputs = _case("residual")
    result = plan(model, inputs, macs_ratio=0.7, verbose=False)
    path = result.save(tmp_path / "plan.json")
    loaded = Plan.load(path)
    assert loaded.to_dict() == result.to_dict()
    data = json.loads(path.read_text())
    data["entries"] = [{**data["entries"][0], "ratio": 0.5}]
    path.write_text(json.dumps(data))
    edited = apply(model, str(path), inputs)
    group_channels = data["entries"][0]["channels"]
    layer = dict(edited.named_modules())[data["entries"][0]["name"]]
    assert layer.weight.shape[0] == group_channels - round(0.5 * group_channels)


def _plan_file(tmp_path, **changes):
    model, inputs = _case("residual")
    data = plan(model, inputs, macs_ratio=0.7, verbose=False).to_dict()
    for key, value in changes.items():
        if key == "ratio":
            data["entries"][0]["ratio"] = value
        else:
            data[key] = value
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    return model, inputs, path


@pytest.mark.parametrize("change, message", [
    ({"ratio": 1.5}, "out of range"), ({"ratio": -0.1}, "out of range"), ({"version": 99}, "newer"),
    ({"schema": "other"}, "not a sparsefx plan"),
])
def test_bad_plan_files_are_refused_and_the_model_is_untouched(tmp_path, change, message):
    model, inputs, path = _plan_file(tmp_path, **change)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PlanError, match=message):
        apply(model, str(path), inputs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_plan_for_another_model_is_refused(tmp_path):
    model, inputs = _case("residual")
    other, other_inputs = _case("concat")
    result = plan(other, other_inputs, macs_ratio=0.7, verbose=False)
    with pytest.raises(PlanError, match="another model"):
        apply(model, result, inputs)
    assert fingerprint(model) != fingerprint(other)


def test_unreachable_budget_says_how_close_it_gets():
    model, inputs = _case("residual")
    with pytest.raises(sparsefx.SparsefxError, match=r"cannot be met.*reaches"):
        plan(model, inputs, macs_ratio=0.001, verbose=False)


@pytest.mark.parametrize("kwargs, message", [
    ({"macs_ratio": 0.5, "granularities": ()}, "granularities is empty"),
    ({"macs_ratio": 0.5, "granularities": ("rows",)}, "unknown granularity"),
    ({"macs_ratio": 0.5, "speedup": 2.0}, "exactly one budget"),
    ({"speedup": 0.5}, "out of range"),
])
def test_bad_planner_arguments(kwargs, message):
    model, inputs = _case("residual")
    with pytest.raises(sparsefx.SparsefxError, match=message):
        plan(model, inputs, verbose=False, **kwargs)


def test_explain_lists_every_entry():
    model, inputs = _case("concat")
    result = plan(model, inputs, macs_ratio=0.6, verbose=False)
    text = result.explain()
    assert all(entry.name in text for entry in result.entries)
    assert "importance retained" in text


class _UniformPlanner:
    """One 64-unit group; each unit removed saves 0.1 ms of 10 and loses 1% of the importance."""

    def __init__(self, greedy_units: int) -> None:
        from types import SimpleNamespace
        self.groups = [SimpleNamespace(id=0, classes=list(range(64)), size=64, free=list(range(64)))]
        self.search = SimpleNamespace(removed={0: greedy_units}, commit=self.commit)
        self.priced = []

    def commit(self, gid: int, units: int) -> None:
        self.search.removed[gid] = units

    def uniform(self, ratio: float) -> dict[int, int]:
        return {0: min(math.floor(64 * ratio), 63)}

    def retained(self, removed: dict[int, int]) -> float:
        return 1 - removed.get(0, 0) / 100

    def evaluate(self, removed: dict[int, int]) -> float:
        self.priced.append(removed[0])
        return 10 - 0.1 * removed[0]

    def within(self, removed: dict[int, int], goal: float) -> bool:
        return self.evaluate(removed) <= goal


@pytest.mark.parametrize("greedy_units, adopted", [(40, 30), (20, 20)])
def test_uniform_second_opinion_prices_only_ratios_that_keep_more(greedy_units, adopted):
    planner = _UniformPlanner(greedy_units)
    uniform_if_better(planner, goal=7.0, lanes=1, max_ratio=0.9)  # 30 units removed meet 7 ms
    assert planner.search.removed == {0: adopted}
    assert all(units < greedy_units for units in planner.priced)  # nothing keeping less was timed


PLAN_ONCE = """
import sys, torch
from torch import nn
import sparsefx
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                      nn.Conv2d(32, 8, 1)).eval()
sparsefx.plan(model, (torch.randn(1, 3, 32, 32),), speedup=1.3, verbose=False)
print("tvm" in sys.modules)
"""


def test_a_plan_priced_from_the_tables_alone_does_not_load_tvm(tmp_path):
    env = {**os.environ, "SPARSEFX_CACHE": str(tmp_path)}
    loaded = [subprocess.run([sys.executable, "-c", PLAN_ONCE], env=env, capture_output=True, text=True,
                             check=True).stdout.split()[-1] for _ in range(2)]
    assert loaded == ["True", "False"]  # the first plan measured its kernels on TVM; the second read them


@pytest.mark.parametrize("name", ["residual", "concat", "depthwise", "squeeze_excite", "attention"])
def test_kernels_kept_per_node_are_those_worked_out_afresh_for_every_state_a_plan_visits(name, monkeypatch):
    """`Search.pairs` keeps a node's kernels by the groups whose shapes it reads: never stale."""
    from sparsefx.planning import planner as planner_module

    kept = planner_module.Search.pairs
    checked = []

    def checking(search, node, removed):  # noqa: ANN001, ANN202
        found = kept(search, node, removed)
        if node not in search.chosen:
            fresh = search.work_out(node, lambda x: search.shrink.shape(x, removed))
            assert [(k.key, r.key) for k, r in found] == [(k.key, r.key) for k, r in fresh]
            checked.append(bool(removed))
        return found

    monkeypatch.setattr(planner_module.Search, "pairs", checking)
    model, inputs = _case(name)
    plan(model, inputs, macs_ratio=0.6, verbose=False, cache=False)
    assert sum(checked) > 20  # states with channels removed were priced


def test_a_plan_is_kept_and_given_back_for_the_same_model_options_and_tables(monkeypatch, tmp_path, caplog):
    from sparsefx.planning import kept
    from sparsefx.planning import planner as planner_module

    monkeypatch.setenv("SPARSEFX_CACHE", str(tmp_path / "cache"))
    model, inputs = _case("residual")
    first = plan(model, inputs, macs_ratio=0.6, verbose=False)
    searched = []

    class Counted(Planner):
        def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
            searched.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(planner_module, "Planner", Counted)
    again = plan(model, inputs, macs_ratio=0.6, verbose=False)
    assert not searched and again.to_dict() == first.to_dict()  # given back, not planned
    plan(model, inputs, macs_ratio=0.6, verbose=False, cache=False)
    plan(model, inputs, macs_ratio=0.5, verbose=False)  # another budget
    with torch.no_grad():
        next(model.parameters()).mul_(2)  # other weights: another model
    plan(model, inputs, macs_ratio=0.6, verbose=False)
    assert len(searched) == 3  # cache=False, the other budget and the other weights were planned
    for path in (tmp_path / "cache" / "plans").glob("*.json"):
        path.write_text("{ damaged")
    plan(model, inputs, macs_ratio=0.6, verbose=False)
    assert len(searched) == 4 and "kept plan could not be read" in caplog.text
    assert len(list((tmp_path / "cache" / "plans").glob("*.json"))) <= kept.KEPT
