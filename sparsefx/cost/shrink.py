"""Analysis pass: the shape every node would have after channel removal, without rewriting.

The planner tries thousands of (group -> units removed) combinations; rewriting the
model for each would take minutes. Instead, each channel axis of each node's output is
summarised once from its `sfx_chan` layout: how many of its indices are fixed (frozen
or unplanned channels) and, per group, the removal rank of the unit behind every other
index (rank 0 goes first). Removing the r lowest-ranked units of a group then drops
exactly the indices whose rank is below r, so a shape is a few binary searches away.

A row of a multi-axis layout (e.g. a head's features) survives while any of its ids
does, as in `remove_channels`; rows mixing groups are counted as fixed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch.fx

from sparsefx.channels.coupling import ChannelGroup, Coupling


@dataclass
class AxisCount:
    axis: int
    fixed: int
    ranks: dict[int, np.ndarray]  # group id -> sorted removal ranks of the axis's indices


class ShrinkModel:
    """`shape(node, removed)` for `removed` = {group id: units removed, lowest-ranked first}."""

    def __init__(self, gm: torch.fx.GraphModule, coupling: Coupling, order: dict[int, list[int]]) -> None:
        """`order[group id]` lists the group's removable roots, least important first."""
        size = int(coupling.roots.size)
        self.group_of = np.full(size, -1, dtype=np.int64)
        self.rank_of = np.zeros(size, dtype=np.int64)
        for gid, roots in order.items():
            self.group_of[roots] = gid
            self.rank_of[roots] = np.arange(len(roots))
        self.roots = coupling.roots
        self.axes: dict[torch.fx.Node, list[AxisCount]] = {}
        self.touched: dict[int, set[torch.fx.Node]] = {gid: set() for gid in order}
        for node in gm.graph.nodes:
            layout = node.meta.get("sfx_chan")
            if not isinstance(layout, list) or not isinstance(node.meta.get("sfx_shape"), tuple):
                continue
            counts = [self._count(factor.axis_ids(axis), axis) for factor in layout for axis in factor.axes]
            counts = [c for c in counts if c.ranks]
            if counts:
                self.axes[node] = counts
                for count in counts:
                    for gid in count.ranks:
                        self.touched[gid].add(node)

    def _count(self, rows: np.ndarray, axis: int) -> AxisCount:
        if rows.size == 0:
            return AxisCount(axis, rows.shape[0], {})
        roots = self.roots[rows]
        groups, ranks = self.group_of[roots], self.rank_of[roots]
        fixed = (groups < 0).any(1) | (groups != groups[:, :1]).any(1)
        by_group: dict[int, np.ndarray] = {}
        live = ~fixed
        for gid in np.unique(groups[live, 0]).tolist():
            pick = live & (groups[:, 0] == gid)
            by_group[gid] = np.sort(ranks[pick].max(1))
        return AxisCount(axis, int(fixed.sum()), by_group)

    def shape(self, node: torch.fx.Node, removed: dict[int, int]) -> object:
        shape = node.meta.get("sfx_shape")
        counts = self.axes.get(node)
        if not counts:
            return shape
        out = list(shape)
        for count in counts:
            kept = count.fixed + sum(int(r.size - np.searchsorted(r, removed.get(gid, 0)))
                                     for gid, r in count.ranks.items())
            out[count.axis] = kept
        return tuple(out)

    def groups_at(self, node: torch.fx.Node) -> set[int]:
        """The groups whose removals change `node`'s shape (the only ones `shape` reads)."""
        return {gid for count in self.axes.get(node, ()) for gid in count.ranks}

    def affected(self, gid: int) -> set[torch.fx.Node]:
        """Nodes whose own shape or whose inputs' shapes change with group `gid`."""
        nodes = set(self.touched.get(gid, ()))
        return nodes | {user for node in nodes for user in node.users}


def removal_order(group: ChannelGroup, scores: np.ndarray) -> list[int]:
    """The group's free roots, lowest score first (the order `channels.select.select` removes them in)."""
    index = {root: i for i, root in enumerate(group.classes)}
    return sorted(group.free, key=lambda root: scores[index[root]])
