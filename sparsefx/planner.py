"""Cost-driven planner: how much of each coupled group to remove so that the model meets a
latency (or speedup, or MACs) budget on a target while losing the least importance.

The search is a latency-saliency knapsack solved greedily, as in HALP (Shen et al. 2022):
every group offers moves "keep k channels" for the next few channel counts the cost model
calls fast (multiples of the target's vector lanes: latency is a staircase, so a count in
the middle of a step buys nothing); each move costs importance and saves predicted latency
of the nodes it touches, given the current sizes of their other groups. The cheapest
importance per millisecond is taken until the budget is met.

Importance is counted in weights: a unit (channel, head) removes some weights from every
layer of its group, weighted by its score against the group's mean score. So a group's
importance is comparable with another's, and `importance_retained` is the fraction of
weight-importance the plan keeps.
"""

from __future__ import annotations

import hashlib
import math
import operator
import sys
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .costmodel import CostModel, Kernel
from .errors import SparsefxError
from .passes import importance as importance_mod
from .passes.coupling import ChannelGroup, Coupling
from .passes.latency import fused_nodes, node_kernels
from .passes.shrink import ShrinkModel, removal_order
from .plan import GRANULARITIES, Entry, Plan, PlanError
from .prune import _check_names, _ignored, analyze, remove, working_copy
from .trace import as_inputs, trace

LOOKAHEAD = 4  # moves considered per group: the next few fast sizes, to see past flat steps


def fingerprint(model: nn.Module) -> str:
    """Identifies a model's architecture: class and parameter names and shapes."""
    items = [type(model).__name__] + [f"{n}:{tuple(t.shape)}" for n, t in model.state_dict().items()]
    return hashlib.sha256("\n".join(items).encode()).hexdigest()[:16]


def group_name(group: ChannelGroup) -> str:
    return group.producers()[0].layer


class _Search:
    """Greedy latency-saliency search over units removed per group."""

    def __init__(self, gm: torch.fx.GraphModule, shrink: ShrinkModel, price: Callable[[Kernel, Kernel], float],
                 lanes: int) -> None:
        self.gm, self.shrink, self.price, self.lanes = gm, shrink, price, lanes
        meta = lambda n: n.meta.get("sfx_shape")
        self.refs = {n: node_kernels(n, gm, meta, lanes) for n in gm.graph.nodes}
        self.fused = fused_nodes(gm, lanes)
        self.removed: dict[int, int] = {}
        self.ms = {n: self.node_ms(n, self.removed) for n in gm.graph.nodes}

    def node_ms(self, node: object, removed: dict[int, int]) -> float:
        if node in self.fused or not self.refs[node]:
            return 0.0
        kernels = node_kernels(node, self.gm, lambda x: self.shrink.shape(x, removed), self.lanes)
        return sum(self.price(k, ref) for k, ref in zip(kernels, self.refs[node]))

    @property
    def total(self) -> float:
        return sum(self.ms.values())

    def delta(self, gid: int, units: int) -> float:
        trial = {**self.removed, gid: units}
        return sum(self.node_ms(n, trial) - self.ms[n] for n in self.shrink.affected(gid))

    def commit(self, gid: int, units: int) -> None:
        self.removed[gid] = units
        for node in self.shrink.affected(gid):
            self.ms[node] = self.node_ms(node, self.removed)


def _unit_losses(gm: torch.fx.GraphModule, coupling: Coupling, group: ChannelGroup, scores: np.ndarray,
                 order: list[int]) -> np.ndarray:
    """Importance lost by each unit in removal order, in weight units (see module doc)."""
    per_index = {}
    for s in group.slots:
        param = operator.attrgetter(coupling.slots[s].param)(gm)
        if param.dim() >= 2:
            per_index[s] = param.numel() / param.shape[coupling.slots[s].dim]
    index = {root: i for i, root in enumerate(group.classes)}
    free_scores = np.array([scores[index[r]] for r in order], dtype=float)
    weights = np.array([sum(len(group.members[r].get(s, ())) * n for s, n in per_index.items()) for r in order])
    mean = free_scores.mean() if free_scores.size and free_scores.mean() > 0 else 1.0
    return weights * free_scores / mean


def _allowed_removals(group: ChannelGroup, lanes: int, max_ratio: float) -> list[int]:
    """Units-removed counts that leave a fast channel count (a multiple of `lanes` where the
    group is wide enough for that to matter), at most `max_ratio` of the group."""
    units, width = len(group.classes), group.size // max(1, len(group.classes))
    limit = min(len(group.free) - 1, math.floor(units * max_ratio))
    step = lanes // math.gcd(lanes, width) if group.size >= 2 * lanes else 1
    keeps = [k for k in range(units - 1, units - limit - 1, -1) if k % step == 0 or units <= step]
    return [units - k for k in keeps if units - k <= limit]


def _budget(speedup: float | None, latency_ms: float | None, macs_ratio: float | None) -> dict:
    given = {k: v for k, v in (("speedup", speedup), ("latency_ms", latency_ms), ("macs_ratio", macs_ratio))
             if v is not None}
    if len(given) != 1:
        raise SparsefxError("give exactly one budget: speedup=2.0, latency_ms=5.0 or macs_ratio=0.5 "
                            f"(got {', '.join(given) or 'none'})")
    (name, value), = given.items()
    ok = {"speedup": value >= 1, "latency_ms": value > 0, "macs_ratio": 0 < value <= 1}[name] \
        if isinstance(value, (int, float)) else False
    if not ok:
        rule = {"speedup": ">= 1", "latency_ms": "> 0", "macs_ratio": "in (0, 1]"}[name]
        raise SparsefxError(f"{name}={value!r} is out of range; it must be {rule}")
    return given


def plan(model: nn.Module, example_inputs: object, target: object = "cpu", speedup: float | None = None,
         latency_ms: float | None = None, macs_ratio: float | None = None,
         granularities: Iterable[str] = ("channel",), importance: str = "l1", ignore: Iterable[str] = (),
         max_ratio: float = 0.9, cost: CostModel | None = None, verbose: bool = True) -> Plan:
    """Choose what to remove from `model` so that it meets one budget on `target`.

    `speedup` and `latency_ms` are predicted by the target's cost model (measured kernel
    tables, cached on disk); `macs_ratio` counts multiply-accumulates. The model is not
    changed; `apply(model, plan, example_inputs)` carries the plan out."""
    budget = _budget(speedup, latency_ms, macs_ratio)
    granularities = tuple(granularities)
    if not granularities:
        raise SparsefxError(f"granularities is empty; pick from {', '.join(GRANULARITIES)}")
    unknown = [g for g in granularities if g not in GRANULARITIES]
    if unknown:
        raise SparsefxError(f"unknown granularity {unknown[0]!r}; use one of {', '.join(GRANULARITIES)}")
    if "channel" not in granularities:
        raise SparsefxError("the planner's budgets need 'channel' among the granularities; block and N:M "
                            "layers are planned by level with sparsity=..., which this version lacks")
    if not 0 < max_ratio < 1:
        raise SparsefxError(f"max_ratio={max_ratio!r} must be in (0, 1): the most of one group that may go")
    inputs = as_inputs(example_inputs)
    ignore = [ignore] if isinstance(ignore, str) else list(ignore)
    analysis = analyze(model, inputs)
    gm, coupling = analysis.gm, analysis.coupling
    _check_names(ignore, [n for n, _ in gm.named_modules() if n], "ignore")
    groups = [g for g in coupling.groups if g.prunable and not _ignored(g, ignore)]
    if not groups:
        raise SparsefxError(f"{type(model).__name__} has no prunable channel group (see sparsefx inspect)")
    scores = importance_mod.resolve(importance)(gm, coupling, groups, example_inputs=inputs)
    orders = {g.id: removal_order(g, scores[g.id]) for g in groups}
    losses = {g.id: np.r_[0.0, np.cumsum(_unit_losses(gm, coupling, g, scores[g.id], orders[g.id]))] for g in groups}
    cost = cost or CostModel(target)
    by_macs = "macs_ratio" in budget
    price = (lambda k, ref: k.flops / 2) if by_macs else cost.latency
    with tqdm(desc="measuring kernels", unit=" kernel", disable=not verbose, file=sys.stderr, leave=False) as bar:
        cost.progress = bar.update
        search = _Search(gm, ShrinkModel(gm, coupling, orders), price, cost.lanes)
        dense = search.total
        goal = {"speedup": lambda v: dense / v, "latency_ms": lambda v: v, "macs_ratio": lambda v: dense * v}[
            next(iter(budget))](next(iter(budget.values())))
        _greedy(search, groups, losses, goal, cost.lanes, max_ratio)
        cost.save()
        cost.progress = None
    reached = search.total
    if reached > goal * 1.0001:
        what = f"{dense / reached:.2f}x ({reached:.3f} {'MACs' if by_macs else 'ms'})"
        raise SparsefxError(f"budget {budget} cannot be met on {cost.target.name}: removing up to {max_ratio:.0%} "
                            f"of every prunable group reaches {what}; ask for less or raise max_ratio")
    return _as_plan(model, inputs, cost, budget, importance, groups, search, losses, dense, by_macs)


def _greedy(search: _Search, groups: list[ChannelGroup], losses: dict[int, np.ndarray], goal: float, lanes: int,
            max_ratio: float) -> None:
    allowed = {g.id: _allowed_removals(g, lanes, max_ratio) for g in groups}
    neighbours = {g.id: {h.id for h in groups if search.shrink.affected(g.id) & search.shrink.affected(h.id)}
                  for g in groups}

    def best_move(gid: int) -> tuple[float, int] | None:
        now = search.removed.get(gid, 0)
        best = None
        for units in [u for u in allowed[gid] if u > now][:LOOKAHEAD]:
            saved = -search.delta(gid, units)
            if saved <= 1e-9:
                continue
            rate = (losses[gid][units] - losses[gid][now]) / saved
            if best is None or rate < best[0]:
                best = (rate, units)
        return best

    moves = {g.id: best_move(g.id) for g in groups}
    while search.total > goal:
        live = {gid: m for gid, m in moves.items() if m is not None}
        if not live:
            return
        gid = min(live, key=lambda k: live[k][0])
        search.commit(gid, live[gid][1])
        for other in neighbours[gid]:
            moves[other] = best_move(other)


def _as_plan(model: nn.Module, inputs: tuple, cost: CostModel, budget: dict, importance: str,
             groups: list[ChannelGroup], search: _Search, losses: dict[int, np.ndarray], dense: float,
             by_macs: bool) -> Plan:
    entries = []
    dense_ms = {}
    for group in groups:
        units = search.removed.get(group.id, 0)
        if not units:
            continue
        touched = search.shrink.affected(group.id)
        before = sum(search.node_ms(n, {}) for n in touched)
        after = sum(search.ms[n] for n in touched)
        dense_ms[group.id] = before
        entries.append(Entry(group_name(group), "channel", group.layers, group.size,
                             round(units / len(group.classes), 6), importance_lost=round(float(losses[group.id][units]), 3),
                             latency_ms=[round(before, 4), round(after, 4)]))
    total_weights = sum(float(losses[g.id][-1]) for g in groups)
    lost = sum(float(losses[g.id][search.removed.get(g.id, 0)]) for g in groups)
    planned = search.total
    macs = _Search(search.gm, search.shrink, lambda k, ref: k.flops / 2, search.lanes)
    macs_dense = macs.total
    for gid, units in search.removed.items():
        macs.commit(gid, units)
    predicted = {"dense_ms" if not by_macs else "dense_macs": round(dense, 4),
                 "planned_ms" if not by_macs else "planned_macs": round(planned, 4),
                 "speedup": round(dense / planned, 4), "macs_ratio": round(macs.total / macs_dense, 4),
                 "importance_retained": round(1 - lost / total_weights, 4) if total_weights else 1.0,
                 "cost_sources": dict(cost.sources)}
    model_info = {"class": type(model).__name__, "fingerprint": fingerprint(model),
                  "inputs": [list(x.shape) for x in inputs]}
    return Plan(model_info, cost.target.as_dict(), budget, importance if isinstance(importance, str) else "custom",
                entries, predicted)


def apply(model: nn.Module, plan: Plan | str, example_inputs: object) -> nn.Module:
    """A new model with the plan's rewrites done; `model` is left untouched."""
    if not isinstance(plan, Plan):
        plan = Plan.load(plan)
    if not isinstance(model, nn.Module):
        raise SparsefxError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    mine = fingerprint(model)
    if plan.model.get("fingerprint") != mine:
        raise PlanError(f"the plan was made for another model ({plan.model.get('class')} "
                        f"{plan.model.get('fingerprint')}), not this {type(model).__name__} ({mine}); "
                        "re-run sparsefx plan on this model")
    inputs = as_inputs(example_inputs)
    work = working_copy(model)
    gm = trace(work, inputs)
    from .passes.coupling import analyze_coupling

    coupling = analyze_coupling(gm)
    by_name = {group_name(g): g for g in coupling.groups if g.prunable}
    channel = [e for e in plan.entries if e.granularity == "channel"]
    for entry in channel:
        if entry.name not in by_name:
            raise PlanError(f"plan entry {entry.name!r} names no prunable channel group of this model; "
                            "see sparsefx inspect for the groups, or re-plan")
    groups = [by_name[e.name] for e in channel]
    scores = importance_mod.resolve(plan.importance)(gm, coupling, groups, example_inputs=inputs)
    removed: set[int] = set()
    for entry, group in zip(channel, groups):
        units = min(round(entry.ratio * len(group.classes)), len(group.free) - 1)
        removed.update(removal_order(group, scores[group.id])[:units])
    result = remove(work, gm, coupling, removed, inputs) if removed else work
    sparse = [e for e in plan.entries if e.granularity != "channel"]
    if sparse:
        result = _sparsify(result, sparse)
    return result.train(model.training)


def _sparsify(model: nn.Module, entries: list[Entry]) -> nn.Module:
    from .masks import Sparsity
    from .passes.sparsify import sparsify

    specs = {e.name: Sparsity(e.density, e.granularity, tuple(e.block or (1, 4)), e.m or 4) for e in entries}
    return sparsify(model, specs)
