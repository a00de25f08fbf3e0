"""Rewrite pass: physically remove channel classes from parameters and the graph.

Given the `Coupling` of a graph and the set of classes to remove, slice every affected
parameter, rewrite the shape constants the graph carries (view/reshape sizes, split
sizes, slice bounds, conv groups, layer-norm shapes) and update module attributes
(in/out channels, features, groups: the `ATTRIBUTES` op registry, which finds a module's
entry through its class hierarchy). Invalidates: `sfx_*` node facts (re-trace to
refresh them) and any earlier `Coupling` of the graph.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from collections.abc import Callable

import numpy as np
import torch
import torch.fx
from torch import nn

from sparsefx.capture import ops
from sparsefx.channels.coupling import Coupling
from sparsefx.channels.ids import Factor

aten = torch.ops.aten


def patched_shape(shape: tuple | list, sizes: tuple[tuple[int, int], ...]) -> tuple:
    """A shape the graph computed at run time, with pruned axes set to their new size.

    Symbolic tracing (also what unpickling a GraphModule does) keeps the call as one node:
    a traced shape cannot be iterated."""
    if isinstance(shape, torch.fx.Proxy):
        return shape.tracer.create_proxy("call_function", patched_shape, (shape, sizes), {})
    shape = list(shape)
    for axis, size in sizes:
        shape[axis] = size
    return tuple(shape)


class _Kept:
    def __init__(self, coupling: Coupling, removed: set[int]) -> None:
        # one lookup table, id -> survives, instead of a set test per slot and patch
        self.keep = ~np.isin(coupling.roots, np.fromiter(removed, dtype=np.int64, count=len(removed)))

    def mask(self, ids: np.ndarray) -> np.ndarray:
        return self.keep[ids]

    def along(self, factor: Factor, axis: int) -> int:
        return int(self.mask(factor.axis_ids(axis)).any(axis=1).sum())

    def count(self, ids: np.ndarray) -> int:
        return int(self.mask(ids).sum())


def remove_channels(roots: list[nn.Module], coupling: Coupling, removed: set[int]) -> int:
    """Apply the removal to every module in `roots` (graph first); returns elements removed."""
    kept = _Kept(coupling, removed)
    gm = roots[0]
    before = sum(p.numel() for p in gm.parameters())
    by_param: dict[str, list] = defaultdict(list)
    for slot in coupling.slots:
        by_param[slot.param].append(slot)
    holders = _tensor_holders(roots)
    for name, slots in by_param.items():
        tensor = operator.attrgetter(name)(gm)
        new = tensor.detach()  # index_select copies, so the input model's tensors stay intact
        for slot in slots:
            mask = kept.mask(slot.ids)
            if not mask.all():
                new = new.index_select(slot.dim, torch.as_tensor(np.nonzero(mask)[0], device=new.device))
        if new.shape != tensor.shape:
            _replace_tensor(holders.get(id(tensor), []), tensor, new)
    for node, kind, payload in coupling.patches:
        PATCHERS[kind](gm, node, payload, kept)
        if kind == "groups" and node.op == "call_function":
            _set_owner_groups(roots[1:], node, kept.count(payload["rows"]))
    for root in roots:
        for module in root.modules():
            fix = ATTRIBUTES.for_module(module)
            if fix is not None:
                fix(module)
    if isinstance(gm, torch.fx.GraphModule):
        gm.graph.lint()
        gm.recompile()
    return before - sum(p.numel() for p in gm.parameters())


def _tensor_holders(roots: list[nn.Module]) -> dict[int, list[tuple[dict, str]]]:
    """Every place a tensor is stored under `roots` (tied weights share one tensor)."""
    holders: dict[int, list[tuple[dict, str]]] = defaultdict(list)
    seen: set[int] = set()
    for root in roots:
        for module in root.modules():
            if id(module) in seen:
                continue
            seen.add(id(module))
            for store in (module._parameters, module._buffers, vars(module)):
                for key, value in store.items():
                    if isinstance(value, torch.Tensor):
                        holders[id(value)].append((store, key))
    return holders


def _replace_tensor(places: list[tuple[dict, str]], old: torch.Tensor, new: torch.Tensor) -> None:
    value = nn.Parameter(new, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else new
    for store, key in places:
        store[key] = value


# --- graph constants ----------------------------------------------------------------------
def _set_arg(node: torch.fx.Node, index: int, name: str, value: object) -> None:
    if len(node.args) > index:
        args = list(node.args)
        args[index] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, name: value}


def _patch_groups(gm: torch.fx.GraphModule, node: torch.fx.Node, payload: dict, kept: _Kept) -> None:
    groups = kept.count(payload["rows"])
    if node.op == "call_module":
        gm.get_submodule(node.target).groups = groups
    elif node.target is aten.convolution.default:
        _set_arg(node, 8, "groups", groups)
    else:
        _set_arg(node, 6, "groups", groups)


def _set_owner_groups(roots: list[nn.Module], node: torch.fx.Node, groups: int) -> None:
    """An exported graph calls aten.conv on a weight some conv module of the user's model owns:
    that module gets the new groups too, so the user's own forward still runs (a depthwise conv)."""
    weight = node.args[1]
    if not (isinstance(weight, torch.fx.Node) and weight.op == "get_attr"):
        return
    owner = weight.target.rpartition(".")[0]
    for root in roots:
        module = dict(root.named_modules()).get(owner)
        if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
            module.groups = groups


def _patch_norm_groups(gm: torch.fx.GraphModule, node: torch.fx.Node, payload: dict, kept: _Kept) -> None:
    groups = kept.count(payload["rows"])
    if node.op == "call_module":
        gm.get_submodule(node.target).num_groups = groups
    else:
        _set_arg(node, 1, "num_groups", groups)


def _patch_normalized_shape(gm: torch.fx.GraphModule, node: torch.fx.Node, payload: dict, kept: _Kept) -> None:
    factor = next(f for f in node.meta["sfx_chan"] if payload["axis"] in f.axes)
    size = kept.along(factor, payload["axis"])
    if node.op == "call_module":
        gm.get_submodule(node.target).normalized_shape = (size,)
    else:
        _set_arg(node, 1, "normalized_shape", [size])


def _patch_shape(gm: torch.fx.GraphModule, node: torch.fx.Node, payload: dict, kept: _Kept) -> None:
    sizes = {a: kept.along(f, a) for f in payload["factors"] for a in f.axes}
    old = node.meta["sfx_shape"]
    if all(sizes[a] == old[a] for a in sizes):
        return
    if ops.op_key(node.target) is ops.UNFLATTEN:
        dim, inner = node.args[1] % len(old) if isinstance(node.args[1], int) else 0, node.args[2]
        _set_arg(node, 2, "sizes", list(patched_shape(
            inner, tuple((a - dim, size) for a, size in sizes.items() if dim <= a < dim + len(inner)))))
        return
    rest, changes = list(node.args[1:]), tuple(sorted(sizes.items()))
    if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
        node.args = (node.args[0], type(rest[0])(patched_shape(rest[0], changes)))
    elif len(rest) == 1 and isinstance(rest[0], torch.fx.Node) and isinstance(rest[0].meta.get("sfx_value"), tuple):
        with node.graph.inserting_before(node):  # a shape the graph computes: patch it at run time
            fixed = node.graph.call_function(patched_shape, (rest[0], changes))
        node.args = (node.args[0], fixed)
    else:
        node.args = (node.args[0], *patched_shape(rest, changes))


def _patch_split(gm: torch.fx.GraphModule, node: torch.fx.Node, payload: dict, kept: _Kept) -> None:
    sizes = [kept.count(part) for part in payload["parts"]]
    if isinstance(node.target, torch._ops.OpOverload):
        node.target = aten.split_with_sizes.default
    else:
        node.op, node.target = "call_function", torch.split
    node.args, node.kwargs = (node.args[0], sizes, payload["axis"]), {}


def _patch_slice(gm: torch.fx.GraphModule, node: torch.fx.Node, payload: dict, kept: _Kept) -> None:
    ids, in_axis = payload["ids"], payload["in_axis"]
    start, stop = kept.count(ids[: payload["start"]]), kept.count(ids[: payload["stop"]])
    if node.target is operator.getitem:
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        position = _index_position(index, in_axis, len(node.args[0].meta["sfx_shape"]))
        index = list(index)
        index[position] = slice(start, stop)
        node.args = (node.args[0], tuple(index))
    else:
        node.args = (node.args[0], node.args[1], start, stop, *node.args[4:])


def _index_position(index: tuple, axis: int, ndim: int) -> int:
    """Which entry of an index tuple addresses input axis `axis`."""
    position, current = 0, 0
    for i, item in enumerate(index):
        if item is Ellipsis:
            skip = ndim - sum(1 for x in index if x is not None and x is not Ellipsis)
            if current <= axis < current + skip:
                raise ValueError("slice under an Ellipsis")
            current += skip
            continue
        if item is None:
            continue
        if current == axis:
            return i
        current += 1
        position = i
    return position + 1


def _patch_rms_width(gm: torch.fx.GraphModule, node: torch.fx.Node, payload: dict, kept: _Kept) -> None:
    """An RMSNorm over fewer channels: eps * r and weight * sqrt(r), r = old / new width, keep it
    equal to the dense norm with the removed channels zero (see `channels.decoder`). The ratio is
    left in gm.meta["sfx_norm_rescale"] (layer -> r) for the module's own eps attribute, and the
    layers whose weight is an offset from 1 (Gemma) in gm.meta["sfx_norm_offset"]."""
    old, new = payload["ids"].size, kept.count(payload["ids"])
    if new == old:
        return
    ratio = old / new
    eps, at = payload["eps"], payload["eps_at"]
    eps.args = tuple(a * ratio if i == at else a for i, a in enumerate(eps.args))
    layer, rescaled = payload["weight"].rsplit(".", 1)[0], gm.meta.setdefault("sfx_norm_rescale", {})
    if layer in rescaled:  # a norm module called twice: its weight is scaled once
        return
    weight = operator.attrgetter(payload["weight"])(gm)  # a fresh tensor: its channels were just removed
    with torch.no_grad():
        if payload["offset"]:
            weight.add_(1).mul_(ratio ** 0.5).sub_(1)
        else:
            weight.mul_(ratio ** 0.5)
    rescaled[layer] = ratio
    if payload["offset"]:
        gm.meta.setdefault("sfx_norm_offset", set()).add(layer)


PATCHERS: dict[str, Callable[[torch.fx.GraphModule, torch.fx.Node, dict, _Kept], None]] = {
    "groups": _patch_groups, "norm_groups": _patch_norm_groups, "normalized_shape": _patch_normalized_shape,
    "shape": _patch_shape, "split": _patch_split, "slice": _patch_slice, "rms_width": _patch_rms_width,
}


# --- module attributes -----------------------------------------------------------------------
ATTRIBUTES: ops.OpRegistry[Callable[[nn.Module], None]] = ops.OpRegistry("attributes")


@ATTRIBUTES.register(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def fix_conv(m: nn.Module) -> None:
    m.out_channels, m.in_channels = m.weight.shape[0], m.weight.shape[1] * m.groups


@ATTRIBUTES.register(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def fix_conv_transpose(m: nn.Module) -> None:
    m.in_channels, m.out_channels = m.weight.shape[0], m.weight.shape[1] * m.groups


@ATTRIBUTES.register(nn.Linear)
def fix_linear(m: nn.Linear) -> None:
    m.out_features, m.in_features = m.weight.shape


@ATTRIBUTES.register(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d,
                     nn.InstanceNorm3d)
def fix_batchnorm(m: nn.Module) -> None:
    tensor = m.weight if m.weight is not None else m.running_mean
    if tensor is not None:
        m.num_features = tensor.shape[0]


@ATTRIBUTES.register(nn.LayerNorm)
def fix_layernorm(m: nn.LayerNorm) -> None:
    if m.weight is not None and len(m.normalized_shape) == 1:
        m.normalized_shape = (m.weight.shape[0],)


@ATTRIBUTES.register(nn.GroupNorm)
def fix_groupnorm(m: nn.GroupNorm) -> None:
    if m.weight is not None:
        m.num_channels = m.weight.shape[0]


@ATTRIBUTES.register(nn.Embedding)
def fix_embedding(m: nn.Embedding) -> None:
    m.embedding_dim = m.weight.shape[1]


@ATTRIBUTES.register(nn.PReLU)
def fix_prelu(m: nn.PReLU) -> None:
    m.num_parameters = m.weight.numel()
