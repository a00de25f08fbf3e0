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

import math
import operator
import os
import sys
import warnings
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from sparsefx.capture.trace import as_inputs
from sparsefx.channels.coupling import ChannelGroup, Coupling
from sparsefx.channels.prune import score_groups
from sparsefx.channels.record import fingerprint
from sparsefx.channels.select import as_names, under
from sparsefx.cost.fusion import FusionRules
from sparsefx.cost.kernel import Kernel
from sparsefx.cost.latency import analyze_fusion, dense_kernels, priced_kernels
from sparsefx.cost.layouts import Conversions, InLayout
from sparsefx.cost.model import CostModel
from sparsefx.cost.shrink import ShrinkModel, removal_order
from sparsefx.cost.timing import neighbours_cores
from sparsefx.errors import SparsefxError
from sparsefx.log import get_logger
from sparsefx.planning import kept
from sparsefx.planning.plan import GRANULARITIES, Entry, Plan, PlanError
from sparsefx.planning.pricing import cost_model
from sparsefx.planning.sparse_options import SparseOption, candidates, layer_weights, sparse_options
from sparsefx.sparse.masks import Sparsity
from sparsefx.sparse.sparsify import sparsify
from sparsefx.target import resolve_target, with_precision

LOG = get_logger("planner")
LOOKAHEAD = 4  # moves considered per group: the next few fast sizes, to see past flat steps
MEASURED_TOGETHER = 2  # guessed moves measured at once, best first: their kernels built in one batch (`CostModel.prefetch`)


def group_name(group: ChannelGroup) -> str:
    return group.producers()[0].layer


class Search:
    """Greedy latency-saliency search over units removed per group."""

    def __init__(self, gm: torch.fx.GraphModule, shrink: ShrinkModel, price: Callable[[Kernel, Kernel], float],
                 lanes: int, rules: FusionRules,
                 prefetch: Callable[[list[tuple[Kernel, Kernel]]], None] = lambda pairs: None,
                 in_layout: InLayout | None = None,
                 estimate: Callable[[Kernel, Kernel], tuple[float, bool]] | None = None) -> None:
        """`prefetch` gets every (kernel, reference) pair a batch of trials is about to `price`, first
        (`CostModel.prefetch`: what they read is measured together); with `in_layout` (`CostModel.in_layout`)
        each node is priced with the layout conversions of what it writes (`cost.layouts`). `estimate`
        (`CostModel.estimate`: (ms, exact), measuring nothing) weighs moves before they are measured."""
        self.gm, self.shrink, self.price, self.lanes, self.prefetch = gm, shrink, price, lanes, prefetch
        self.estimate = estimate or (lambda k, ref: (price(k, ref), True))
        self.in_layout = in_layout
        self.refs = dense_kernels(gm, lanes)
        self.fusion = analyze_fusion(gm, self.refs, rules)
        self.conversions = Conversions(gm, self.fusion) if in_layout is not None else None
        self.removed: dict[int, int] = {}
        self.chosen: dict[torch.fx.Node, SparseOption] = {}  # layers running a sparse kernel
        self.touched: dict[int, set[torch.fx.Node]] = {}  # `affected`'s answers
        # `pairs`' answers by node and the units removed from the groups whose shapes they read (a
        # warm plan of ResNet-50 worked out 24,600 of them, 11,000 for the first time; 40% of it)
        self.known: dict[tuple[object, tuple[int, ...]], list[tuple[Kernel, Kernel]]] = {}
        self.reads: dict[object, tuple[int, ...]] = {}  # node -> those groups
        self.prefetch_trials([({}, list(gm.graph.nodes))])
        self.ms = {n: self.node_ms(n, self.removed) for n in gm.graph.nodes}

    def pairs(self, node: object, removed: dict[int, int]) -> list[tuple[Kernel, Kernel]]:
        """(kernel, dense reference) of each kernel `node` runs with `removed` units gone, and of the
        conversions of what it writes (their own references: priced by their bytes)."""
        if node in self.chosen:
            return []
        if node not in self.reads:  # the groups whose removals change the shapes working them out reads
            read: set[object] = set()
            dense = self.work_out(node, lambda x: read.add(x) or self.shrink.shape(x, {}))
            self.reads[node] = tuple(sorted({gid for x in read for gid in self.shrink.groups_at(x)}))
            self.known[(node, (0,) * len(self.reads[node]))] = dense
        key = (node, tuple(removed.get(gid, 0) for gid in self.reads[node]))
        found = self.known.get(key)
        if found is None:
            found = self.known[key] = self.work_out(node, lambda x: self.shrink.shape(x, removed))
        return found

    def work_out(self, node: object, shape: Callable[[object], object]) -> list[tuple[Kernel, Kernel]]:
        found = list(zip(priced_kernels(node, self.gm, shape, self.lanes, self.fusion), self.refs[node]))
        if self.conversions is not None:
            found += [(k, k) for k in self.conversions(node, shape, self.lanes, self.in_layout)]
        return found

    def affected(self, gid: int) -> set[torch.fx.Node]:
        """The nodes whose price may change with group `gid`: those whose shapes do (`ShrinkModel.affected`)
        and, where layouts are priced, the writers of their inputs (a reader's layout sets their
        conversions). A move is weighed on the first (`saving`: a residual's writer, whose conversion
        changes where the conv adding it leaves the layout, is the one it misses) and committed on all,
        so the running total stays what `Planner.evaluate` gives."""
        found = self.touched.get(gid)
        if found is None:
            found = self.shrink.affected(gid)
            if self.conversions is not None:
                found = found | {w for node in found for w in self.conversions.writers(node)}
            self.touched[gid] = found
        return found

    def node_ms(self, node: object, removed: dict[int, int]) -> float:
        if node in self.chosen:
            return self.chosen[node].ms
        return sum(self.price(k, ref) for k, ref in self.pairs(node, removed))

    def prefetch_trials(self, trials: Iterable[tuple[dict[int, int], Iterable[object]]]) -> None:
        """Hand `prefetch` what pricing these (units removed, nodes) trials reads."""
        self.prefetch([pair for removed, nodes in trials for node in nodes for pair in self.pairs(node, removed)])

    def measure_moves(self, moves: Iterable[tuple[int, int]]) -> None:
        """Measure what pricing these (group, units removed) moves from the current state reads."""
        self.prefetch([pair for gid, units in moves for node in self.shrink.affected(gid)
                       for pair in self.pairs(node, {**self.removed, gid: units})])

    def node_guess(self, node: object, removed: dict[int, int]) -> tuple[float, bool]:
        """(ms, exact): `node_ms`, guessed where its kernels are not measured yet (`estimate`)."""
        if node in self.chosen:
            return self.chosen[node].ms, True
        guesses = [self.estimate(k, ref) for k, ref in self.pairs(node, removed)]
        return sum(ms for ms, _ in guesses), all(exact for _, exact in guesses)

    def guessed(self, removed: dict[int, int]) -> float:
        """The model's ms with `removed` units gone, guessed where its kernels are not measured (`estimate`)."""
        return sum(self.node_guess(n, removed)[0] for n in self.gm.graph.nodes)

    @property
    def total(self) -> float:
        return sum(self.ms.values())

    def saving(self, gid: int, units: int) -> tuple[float, bool]:
        """(ms saved, exact) by moving group `gid` to `units` removed, guessed where its kernels are
        not measured yet (`estimate`)."""
        trial = {**self.removed, gid: units}
        guesses = {node: self.node_guess(node, trial) for node in self.shrink.affected(gid)}
        return sum(self.ms[node] - ms for node, (ms, _) in guesses.items()), all(exact for _, exact in guesses.values())

    def commit(self, gid: int, units: int) -> None:
        self.removed[gid] = units
        for node in self.affected(gid):
            self.ms[node] = self.node_ms(node, self.removed)

    def choose(self, option: SparseOption) -> None:
        self.chosen[option.node] = option
        self.ms[option.node] = option.ms


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


def _budget(**budgets: float | None) -> dict:
    given = {k: v for k, v in budgets.items() if v is not None}
    if len(given) != 1:
        raise SparsefxError("give exactly one budget: speedup=2.0, latency_ms=5.0, macs_ratio=0.5 or sparsity=0.9 "
                            f"(got {', '.join(given) or 'none'})")
    (name, value), = given.items()
    ok = {"speedup": value >= 1, "latency_ms": value > 0, "macs_ratio": 0 < value <= 1,
          "sparsity": 0 < value < 1}[name] if isinstance(value, (int, float)) else False
    if not ok:
        rule = {"speedup": ">= 1", "latency_ms": "> 0", "macs_ratio": "in (0, 1]", "sparsity": "in (0, 1)"}[name]
        raise SparsefxError(f"{name}={value!r} is out of range; it must be {rule}")
    return given


class Planner:
    """Everything a plan is searched over: the traced model, its prunable groups in removal
    order, their importance losses and the cost model's view of every node. `evaluate`
    prices any units-removed assignment, so baselines can be compared on the same scale."""

    def __init__(self, model: nn.Module, example_inputs: object, target: object = "cpu",
                 importance: str = "l1", ignore: Iterable[str] = (), cost: CostModel | None = None,
                 by_macs: bool = False, require_groups: bool = True, calibration: object | None = None) -> None:
        scored = score_groups(model, example_inputs, importance, ignore=ignore, **data_options(calibration))
        self.inputs, self.gm, self.coupling = scored.inputs, scored.gm, scored.coupling
        self.groups, self.scores = scored.groups, scored.scores
        self.ignored_layers = {n for n, _ in self.gm.named_modules() if any(under(n, i) for i in scored.ignore)}
        if not self.groups and require_groups:
            raise SparsefxError(f"{type(model).__name__} has no prunable channel group (see sparsefx inspect)")
        self.importance = importance
        self.orders = {g.id: removal_order(g, self.scores[g.id]) for g in self.groups}
        self.losses = {g.id: np.r_[0.0, np.cumsum(_unit_losses(self.gm, self.coupling, g, self.scores[g.id],
                                                                self.orders[g.id]))] for g in self.groups}
        self.cost = cost or cost_model(target)
        self.by_macs = by_macs
        self.shrink = ShrinkModel(self.gm, self.coupling, self.orders)
        price = (lambda k, ref: k.flops / 2) if by_macs else self.cost.latency
        self.search = Search(self.gm, self.shrink, price, self.cost.lanes, self.cost.fusion,
                              **({} if by_macs else {"prefetch": self.cost.prefetch, "in_layout": self.cost.in_layout,
                                                     "estimate": self.cost.estimate}))
        self.dense = self.search.total
        # every Linear/Conv weight, counted once per coupled dimension as the losses count it
        self.total_importance = 2 * sum(w.numel() for _, _, w in layer_weights(self.gm).values())

    def retained(self, removed: dict[int, int], chosen: Iterable[SparseOption] = ()) -> float:
        """Fraction of the weight-importance kept when `removed` units go and `chosen` layers
        turn sparse (the total counts every Linear/Conv weight twice, as the losses do)."""
        total = self.total_importance
        lost = sum(float(self.losses[g.id][removed.get(g.id, 0)]) for g in self.groups)
        lost += sum(option.loss for option in chosen)
        return 1 - lost / total if total else 1.0

    def evaluate(self, removed: dict[int, int]) -> float:
        """Predicted cost (ms, or MACs) of the model with `removed` units gone."""
        self.search.prefetch_trials([(removed, self.gm.graph.nodes)])
        return sum(self.search.node_ms(n, removed) for n in self.gm.graph.nodes)

    def within(self, removed: dict[int, int], goal: float) -> bool:
        """Whether `evaluate(removed)` is at most `goal`, measured only where the guess (optimistic,
        measuring nothing: `Search.guessed`) does not already say no."""
        return self.search.guessed(removed) <= goal and self.evaluate(removed) <= goal

    def uniform(self, ratio: float) -> dict[int, int]:
        """What `prune(ratio=...)` removes: the same fraction of every group."""
        return {g.id: min(math.floor(len(g.free) * ratio), len(g.free) - 1) for g in self.groups}


def plan(model: nn.Module, example_inputs: object, target: object = "cpu", speedup: float | None = None,
         latency_ms: float | None = None, macs_ratio: float | None = None, sparsity: float | None = None,
         granularities: Iterable[str] = ("channel",), importance: str = "l1", ignore: Iterable[str] = (),
         max_ratio: float = 0.9, cost: CostModel | None = None, verbose: bool = True,
         calibration: object | None = None, precision: str | None = None, cache: bool = True) -> Plan:
    """Choose what to do to each group or layer of `model` so that it meets one budget on `target`.

    `speedup` and `latency_ms` are predicted by the target's cost model (measured kernel
    tables, cached on disk); `macs_ratio` counts multiply-accumulates; `sparsity` forces one
    level everywhere: that fraction of weights goes from every layer the first sparse
    granularity fits (block, N:M), or of channels from every group when only "channel" is
    given. `calibration` batches feed data-aware importance ("wanda", "taylor"; pass the same
    to `apply`). `precision` ("bf16" on CPUs that have it) prices the kernels the model compiled at
    that precision runs. The model is not changed; `apply(model, plan, example_inputs)` carries it out.
    A channel plan is kept (`planning.kept`): the same model, budget and options on the same cost
    tables get it back; `cache=False` plans afresh."""
    if precision is not None:
        target = with_precision(resolve_target(target), precision)
    budget = _budget(speedup=speedup, latency_ms=latency_ms, macs_ratio=macs_ratio, sparsity=sparsity)
    granularities = tuple(granularities)
    if not granularities:
        raise SparsefxError(f"granularities is empty; pick from {', '.join(GRANULARITIES)}")
    unknown = [g for g in granularities if g not in GRANULARITIES]
    if unknown:
        raise SparsefxError(f"unknown granularity {unknown[0]!r}; use one of {', '.join(GRANULARITIES)}")
    if not 0 < max_ratio < 1:
        raise SparsefxError(f"max_ratio={max_ratio!r} must be in (0, 1): the most of one group that may go")
    if "macs_ratio" in budget and "channel" not in granularities:
        raise SparsefxError("a macs_ratio budget needs 'channel' among the granularities: sparse kernels keep MACs")
    part = None
    if cache and cost is None and calibration is None and isinstance(importance, str) and granularities == ("channel",):
        cost = cost_model(target)
        asked = {"budget": budget, "importance": importance, "ignore": sorted(as_names(ignore)), "max_ratio": max_ratio}
        part = kept.model_part(model, as_inputs(example_inputs), cost, asked)  # hashed once: the weights are read
        found = kept.cached(kept.plan_key(part, cost)) if part else None
        if found is not None:
            if "speedup" in budget or "latency_ms" in budget:
                _warn_if_drifted(cost)
            LOG.info("reused the plan made before (same model, budget, options and cost tables; cache=False plans afresh)")
            return found
    cost = cost or cost_model(target)
    sparse = tuple(g for g in granularities if g != "channel")
    if sparse and cost.device:
        raise SparsefxError("block and N:M kernels are timed on this host, not on an RPC device; "
                            "plan them without rpc, or use granularities=('channel',)")
    if sparse and cost.target.is_gpu:
        raise SparsefxError(f"block and N:M kernels are timed on the host CPU; plan them with target='cpu', "
                            f"or use granularities=('channel',) for {cost.target.name}")
    # shown after a second: a plan priced from the tables alone measures nothing and needs no bar
    with tqdm(desc="measuring kernels", unit=" kernel", disable=not verbose, file=sys.stderr, leave=False,
              delay=1.0) as bar:
        cost.progress = bar.update
        if "speedup" in budget or "latency_ms" in budget:
            _warn_if_drifted(cost)
        planner = Planner(model, example_inputs, importance=importance, ignore=ignore, cost=cost,
                          by_macs="macs_ratio" in budget, require_groups="channel" in granularities,
                          calibration=calibration)
        search = planner.search
        options = sparse_options(planner.gm, candidates(sparse, 1 - sparsity if sparsity else None), cost.target,
                                 skip=planner.ignored_layers) if sparse else {}
        (name, value), = budget.items()
        if name == "sparsity":
            _force(planner, options, value, granularities)
        else:
            goal = {"speedup": planner.dense / value, "latency_ms": value, "macs_ratio": planner.dense * value}[name]
            groups = planner.groups if "channel" in granularities else []
            _greedy(search, groups, planner.losses, options, goal, cost.lanes, max_ratio)
            if groups and not search.chosen:
                uniform_if_better(planner, goal, cost.lanes, max_ratio)
            if search.total > goal * 1.0001:
                what = f"{planner.dense / search.total:.2f}x ({search.total:.3f} {'MACs' if planner.by_macs else 'ms'})"
                raise SparsefxError(f"budget {budget} cannot be met on {cost.target.name} with "
                                    f"{', '.join(granularities)}: the most this plan reaches is {what}; ask for less, "
                                    "raise max_ratio or allow more granularities")
        cost.save()
        cost.progress = None
    result = _as_plan(model, planner, budget)
    if part is not None:
        kept.keep(kept.plan_key(part, cost), result)  # on the tables as this plan left them
    return result


def _warn_if_drifted(cost: CostModel, tolerance: float = 0.2) -> None:
    """Say so when the cost tables no longer describe this machine's speed (see `CostModel.drift`;
    a new table takes its probes now, with the rest of its measurements), or when other processes
    take more of the CPU than the target leaves them (`neighbours_cores`), by half a core."""
    for name, then, now in cost.drift():
        if abs(now / then - 1) > tolerance:
            warnings.warn(f"the cost tables in {cost.path} were measured when a probe {name} took {then:.3f} ms; it takes "
                          f"{now:.3f} ms now ({100 * (now / then - 1):+.0f}%), so predictions may be off by as much: delete "
                          "the file to re-measure under today's load, or use plan_measured", stacklevel=3)
            return
    host = os.cpu_count() or 1
    busy = neighbours_cores() if cost.measure and not cost.device else None  # this host's timings only
    if busy is not None and busy > host - min(cost.target.cores, host) + 0.5:
        warnings.warn(f"other processes keep {busy:.1f} of this machine's {host} cores busy: kernels timed now, and the "
                      f"model compiled from this plan, run slower than the tables in {cost.path} say; plan when the machine "
                      "is quiet (or delete the file to re-measure under this load), or use plan_measured", stacklevel=3)


def _aligned_uniform(planner: Planner, ratio: float, allowed: dict[int, list[int]]) -> dict[int, int]:
    """`ratio` of every group, rounded down to a removal that leaves a fast channel count."""
    return {gid: max([0] + [u for u in allowed[gid] if u <= units]) for gid, units in planner.uniform(ratio).items()}


def uniform_if_better(planner: Planner, goal: float, lanes: int, max_ratio: float, steps: int = 14) -> None:
    """A second opinion on the greedy. It takes one move at a time on measured tables that are
    not always monotone in the channel count (small kernels where oneDNN switches algorithm),
    and can end below a plain uniform ratio meeting the same goal; the plan then takes that.
    Only ratios that keep more importance than the greedy's plan can win, and importance needs
    no timing: the largest such ratio is found first and, where it does not meet the goal, no
    uniform plan is priced further (bisecting over all ratios measured a third of a ResNet-50
    plan's kernels on a fresh cache)."""
    allowed = {g.id: _allowed_removals(g, lanes, max_ratio) for g in planner.groups}
    search = planner.search
    kept = planner.retained(search.removed)
    better = lambda ratio: planner.retained(_aligned_uniform(planner, ratio, allowed)) > kept
    meets = lambda ratio: planner.within(_aligned_uniform(planner, ratio, allowed), goal)
    lo, hi = 0.0, max_ratio
    if not better(hi):
        for _ in range(2 * steps):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if better(mid) else (lo, mid)
        hi = lo  # the largest ratio found to keep more
    if hi == 0.0 or not meets(hi):
        return
    lo = 0.0
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if meets(mid) else (mid, hi)
    uniform = _aligned_uniform(planner, hi, allowed)
    if planner.retained(uniform) <= kept:
        return
    for gid in list(search.removed):
        search.commit(gid, 0)
    for gid, units in uniform.items():
        search.commit(gid, units)


def _force(planner: Planner, options: dict, sparsity: float, granularities: tuple[str, ...]) -> None:
    """One level everywhere: the sparse pattern where it fits, else channels at `sparsity`."""
    for node_options in options.values():
        planner.search.choose(min(node_options, key=lambda o: o.ms))
    if "channel" in granularities and not options:
        for gid, units in planner.uniform(sparsity).items():
            planner.search.commit(gid, units)


def _greedy(search: Search, groups: list[ChannelGroup], losses: dict[int, np.ndarray],
            options: dict[torch.fx.Node, list[SparseOption]], goal: float, lanes: int, max_ratio: float) -> None:
    """Take the move with the least importance lost per millisecond saved until `goal`:
    "remove more of group g" or "run layer n on a sparser kernel". A layer is either
    channel-pruned or sparse, never both (the kernels are measured at the layer's full size).
    Moves are weighed on guessed times where their kernels are not measured (`Search.saving`), and
    the best one is measured (with the next few guessed ones, `MEASURED_TOGETHER`) and weighed again
    until the best is measured: only it is taken."""
    allowed = {g.id: _allowed_removals(g, lanes, max_ratio) for g in groups}
    groups_of: dict[torch.fx.Node, set[int]] = {}
    for g in groups:
        for node in search.shrink.affected(g.id):
            groups_of.setdefault(node, set()).add(g.id)

    def trials(gid: int) -> list[int]:
        """The units-removed counts a channel move of `gid` weighs (none where a layer went sparse)."""
        if any(node in search.chosen for node in search.shrink.affected(gid)):
            return []
        return [u for u in allowed[gid] if u > search.removed.get(gid, 0)][:LOOKAHEAD]

    def channel_move(gid: int) -> tuple[float, object, bool] | None:
        """(importance lost per ms saved, units removed, measured) of group `gid`'s best move."""
        now, best = search.removed.get(gid, 0), None
        for units in trials(gid):
            saved, exact = search.saving(gid, units)
            rate = (losses[gid][units] - losses[gid][now]) / saved if saved > 1e-9 else None
            if rate is not None and (best is None or rate < best[0]):
                best = (rate, units, exact)
        return best

    def sparse_move(node: torch.fx.Node) -> tuple[float, object, bool] | None:
        if any(search.removed.get(gid, 0) for gid in groups_of.get(node, ())):
            return None
        current = search.chosen.get(node)
        lost_now = current.loss if current else 0.0
        best = None
        for option in options[node]:
            saved = search.ms[node] - option.ms
            if option.loss > lost_now and saved > 1e-9:
                rate = (option.loss - lost_now) / saved
                if best is None or rate < best[0]:
                    best = (rate, option, True)  # a sparse kernel is measured with its options
        return best

    def refresh(keys: Iterable[tuple[str, object]]) -> None:
        for k in keys:
            moves[k] = channel_move(k[1]) if k[0] == "g" else sparse_move(k[1])

    moves: dict[tuple[str, object], tuple[float, object, bool] | None] = {}
    refresh([("g", g.id) for g in groups] + [("s", n) for n in options])
    while search.total > goal:
        live = sorted(((move[0], key) for key, move in moves.items() if move is not None), key=lambda m: m[0])
        if not live:
            return
        key = live[0][1]
        if not moves[key][2]:  # guessed: measured with the next few guessed moves, all weighed again
            guessed = [k for _, k in live if not moves[k][2]][:MEASURED_TOGETHER]
            search.measure_moves((k[1], moves[k][1]) for k in guessed)
            for k in guessed:
                moves[k] = channel_move(k[1])
            continue
        kind, what = key
        if kind == "g":
            search.commit(what, moves[key][1])
            touched = search.shrink.affected(what)
            stale = {("g", h) for n in touched for h in groups_of.get(n, ())} | {("s", n) for n in touched if n in options}
        else:
            search.choose(moves[key][1])
            stale = {("s", what)} | {("g", h) for h in groups_of.get(what, ())}
        refresh(stale)


def _as_plan(model: nn.Module, planner: Planner, budget: dict) -> Plan:
    search, losses = planner.search, planner.losses
    total_weights = planner.total_importance
    entries = []
    for group in planner.groups:
        units = search.removed.get(group.id, 0)
        if not units:
            continue
        touched = search.affected(group.id)
        before = sum(search.node_ms(n, {}) for n in touched)
        after = sum(search.ms[n] for n in touched)
        entries.append(Entry(group_name(group), "channel", group.layers, group.size,
                             round(units / len(group.classes), 6),
                             importance_lost=round(float(losses[group.id][units]) / total_weights, 5),
                             latency_ms=[round(before, 4), round(after, 4)]))
    for node, option in list(search.chosen.items()):
        spec = option.spec
        entries.append(Entry(option.layer, spec.pattern, [option.layer], density=spec.density,
                             block=list(spec.block) if spec.pattern == "block" else None,
                             m=spec.m if spec.pattern == "nm" else None,
                             importance_lost=round(option.loss / total_weights, 5) if total_weights else 0.0,
                             latency_ms=[round(_dense_ms(search, node), 4), round(option.ms, 4)]))
    macs = Search(search.gm, search.shrink, lambda k, ref: k.flops / 2, search.lanes, planner.cost.fusion)
    macs_dense = macs.total
    for gid, units in search.removed.items():
        macs.commit(gid, units)
    unit = "macs" if planner.by_macs else "ms"
    predicted = {f"dense_{unit}": round(planner.dense, 4), f"planned_{unit}": round(search.total, 4),
                 "speedup": round(planner.dense / search.total, 4), "macs_ratio": round(macs.total / macs_dense, 4),
                 "importance_retained": round(planner.retained(search.removed, search.chosen.values()), 4),
                 "cost_sources": dict(planner.cost.sources)}
    model_info = {"class": type(model).__name__, "fingerprint": fingerprint(model),
                  "inputs": [list(x.shape) for x in planner.inputs]}
    importance = planner.importance if isinstance(planner.importance, str) else "custom"
    return Plan(model_info, planner.cost.target.as_dict(), budget, importance, entries, predicted)


def _dense_ms(search: Search, node: torch.fx.Node) -> float:
    """What a sparse layer costs dense (its dense kernels, priced as if no choice was made)."""
    option = search.chosen.pop(node)
    try:
        return search.node_ms(node, {})
    finally:
        search.chosen[node] = option


def data_options(calibration: object | None) -> dict:
    """Importance options for calibration data: none at all without it, so that custom
    importance callables without a `calibration` parameter keep working."""
    return {} if calibration is None else {"calibration": calibration}


def apply(model: nn.Module, plan: Plan | str, example_inputs: object, calibration: object | None = None) -> nn.Module:
    """A new model with the plan's rewrites done; `model` is left untouched. A plan scored with
    data-aware importance removes the units it chose when given the same `calibration`."""
    if not isinstance(plan, Plan):
        plan = Plan.load(plan)
    if not isinstance(model, nn.Module):
        raise SparsefxError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    mine = fingerprint(model)
    if plan.model.get("fingerprint") != mine:
        raise PlanError(f"the plan was made for another model ({plan.model.get('class')} "
                        f"{plan.model.get('fingerprint')}), not this {type(model).__name__} ({mine}); "
                        "re-run sparsefx plan on this model")
    channel = [e for e in plan.entries if e.granularity == "channel"]
    named = {e.name for e in channel}
    scored = score_groups(model, example_inputs, plan.importance, keep=lambda group: group_name(group) in named,
                          **data_options(calibration))
    by_name = {group_name(g): g for g in scored.groups}
    removed: set[int] = set()
    for entry in channel:
        if entry.name not in by_name:
            raise PlanError(f"plan entry {entry.name!r} names no prunable channel group of this model; "
                            "see sparsefx inspect for the groups, or re-plan")
        group = by_name[entry.name]
        units = min(round(entry.ratio * len(group.classes)), len(group.free) - 1)
        removed.update(removal_order(group, scored.scores[group.id])[:units])
    result = scored.remove(removed) if removed else scored.work
    sparse = [e for e in plan.entries if e.granularity != "channel"]
    if sparse:
        result = _sparsify(result, sparse)
    return result.train(model.training)


def _sparsify(model: nn.Module, entries: list[Entry]) -> nn.Module:
    specs = {e.name: Sparsity(e.density, e.granularity, tuple(e.block or (1, 4)), e.m or 4) for e in entries}
    return sparsify(model, specs)
