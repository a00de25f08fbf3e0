"""How channel layouts move through element-wise, reshape and permute ops.

Pure functions over `Factor` lists; they unify or freeze ids through the `ChannelIds`
they are given and never touch the graph.
"""

from __future__ import annotations

import numpy as np

from sparsefx.channels.ids import ChannelIds, Factor


def merge(uf: ChannelIds, shapes: list[tuple[int, ...]], cmaps: list[list[Factor]], why: str) -> list[Factor]:
    """Tensors meeting element-wise in one coordinate space (already aligned): unify their ids.

    `shapes[i]` gives input i's size per coordinate (1 = broadcast). A channel axis that
    meets an untracked axis of the same size cannot be pruned: it is frozen.
    """
    result: list[Factor] = []
    full = [max(sizes) for sizes in zip(*shapes, strict=True)]
    for shape, cmap in zip(shapes, cmaps, strict=True):
        for factor in cmap:
            if all(shape[a] == 1 for a in factor.axes):
                if any(full[a] > 1 for a in factor.axes):  # one channel scaling many (FocalNet's gates[:, l:l+1]):
                    uf.freeze(factor.ids, "a single channel broadcast over many")  # removing it leaves none
                continue
            _absorb(uf, result, factor, why)
    for shape, cmap in zip(shapes, cmaps, strict=True):
        tracked = {a for f in cmap for a in f.axes if shape[a] > 1}
        for index, factor in enumerate(result):
            untracked = [a for a in factor.axes if shape[a] > 1 and a not in tracked]
            if untracked:
                result[index] = drop_whole_axes(uf, factor, untracked)
                if result[index] is None:
                    uf.freeze(factor.ids, why)
        result = [f for f in result if f is not None]
    return result


def drop_whole_axes(uf: ChannelIds, factor: Factor, axes: list[int]) -> Factor | None:
    """`factor` without `axes` where each of its units is whole along them (an attention head split
    into head x feature, met by a per-feature tensor such as a rotary cos/sin table): removing whole
    units never cuts those axes. None where some unit is cut along them, or no axis would remain."""
    if not set(axes) < set(factor.axes):
        return None
    roots = np.vectorize(uf.find, otypes=[np.int64])(factor.ids)
    for axis in axes:
        k = factor.axes.index(axis)
        if not np.all(roots == roots.take([0], axis=k)):
            return None
    index = tuple(0 if a in axes else slice(None) for a in factor.axes)
    return Factor(tuple(a for a in factor.axes if a not in axes), np.ascontiguousarray(factor.ids[index]))


def _absorb(uf: ChannelIds, result: list[Factor], factor: Factor, why: str) -> None:
    overlapping = [g for g in result if set(g.axes) & set(factor.axes)]
    if not overlapping:
        result.append(factor)
        return
    if len(overlapping) == 1:
        other = overlapping[0]
        if other.axes == factor.axes and other.ids.shape == factor.ids.shape:
            uf.union_arrays(other.ids, factor.ids)
            return
        for big, small in ((other, factor), (factor, other)):
            inside = drop_whole_axes(uf, big, list(small.axes)) if set(small.axes) < set(big.axes) else None
            if inside is not None:  # a per-feature weight meets whole heads (Qwen3's q_norm): heads stay units
                uf.freeze(small.ids, why)
                result[result.index(other)] = inside
                return
        if set(factor.axes) < set(other.axes) and _collapse_into(uf, other, factor):
            return
        if set(other.axes) < set(factor.axes) and _collapse_into(uf, factor, other):
            result[result.index(other)] = factor
            return
    for g in [*overlapping, factor]:
        uf.freeze(g.ids, why)
        if g in result:
            result.remove(g)


def _collapse_into(uf: ChannelIds, big: Factor, small: Factor) -> bool:
    """Every slice of `big` at an index of `small`'s axes becomes one class with it."""
    front = [big.axes.index(a) for a in small.axes]
    moved = np.moveaxis(big.ids, front, list(range(len(front))))
    if moved.shape[: len(front)] != small.ids.shape:
        return False
    rows = moved.reshape(small.ids.size, -1)
    for head, row in zip(small.ids.ravel().tolist(), rows, strict=True):
        uf.union_arrays(np.full(row.shape, head), row)
    return True


def collapse_axis(uf: ChannelIds, factor: Factor, axis: int) -> Factor | None:
    """Drop `axis` from a factor; what remains must stay whole along it (one class per slice)."""
    if factor.axes == (axis,):
        return None
    k = factor.axes.index(axis)
    moved = np.moveaxis(factor.ids, k, -1)
    for row in moved.reshape(-1, moved.shape[-1]):
        uf.union_all(row)
    return Factor(tuple(a for a in factor.axes if a != axis), moved[..., 0])


def permute(cmap: list[Factor], mapping: dict[int, int]) -> list[Factor]:
    return [f.moved(mapping) for f in cmap]


def reshape_groups(src: tuple[int, ...], dst: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Pair runs of source and destination axes whose sizes multiply to the same number."""
    groups, i, j = [], 0, 0
    while i < len(src) or j < len(dst):
        gi, gj, ps, pd = [], [], 1, 1
        if i < len(src):
            gi.append(i)
            ps, i = src[i], i + 1
        if j < len(dst):
            gj.append(j)
            pd, j = dst[j], j + 1
        while ps != pd:
            if ps < pd and i < len(src):
                gi.append(i)
                ps *= src[i]
                i += 1
            elif j < len(dst):
                gj.append(j)
                pd *= dst[j]
                j += 1
            else:
                raise ValueError(f"cannot reshape {src} to {dst}")
        groups.append((gi, gj))
    return groups


def reshape(uf: ChannelIds, src: tuple[int, ...], dst: tuple[int, ...], cmap: list[Factor], why: str) -> list[Factor]:
    """Layout after a view/reshape/flatten/squeeze from `src` to `dst`.

    Merging axes repeats ids (flatten -> linear); splitting a channel axis in two makes
    the outer axis the removable unit (attention heads, conv groups)."""
    groups = reshape_groups(src, dst)
    home = {a: k for k, (gi, _) in enumerate(groups) for a in gi}
    out: list[Factor] = []
    for factor in cmap:
        touched = sorted({home[a] for a in factor.axes})
        if len(touched) == 1:
            made = _regroup(uf, factor, *groups[touched[0]], src, dst)
        elif all(len(groups[k][0]) == 1 and len(groups[k][1]) == 1 for k in touched):
            made = factor.moved({groups[k][0][0]: groups[k][1][0] for k in touched})  # axes only renumbered
        else:
            made = None
        if made is None and len(touched) > 1:  # a head split in two groups: keep heads where they are whole
            whole = [a for a in factor.axes if drop_whole_axes(uf, factor, [a]) is not None]
            smaller = drop_whole_axes(uf, factor, whole) if whole else None
            made = next(iter(reshape(uf, src, dst, [smaller], why)), None) if smaller is not None else None
        if made is None:
            uf.freeze(factor.ids, why)
        else:
            out.append(made)
    return out


def _regroup(uf: ChannelIds, factor: Factor, gi: list[int], gj: list[int], src: tuple[int, ...],
             dst: tuple[int, ...]) -> Factor | None:
    if not gj:
        return None
    group_shape = [src[a] for a in gi]
    index_shape = [src[a] if a in factor.axes else 1 for a in gi]
    full = np.broadcast_to(factor.ids.reshape(index_shape), group_shape)
    arr = full.reshape([dst[b] for b in gj])
    keep = [k for k in range(arr.ndim) if not np.all(arr == arr.take([0], axis=k))]
    if not keep:
        return None
    arr = arr[tuple(slice(None) if k in keep else 0 for k in range(arr.ndim))]
    if arr.ndim >= 2:
        for row in arr.reshape(arr.shape[0], -1):
            uf.union_all(row)
    return Factor(tuple(gj[k] for k in keep), np.ascontiguousarray(arr))
