"""Channel ids: the vocabulary the coupling analysis speaks.

Every prunable index of every parameter dimension gets an integer *channel id*. The
analysis unifies ids that must be removed together (union-find); an equivalence class
of ids is one removable unit (one channel of a residual stream, one attention head,
one group of a grouped convolution).

A tensor's channel layout is a list of `Factor`s: each spans one or more tensor axes
and gives the id at every index of those axes. Axes that no factor spans carry no
prunable channels (batch, spatial, tokens, or channels whose producer is unknown).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Factor:
    axes: tuple[int, ...]  # sorted tensor axes
    ids: np.ndarray  # ids.shape == sizes of `axes`, in the same order

    def moved(self, mapping: dict[int, int]) -> Factor:
        """Renumber axes (old -> new); keeps ids ordered by increasing new axis."""
        new_axes = [mapping[a] for a in self.axes]
        order = np.argsort(new_axes)
        return Factor(tuple(int(new_axes[i]) for i in order), np.transpose(self.ids, order))

    def axis_ids(self, axis: int) -> np.ndarray:
        """ids as (size of `axis`, rest): index i of the axis survives if any id in row i does."""
        k = self.axes.index(axis)
        return np.moveaxis(self.ids, k, 0).reshape(self.ids.shape[k], -1)


class ChannelIds:
    """Union-find over channel ids with a 'frozen' flag (and its reason) per class."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.frozen: dict[int, str] = {}

    def new(self, shape: tuple[int, ...] | int) -> np.ndarray:
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        start, count = len(self.parent), int(np.prod(shape))
        self.parent.extend(range(start, start + count))
        return np.arange(start, start + count, dtype=np.int64).reshape(shape)

    def find(self, i: int) -> int:
        parent = self.parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(int(a)), self.find(int(b))
        if ra == rb:
            return
        if ra > rb:  # keep the oldest id as root: stable, readable class names
            ra, rb = rb, ra
        self.parent[rb] = ra
        if rb in self.frozen:
            self.frozen.setdefault(ra, self.frozen.pop(rb))

    def union_arrays(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.ravel().tolist(), b.ravel().tolist(), strict=True):
            self.union(x, y)

    def union_all(self, ids: np.ndarray) -> None:
        flat = ids.ravel().tolist()
        for y in flat[1:]:
            self.union(flat[0], y)

    def freeze(self, ids: np.ndarray, reason: str) -> None:
        for i in np.unique(ids).tolist():
            self.frozen.setdefault(self.find(i), reason)

    def roots(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)

    def frozen_reason(self, root: int) -> str | None:
        return self.frozen.get(self.find(root))
