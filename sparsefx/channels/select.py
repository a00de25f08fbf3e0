"""Which channels go: name checks for `ignore` and per-module ratios, and the choice of the
lowest-scored units per group (or in one ranking across groups), rounded to a channel multiple."""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable

import numpy as np

from sparsefx.channels.coupling import PRODUCER_ROLES, ChannelGroup
from sparsefx.errors import PruneError

Ratio = float | dict[str, float]


def as_names(names: str | Iterable[str]) -> list[str]:
    """Module names given as one string or many."""
    return [names] if isinstance(names, str) else list(names)


def ratio_rule(ratio: Ratio) -> Callable[[ChannelGroup], float]:
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
                if key != "*" and under(slot.layer, key) and len(key) > best_len:
                    best, best_len = value, len(key)
        return float(best)

    return ratio_of


def name_ratio(ratio: Ratio) -> Callable[[str], float]:
    """The ratio of one module by name (its longest matching prefix, else "*"): for units that are
    not channel groups of the graph (mixture-of-experts hidden units)."""
    ratio_rule(ratio)  # the same checks
    if not isinstance(ratio, dict):
        return lambda name: float(ratio)

    def ratio_of(name: str) -> float:
        keys = [key for key in ratio if key != "*" and under(name, key)]
        return float(ratio[max(keys, key=len)] if keys else ratio.get("*", 0.0))

    return ratio_of


def under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def check_names(wanted: list[str], names: list[str], what: str) -> None:
    known = set(names)
    for name in wanted:
        if not isinstance(name, str) or not any(under(n, name) for n in known):
            close = difflib.get_close_matches(str(name), sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "; see `sparsefx inspect` for module names"
            raise PruneError(f"{what} names module {name!r}, which is not in the model{hint}")


def ignored(group: ChannelGroup, ignore: list[str]) -> bool:
    return any(under(slot.layer, name) for slot in group.producers() for name in ignore)


def select(groups: list[ChannelGroup], scores: dict[int, np.ndarray], ratio_of: Callable[[ChannelGroup], float],
           round_to: int = 1, global_ranking: bool = False) -> set[int]:
    """Classes to remove: per group the lowest-scored `ratio`, or one global ranking."""
    counts = global_counts(groups, scores, ratio_of) if global_ranking else {
        g.id: math.floor(len(g.free) * ratio_of(g)) for g in groups}
    removed: set[int] = set()
    for group in groups:
        count = rounded(group, counts[group.id], round_to)
        ranked = sorted(zip(group.free, free_scores(group, scores), strict=True), key=lambda pair: pair[1])
        removed.update(root for root, _ in ranked[:count])
    return removed


def free_scores(group: ChannelGroup, scores: dict[int, np.ndarray]) -> np.ndarray:
    """Scores of the group's removable units, in `group.free` order."""
    index = {root: i for i, root in enumerate(group.classes)}
    return np.array([scores[group.id][index[r]] for r in group.free], dtype=float)


def class_width(group: ChannelGroup) -> int:
    """Channels one unit removes from the group's first producer (1, or a head's width)."""
    slot = next(s for s in group.slots if group.slot_objs[s].roles & PRODUCER_ROLES)
    return len(group.members[group.classes[0]][slot])


def rounded(group: ChannelGroup, count: int, round_to: int) -> int:
    """Remove fewer so that the kept channel count is a multiple of round_to."""
    count = min(count, len(group.free) - 1)
    if round_to == 1 or count <= 0:
        return max(count, 0)
    width = class_width(group)
    step = round_to // math.gcd(round_to, width)
    keep = min(len(group.classes), math.ceil((len(group.classes) - count) / step) * step)
    return max(0, min(len(group.classes) - keep, len(group.free) - 1))


def global_counts(groups: list[ChannelGroup], scores: dict[int, np.ndarray],
                   ratio_of: Callable[[ChannelGroup], float]) -> dict[int, int]:
    """One ranking over all groups (scores normalised by each group's mean), removing
    `ratio` of all free channels; every group keeps at least one unit."""
    entries = []
    for group in groups:
        group_scores = free_scores(group, scores)
        scale = group_scores.mean() or 1.0
        width = class_width(group)
        entries += [(s / scale, group.id, width) for s in group_scores]
    budget = sum(ratio_of(g) * class_width(g) * len(g.free) for g in groups)
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
