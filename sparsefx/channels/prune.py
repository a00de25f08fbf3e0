"""Public pruning API: analyze a model's channel groups and physically remove channels."""

from __future__ import annotations

import copy
import difflib
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx
from torch import nn

from sparsefx.capture.annotate import total_macs
from sparsefx.capture.trace import as_inputs, trace
from sparsefx.channels import importance as importance_mod
from sparsefx.channels.attention import split_attention
from sparsefx.channels.coupling import PRODUCER_ROLES, ChannelGroup, Coupling, analyze_coupling
from sparsefx.channels.remove import remove_channels
from sparsefx.errors import PruneError

Ratio = float | dict[str, float]


@dataclass
class Analysis:
    """A traced graph and its channel-coupling groups."""

    gm: torch.fx.GraphModule
    coupling: Coupling

    @property
    def groups(self) -> list[ChannelGroup]:
        return self.coupling.groups

    @property
    def macs(self) -> int:
        return total_macs(self.gm)

    def __str__(self) -> str:
        prunable = [g for g in self.groups if g.prunable]
        lines = [f"{len(self.groups)} channel groups, {len(prunable)} prunable "
                 f"({sum(g.size for g in prunable)} channels)"]
        lines += [str(g) for g in self.groups]
        return "\n".join(lines)


def analyze(model: nn.Module, example_inputs: object, method: str = "auto") -> Analysis:
    """Trace a copy of `model` and compute its channel-coupling groups; nothing is modified.

    Packed `nn.MultiheadAttention` layers are analysed as separate q/k/v/out projections
    (`HeadAttention`), which is also what `prune` hands back when it removes heads."""
    inputs = as_inputs(example_inputs)
    work = working_copy(model)
    gm = trace(work, inputs, method)
    return Analysis(gm, analyze_coupling(gm))


def working_copy(model: nn.Module) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise PruneError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    work = copy.deepcopy(model).eval()
    split_attention(work)
    return work


def count_macs(model: nn.Module, example_inputs: object, method: str = "auto") -> int:
    was_training = model.training
    model.eval()
    try:
        return total_macs(trace(model, as_inputs(example_inputs), method))
    finally:
        model.train(was_training)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def prune(
    model: nn.Module,
    example_inputs: object,
    ratio: Ratio = 0.5,
    importance: str | Callable = "l1",
    round_to: int = 1,
    global_ranking: bool = False,
    ignore: Iterable[str] = (),
    method: str = "auto",
    **importance_options: object,
) -> nn.Module:
    """Return a new, physically smaller copy of `model` with a fraction `ratio` of the
    channels of every prunable group removed (lowest importance first).

    `ratio` may be a dict {module name prefix: ratio} ("*" for the rest); `ignore` names
    modules whose output channels stay. The input model is never modified. The result is
    the model's own class when its forward still holds after removal, otherwise the
    rewritten `torch.fx.GraphModule` (its shape constants patched).
    """
    ratio_of = _ratio_rule(ratio)
    score = importance_mod.resolve(importance)
    if not isinstance(round_to, int) or round_to < 1:
        raise PruneError(f"round_to must be a positive integer, got {round_to!r}")
    inputs = as_inputs(example_inputs)
    ignore = [ignore] if isinstance(ignore, str) else list(ignore)
    work = working_copy(model)
    gm = trace(work, inputs, method)
    names = [n for n, _ in work.named_modules() if n] + [n for n, _ in gm.named_modules() if n]
    _check_names(ignore, names, "ignore")
    if isinstance(ratio, dict):
        _check_names([k for k in ratio if k != "*"], names, "ratio")
    coupling = analyze_coupling(gm)
    candidates = [g for g in coupling.groups if g.prunable and not _ignored(g, ignore) and ratio_of(g) > 0]
    if not candidates:
        warnings.warn(f"sparsefx: nothing to prune in {type(model).__name__}: no channel group is both prunable "
                      "and selected (see sparsefx inspect); returning an unchanged copy", stacklevel=2)
        return work.train(model.training)
    scores = score(gm, coupling, candidates, example_inputs=inputs, **importance_options)
    removed = select(candidates, scores, ratio_of, round_to, global_ranking)
    return remove(work, gm, coupling, removed, inputs).train(model.training)


def remove(work: nn.Module, gm: torch.fx.GraphModule, coupling: Coupling, removed: set[int],
           inputs: tuple) -> nn.Module:
    """Remove the classes `removed` from `work` (a working copy) and its trace `gm`; returns
    the module to hand back (see `_choose_result`)."""
    code_before = gm.code
    remove_channels([gm, work], coupling, removed)
    return _choose_result(work, gm, inputs, graph_changed=gm.code != code_before)


def _ratio_rule(ratio: Ratio) -> Callable[[ChannelGroup], float]:
    values = ratio.values() if isinstance(ratio, dict) else [ratio]
    for value in values:
        if not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise PruneError(f"ratio must be in [0, 1), got {value!r}; 0.5 removes half of each group's channels")
    if not isinstance(ratio, dict):
        return lambda group: float(ratio)

    def ratio_of(group: ChannelGroup) -> float:
        best, best_len = ratio.get("*", 0.0), -1
        for slot in group.producers():
            for key, value in ratio.items():
                if key != "*" and _under(slot.layer, key) and len(key) > best_len:
                    best, best_len = value, len(key)
        return float(best)

    return ratio_of


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _check_names(wanted: list[str], names: list[str], what: str) -> None:
    known = set(names)
    for name in wanted:
        if not isinstance(name, str) or not any(_under(n, name) for n in known):
            close = difflib.get_close_matches(str(name), sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "; see `sparsefx inspect` for module names"
            raise PruneError(f"{what} names module {name!r}, which is not in the model{hint}")


def _ignored(group: ChannelGroup, ignore: list[str]) -> bool:
    return any(_under(slot.layer, name) for slot in group.producers() for name in ignore)


def select(groups: list[ChannelGroup], scores: dict[int, np.ndarray], ratio_of: Callable[[ChannelGroup], float],
           round_to: int = 1, global_ranking: bool = False) -> set[int]:
    """Classes to remove: per group the lowest-scored `ratio`, or one global ranking."""
    counts = _global_counts(groups, scores, ratio_of) if global_ranking else {
        g.id: math.floor(len(g.free) * ratio_of(g)) for g in groups}
    removed: set[int] = set()
    for group in groups:
        count = _rounded(group, counts[group.id], round_to)
        ranked = sorted(zip(group.free, _free_scores(group, scores), strict=True), key=lambda pair: pair[1])
        removed.update(root for root, _ in ranked[:count])
    return removed


def _free_scores(group: ChannelGroup, scores: dict[int, np.ndarray]) -> np.ndarray:
    """Scores of the group's removable units, in `group.free` order."""
    index = {root: i for i, root in enumerate(group.classes)}
    return np.array([scores[group.id][index[r]] for r in group.free], dtype=float)


def _class_width(group: ChannelGroup) -> int:
    """Channels one unit removes from the group's first producer (1, or a head's width)."""
    slot = next(s for s in group.slots if group.slot_objs[s].roles & PRODUCER_ROLES)
    return len(group.members[group.classes[0]][slot])


def _rounded(group: ChannelGroup, count: int, round_to: int) -> int:
    """Remove fewer so that the kept channel count is a multiple of round_to."""
    count = min(count, len(group.free) - 1)
    if round_to == 1 or count <= 0:
        return max(count, 0)
    width = _class_width(group)
    step = round_to // math.gcd(round_to, width)
    keep = min(len(group.classes), math.ceil((len(group.classes) - count) / step) * step)
    return max(0, min(len(group.classes) - keep, len(group.free) - 1))


def _global_counts(groups: list[ChannelGroup], scores: dict[int, np.ndarray],
                   ratio_of: Callable[[ChannelGroup], float]) -> dict[int, int]:
    """One ranking over all groups (scores normalised by each group's mean), removing
    `ratio` of all free channels; every group keeps at least one unit."""
    entries = []
    for group in groups:
        free_scores = _free_scores(group, scores)
        scale = free_scores.mean() or 1.0
        width = _class_width(group)
        entries += [(s / scale, group.id, width) for s in free_scores]
    budget = sum(ratio_of(g) * _class_width(g) * len(g.free) for g in groups)
    counts = dict.fromkeys((g.id for g in groups), 0)
    limit = {g.id: len(g.free) - 1 for g in groups}
    spent = 0.0
    for _, gid, width in sorted(entries):
        if spent + width > budget:
            break
        if counts[gid] < limit[gid]:
            counts[gid] += 1
            spent += width
    return counts


def _choose_result(work: nn.Module, gm: torch.fx.GraphModule, inputs: tuple, graph_changed: bool) -> nn.Module:
    """Prefer the user's own class when it still computes what the rewritten graph does.

    With no graph constant rewritten, the trace of the user's forward is unchanged, so
    the user's class is that graph; otherwise compare the two on the example inputs."""
    if not graph_changed:
        with torch.no_grad():
            work(*inputs)  # surfaces a broken rewrite here, not in the user's hands
        return work
    with torch.no_grad():
        expected = gm(*inputs)
        try:
            actual = work(*inputs)
        except Exception:  # its forward hard-codes a pruned size: the graph carries the fix
            return gm
    flat_expected = [t for t in torch.utils._pytree.tree_leaves(expected) if isinstance(t, torch.Tensor)]
    flat_actual = [t for t in torch.utils._pytree.tree_leaves(actual) if isinstance(t, torch.Tensor)]
    same = len(flat_expected) == len(flat_actual) and all(
        a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(flat_expected, flat_actual))
    return work if same else gm
