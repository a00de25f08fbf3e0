"""Coupling rules: op -> how it moves, ties or freezes channel ids.

A rule takes (ctx, node) and returns the node's output layout. Rules live in the `RULES`
op registry (`capture.ops`): module classes (fx call_module, found through the class
hierarchy) and alias sets of functions, tensor methods and aten ops (torch.export graphs),
so one table serves both capture routes. Unknown ops fall to `default_rule`, which freezes
every channel they touch: being conservative is always correct, only less effective.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
import torchvision
from torch import nn

from sparsefx.capture import ops
from sparsefx.capture.annotate import is_transposed, node_arg
from sparsefx.channels import layout
from sparsefx.channels.context import Ctx, TensorInfo, describe_node
from sparsefx.channels.ids import Factor

aten = torch.ops.aten
Rule = Callable[[Ctx, torch.fx.Node], object]
RULES: ops.OpRegistry[Rule] = ops.OpRegistry("coupling")
rule = RULES.register


def default_rule(ctx: Ctx, node: torch.fx.Node) -> object:
    for info in ctx.tensor_args(node):
        ctx.freeze(info, f"unsupported op {describe_node(node)}")
    shape = node.meta["sfx_shape"]
    return tuple([] for _ in shape) if isinstance(shape, list) else []


def _out_shape(node: torch.fx.Node) -> tuple[int, ...]:
    return node.meta["sfx_shape"]


def _axis(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _factor_on(cmap: list[Factor], axis: int) -> Factor | None:
    return next((f for f in cmap if axis in f.axes), None)


def _channel_factor(ctx: Ctx, x: TensorInfo, axis: int, why: str) -> Factor | None:
    """The 1-D factor of `axis`; a factor spanning more axes than that is frozen."""
    factor = _factor_on(x.cmap, axis)
    if factor is not None and factor.axes != (axis,):
        ctx.uf.freeze(factor.ids, why)
        return None
    return factor


# --- element-wise -------------------------------------------------------------------------
def elementwise(ctx: Ctx, node: torch.fx.Node) -> list[Factor]:
    out = _out_shape(node)
    infos = ctx.tensor_args(node)
    shapes, cmaps = [], []
    for info in infos:
        offset = len(out) - len(info.shape)
        if offset < 0:
            return default_rule(ctx, node)
        shapes.append((1,) * offset + info.shape)
        cmaps.append(layout.permute(info.cmap, {a: a + offset for a in range(len(info.shape))}))
    return layout.merge(ctx.uf, shapes, cmaps, f"element-wise {describe_node(node)} with an untracked tensor")


def passthrough(ctx: Ctx, node: torch.fx.Node) -> list[Factor]:
    infos = ctx.tensor_args(node)
    if not infos or infos[0].shape != _out_shape(node):
        return default_rule(ctx, node)
    return elementwise(ctx, node) if len(infos) > 1 else infos[0].cmap


UNARY = [
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LeakyReLU,
    nn.ELU, nn.Mish, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity,
    nn.Hardtanh, nn.Softplus, nn.CELU, nn.SELU,
    ops.RELU, ops.HARDTANH, ops.GELU, ops.SILU, ops.HARDSWISH, ops.HARDSIGMOID, ops.SIGMOID, ops.TANH, ops.DROPOUT,
    ops.LEAKY_RELU, ops.EXP, ops.SQRT, ops.RSQRT, ops.ABS, ops.ERF, ops.NEG, ops.CLAMP, ops.ZEROS_LIKE,
    ops.ONES_LIKE, ops.FULL_LIKE, ops.CLONE, ops.CONTIGUOUS, ops.CAST, ops.DETACH,
    F.relu6, F.elu, F.mish, F.softplus, torch.empty_like, torch.rand_like, torch.randn_like,
    torchvision.ops.stochastic_depth, aten.alias, aten.lift_fresh_copy,
]
BINARY = [
    ops.ADD, ops.SUB, ops.MUL, ops.DIV, ops.POW, ops.RSUB, ops.WHERE, ops.MAXIMUM, ops.MINIMUM, ops.MASKED_FILL,
    ops.EQ, ops.NE, ops.LT, ops.LE, ops.GT, ops.GE, ops.AND, ops.OR, operator.floordiv,
]
rule(*UNARY)(passthrough)
rule(*BINARY)(elementwise)


@rule(nn.PReLU)
def prelu(ctx: Ctx, node: torch.fx.Node) -> list[Factor]:
    x = ctx.info(node.args[0])
    module = ctx.modules[node.target]
    if module.num_parameters == 1:
        return x.cmap
    channel = _channel_factor(ctx, x, 1, "PReLU on a reshaped channel axis")
    ids = ctx.param_ids(f"{node.target}.weight", 0, "norm", node.target)
    if channel is None:
        ctx.uf.freeze(ids, "PReLU over untracked channels")
        return x.cmap
    ctx.uf.union_arrays(channel.ids, ids)
    return x.cmap


# --- convolution and linear -------------------------------------------------------------
def conv(ctx: Ctx, node: torch.fx.Node, x: TensorInfo, weight: str, bias: str | None, groups: int,
         layer: str, transposed: bool = False) -> list[Factor]:
    """A convolution's weight is (out, in/groups, k...), a transposed convolution's (in, out/groups, k...)."""
    source = _channel_factor(ctx, x, 1, f"{layer} reads a reshaped channel axis")
    for factor in x.cmap:
        if factor is not source:
            ctx.uf.freeze(factor.ids, f"{layer} mixes spatial positions")
    in_dim, out_dim = (0, 1) if transposed else (1, 0)
    if transposed and groups > 1:
        # weight dim 1 holds one group's outputs and is shared by all groups: no slot of it
        # can stand for an output channel, so the outputs get ids of their own
        out_ids = ctx.uf.new(_out_shape(node)[1])
    else:
        out_ids = ctx.param_ids(weight, out_dim, "out", layer)
    if source is not None and (groups == 1 or transposed):  # a grouped conv's weight dim 1 is per group
        ctx.uf.union_arrays(source.ids, ctx.param_ids(weight, in_dim, "in", layer))
    if groups > 1 and source is None:
        ctx.uf.freeze(out_ids, f"grouped {layer} reads untracked channels")
    elif groups > 1:
        # Grouped and depthwise convolutions lose whole groups: input and output channels
        # of group g form one class, and `groups` shrinks with them.
        rows_in = source.ids.reshape(groups, -1)
        rows_out = out_ids.reshape(groups, -1)
        for row_in, row_out in zip(rows_in, rows_out, strict=True):
            ctx.uf.union_all(np.concatenate([row_in, row_out]))
        ctx.patch(node, "groups", rows=rows_in[:, 0].copy())
    if bias is not None:
        ctx.uf.union_arrays(ctx.param_ids(bias, 0, "out", layer), out_ids)
    return [Factor((1,), out_ids)]


@rule(nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def conv_module(ctx: Ctx, node: torch.fx.Node) -> list[Factor]:
    module = ctx.modules[node.target]
    bias = f"{node.target}.bias" if module.bias is not None else None
    return conv(ctx, node, ctx.info(node.args[0]), f"{node.target}.weight", bias, module.groups, node.target,
                transposed=module.transposed)


@rule(ops.CONV, ops.CONV_TRANSPOSE)
def conv_function(ctx: Ctx, node: torch.fx.Node) -> list[Factor]:
    weight, bias = ctx.param_name(node_arg(node, 1, "weight")), ctx.param_name(node_arg(node, 2, "bias"))
    if weight is None:
        return default_rule(ctx, node)
    index = 8 if node.target is aten.convolution.default else 6  # conv and conv_transpose: groups at 6
    groups = ctx.value(node_arg(node, index, "groups", 1))
    transposed = ops.op_key(node.target) is ops.CONV_TRANSPOSE or is_transposed(node)
    return conv(ctx, node, ctx.info(node.args[0]), weight, bias, groups, weight.rsplit(".", 1)[0], transposed)


def linear(ctx: Ctx, node: torch.fx.Node, x: TensorInfo, weight: str, bias: str | None, layer: str,
           weight_in_dim: int = 1) -> list[Factor]:
    last = len(x.shape) - 1
    source = _channel_factor(ctx, x, last, f"{layer} reads a reshaped feature axis")
    if source is not None:
        ctx.uf.union_arrays(source.ids, ctx.param_ids(weight, weight_in_dim, "in", layer))
    out_ids = ctx.param_ids(weight, 1 - weight_in_dim, "out", layer)
    if bias is not None:
        ctx.uf.union_arrays(ctx.param_ids(bias, 0, "out", layer), out_ids)
    kept = [f for f in x.cmap if last not in f.axes]
    return [*kept, Factor((len(_out_shape(node)) - 1,), out_ids)]


@rule(nn.Linear)
def linear_module(ctx: Ctx, node: torch.fx.Node) -> list[Factor]:
    module = ctx.modules[node.target]
    bias = f"{node.target}.bias" if module.bias is not None else None
    return linear(ctx, node, ctx.info(node.args[0]), f"{node.target}.weight", bias, node.target)


@rule(ops.LINEAR)
def linear_function(ctx: Ctx, node: torch.fx.Node) -> list[Factor]:
    weight, bias = ctx.param_name(node_arg(node, 1, "weight")), ctx.param_name(node_arg(node, 2, "bias"))
    if weight is None:
        return default_rule(ctx, node)
    return linear(ctx, node, ctx.info(node.args[0]), weight, bias, weight.rsplit(".", 1)[0])


@rule(ops.ADDMM)
def addmm(ctx: Ctx, node: torch.fx.Node) -> list[Factor]:
    """bias + x @ W with W stored (in, out): Hugging Face Conv1D (GPT-2)."""
    bias, weight = ctx.param_name(node.args[0]), ctx.param_name(node.args[2])
    if weight is None or bias is None:
        return default_rule(ctx, node)
    return linear(ctx, node, ctx.info(node.args[1]), weight, bias, weight.rsplit(".", 1)[0], weight_in_dim=0)


@rule(nn.Embedding)
def embedding_module(ctx: Ctx, node: torch.fx.Node) -> list[Factor]:
    return [Factor((len(_out_shape(node)) - 1,), ctx.param_ids(f"{node.target}.weight", 1, "out", node.target))]


@rule(ops.EMBEDDING)
def embedding_function(ctx: Ctx, node: torch.fx.Node) -> list[Factor]:
    weight = ctx.param_name(node.args[0] if node.target is aten.embedding.default else node_arg(node, 1, "weight"))
    if weight is None:
        return default_rule(ctx, node)
    return [Factor((len(_out_shape(node)) - 1,), ctx.param_ids(weight, 1, "out", weight.rsplit(".", 1)[0]))]


# --- normalisation ----------------------------------------------------------------------
def norm(ctx: Ctx, node: torch.fx.Node, x: TensorInfo, params: list[str | None], axis: int, layer: str,
         groups: int = 1) -> list[Factor]:
    source = _channel_factor(ctx, x, axis, f"{layer} normalises a reshaped channel axis")
    names = [p for p in params if p is not None]
    if source is None:
        for name in names:
            ctx.uf.freeze(ctx.param_ids(name, 0, "norm", layer), f"{layer} normalises untracked channels")
        return x.cmap
    for name in names:
        ctx.uf.union_arrays(source.ids, ctx.param_ids(name, 0, "norm", layer))
    if groups > 1:  # GroupNorm keeps equal groups: remove whole groups
        rows = source.ids.reshape(groups, -1)
        for row in rows:
            ctx.uf.union_all(row)
        ctx.patch(node, "norm_groups", rows=rows[:, 0].copy())
    return x.cmap


def _module_params(node: torch.fx.Node, module: nn.Module, names: list[str]) -> list[str | None]:
    return [f"{node.target}.{n}" if getattr(module, n, None) is not None else None for n in names]


@rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
def batchnorm_module(ctx: Ctx, node: torch.fx.Node) -> list[Factor]:
    module = ctx.modules[node.target]
    params = _module_params(node, module, ["weight", "bias", "running_mean", "running_var"])
    return norm(ctx, node, ctx.info(node.args[0]), params, 1, node.target)


@rule(nn.GroupNorm)
def groupnorm_module(ctx: Ctx, node: torch.fx.Node) -> list[Factor]:
    module = ctx.modules[node.target]
    params = _module_params(node, module, ["weight", "bias"])
    return norm(ctx, node, ctx.info(node.args[0]), params, 1, node.target, module.num_groups)


@rule(nn.LayerNorm)
def layernorm_module(ctx: Ctx, node: torch.fx.Node) -> list[Factor]:
    module = ctx.modules[node.target]
    return _layernorm(ctx, node, ctx.info(node.args[0]), len(module.normalized_shape),
                      _module_params(node, module, ["weight", "bias"]), node.target)


@rule(ops.LAYER_NORM)
def layernorm_function(ctx: Ctx, node: torch.fx.Node) -> list[Factor]:
    params = [ctx.param_name(node_arg(node, 2, "weight")), ctx.param_name(node_arg(node, 3, "bias"))]
    dims = len(ctx.value(node_arg(node, 1, "normalized_shape")))
    layer = next((p.rsplit(".", 1)[0] for p in params if p), node.name)
    return _layernorm(ctx, node, ctx.info(node.args[0]), dims, params, layer)


def _layernorm(ctx: Ctx, node: torch.fx.Node, x: TensorInfo, dims: int, params: list[str | None],
               layer: str) -> list[Factor]:
    last = len(x.shape) - 1
    if dims != 1:
        for axis in range(len(x.shape) - dims, len(x.shape)):
            ctx.freeze([f for f in x.cmap if axis in f.axes], f"{layer} normalises several axes")
        return [f for f in x.cmap if all(a < len(x.shape) - dims for a in f.axes)]
    cmap = norm(ctx, node, x, params, last, layer)
    if _factor_on(cmap, last) is not None:
        ctx.patch(node, "normalized_shape", axis=last)
    return cmap


@rule(ops.BATCH_NORM)
def batchnorm_function(ctx: Ctx, node: torch.fx.Node) -> object:
    if node.target in (F.batch_norm,):
        names = [node_arg(node, 3, "weight"), node_arg(node, 4, "bias"), node.args[1], node.args[2]]
    else:
        names = [node.args[1], node.args[2], node.args[3], node.args[4]]
    params = [ctx.param_name(n) for n in names]
    layer = next((p.rsplit(".", 1)[0] for p in params if p), node.name)
    cmap = norm(ctx, node, ctx.info(node.args[0]), params, 1, layer)
    shape = node.meta["sfx_shape"]
    return (cmap, *([] for _ in shape[1:])) if isinstance(shape, list) else cmap


@rule(ops.GROUP_NORM)
def groupnorm_function(ctx: Ctx, node: torch.fx.Node) -> list[Factor]:
    groups = ctx.value(node.args[1])
    params = [ctx.param_name(node_arg(node, 2, "weight")), ctx.param_name(node_arg(node, 3, "bias"))]
    layer = next((p.rsplit(".", 1)[0] for p in params if p), node.name)
    return norm(ctx, node, ctx.info(node.args[0]), params, 1, layer, groups)


# --- spatial ops: channels pass, spatial axes are no channels ------------------------------
@rule(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
      nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.Upsample,
      nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, ops.MAX_POOL, ops.AVG_POOL, ops.ADAPTIVE_AVG_POOL,
      ops.ADAPTIVE_MAX_POOL, ops.INTERPOLATE, torch.avg_pool1d)
def spatial(ctx: Ctx, node: torch.fx.Node) -> object:
    x = ctx.info(node.args[0])
    keep = [f for f in x.cmap if all(a < 2 for a in f.axes)]
    ctx.freeze([f for f in x.cmap if f not in keep], f"{describe_node(node)} mixes a channel axis")
    shape = node.meta["sfx_shape"]
    return (keep, *([] for _ in shape[1:])) if isinstance(shape, list) else keep


@rule(ops.PAD)
def pad(ctx: Ctx, node: torch.fx.Node) -> list[Factor]:
    x = ctx.info(node.args[0])
    widths = ctx.value(node_arg(node, 1, "pad"))
    padded = {len(x.shape) - 1 - i // 2 for i, w in enumerate(widths) if w}
    keep = [f for f in x.cmap if not set(f.axes) & padded]
    ctx.freeze([f for f in x.cmap if f not in keep], "padding along a channel axis")
    return keep


# --- softmax and reductions ---------------------------------------------------------------
@rule(nn.Softmax, nn.LogSoftmax, ops.SOFTMAX, ops.LOG_SOFTMAX)
def softmax(ctx: Ctx, node: torch.fx.Node) -> list[Factor]:
    x = ctx.info(node.args[0])
    dim = ctx.modules[node.target].dim if node.op == "call_module" else ctx.value(node_arg(node, 1, "dim"))
    axis = _axis(dim, len(x.shape))
    touched = [f for f in x.cmap if axis in f.axes]
    ctx.freeze(touched, f"{describe_node(node)} normalises over channels")
    return [f for f in x.cmap if f not in touched]


@rule(ops.MEAN, ops.SUM, ops.AMAX)
def reduction(ctx: Ctx, node: torch.fx.Node) -> list[Factor]:
    x = ctx.info(node.args[0])
    dims = ctx.value(node_arg(node, 1, "dim"))
    if dims is None or dims == []:
        return default_rule(ctx, node)
    dims = {_axis(d, len(x.shape)) for d in (dims if isinstance(dims, (list, tuple)) else [dims])}
    touched = [f for f in x.cmap if set(f.axes) & dims]
    ctx.freeze(touched, f"{describe_node(node)} reduces over channels")
    if ctx.value(node_arg(node, 2, "keepdim", False)):
        return [f for f in x.cmap if f not in touched]
    mapping = {a: a - sum(d < a for d in dims) for a in range(len(x.shape)) if a not in dims}
    return layout.permute([f for f in x.cmap if f not in touched], mapping)


# --- reshape, permute ----------------------------------------------------------------------
def _reshape(ctx: Ctx, node: torch.fx.Node, patch: bool) -> list[Factor]:
    x = ctx.info(node.args[0])
    out = _out_shape(node)
    cmap = layout.reshape(ctx.uf, x.shape, out, x.cmap, f"{describe_node(node)} mixes channel axes")
    # copies meeting real channels on one axis (a GQA kv head repeated): the channels decide
    shared = [f for f in cmap if set(f.ids.ravel().tolist()) <= ctx.replicas
              and any(g is not f and set(g.axes) & set(f.axes) for g in cmap)]
    cmap = [f for f in cmap if not any(f is g for g in shared)]
    if patch:
        _guard_sizes(ctx, node, cmap)
        if cmap:
            ctx.patch(node, "shape", factors=cmap)
    return cmap


def _guard_sizes(ctx: Ctx, node: torch.fx.Node, cmap: list[Factor]) -> None:
    """A size read from a channel axis that lands on an untracked axis would go stale
    after pruning: keep those channels."""
    rest = node.args[1:]
    elements = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else list(rest)
    if len(elements) == 1 and isinstance(elements[0], torch.fx.Node):
        positions = [(None, elements[0])]  # a whole shape computed by the graph
    else:
        positions = list(enumerate(elements))
    tracked = {a for f in cmap for a in f.axes}
    for position, element in positions:
        for tensor, dim in ctx.size_origins.get(element, set()) if isinstance(element, torch.fx.Node) else ():
            source = ctx.info(tensor)
            for factor in source.cmap if source else []:
                axes = factor.axes if dim is None else [dim] if dim in factor.axes else []
                for axis in axes:
                    landing = axis if position is None else position
                    if landing not in tracked:
                        ctx.uf.freeze(factor.ids, f"{describe_node(node)} reuses a channel count")


@rule(ops.RESHAPE, ops.UNFLATTEN, nn.Unflatten)
def reshape_with_sizes(ctx: Ctx, node: torch.fx.Node) -> list[Factor]:
    return _reshape(ctx, node, patch=node.op != "call_module")


@rule(ops.FLATTEN, nn.Flatten, ops.SQUEEZE, ops.UNSQUEEZE)
def reshape_without_sizes(ctx: Ctx, node: torch.fx.Node) -> list[Factor]:
    return _reshape(ctx, node, patch=False)


@rule(ops.PERMUTE, ops.TRANSPOSE, ops.MATRIX_T)
def permute(ctx: Ctx, node: torch.fx.Node) -> list[Factor]:
    x = ctx.info(node.args[0])
    ndim = len(x.shape)
    rest = [ctx.value(a) for a in node.args[1:]]
    name = getattr(node.target, "__name__", str(node.target))
    if "permute" in name:
        order = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
        order = [_axis(d, ndim) for d in order]
    else:
        order = list(range(ndim))
        a, b = (0, 1) if not rest else (_axis(rest[0], ndim), _axis(rest[1], ndim))
        order[a], order[b] = order[b], order[a]
    return layout.permute(x.cmap, {old: new for new, old in enumerate(order)})


@rule(ops.EXPAND, "expand_as")
def expand(ctx: Ctx, node: torch.fx.Node) -> list[Factor]:
    x = ctx.info(node.args[0])
    out = _out_shape(node)
    offset = len(out) - len(x.shape)
    cmap = [f for f in layout.permute(x.cmap, {a: a + offset for a in range(len(x.shape))})
            if all(out[a] == n for a, n in zip(f.axes, f.ids.shape, strict=True))]
    for axis in range(offset, len(out)):  # copies of a size-1 axis: ids of their own (see Ctx.replicas)
        if x.shape[axis - offset] == 1 < out[axis] and _factor_on(cmap, axis) is None:
            cmap.append(Factor((axis,), ctx.uf.new(out[axis])))
            ctx.replicas.update(cmap[-1].ids.tolist())
    if node.target != "expand_as":
        _guard_sizes(ctx, node, cmap)
        if cmap:
            ctx.patch(node, "shape", factors=cmap)
    return cmap


# --- concat, split, indexing ----------------------------------------------------------------
@rule(ops.CAT)
def cat(ctx: Ctx, node: torch.fx.Node) -> list[Factor]:
    infos = [ctx.info(t) for t in node_arg(node, 0, "tensors")]
    if any(i is None for i in infos):
        return default_rule(ctx, node)
    out = _out_shape(node)
    axis = _axis(ctx.value(node_arg(node, 1, "dim", 0)), len(out))
    pieces, tracked = [], False
    others_shapes, others_cmaps = [], []
    for info in infos:
        own = _channel_factor(ctx, info, axis, "concat along a reshaped channel axis")
        tracked |= own is not None
        pieces.append(own.ids if own is not None else None)
        others_shapes.append(tuple(1 if a == axis else s for a, s in enumerate(info.shape)))
        others_cmaps.append([f for f in info.cmap if axis not in f.axes])
    merged = layout.merge(ctx.uf, others_shapes, others_cmaps, "concat with an untracked tensor")
    if not tracked:
        return merged
    ids = []
    for info, piece in zip(infos, pieces, strict=True):
        if piece is None:  # untracked part (e.g. the image itself): its slice cannot move
            piece = ctx.uf.new(info.shape[axis])
            ctx.uf.freeze(piece, "concatenated with an untracked tensor")
        ids.append(piece)
    return [*merged, Factor((axis,), np.concatenate(ids))]


@rule(ops.STACK)
def stack(ctx: Ctx, node: torch.fx.Node) -> list[Factor]:
    infos = [ctx.info(t) for t in node_arg(node, 0, "tensors")]
    if any(i is None for i in infos):
        return default_rule(ctx, node)
    axis = _axis(ctx.value(node_arg(node, 1, "dim", 0)), len(_out_shape(node)))
    merged = layout.merge(ctx.uf, [i.shape for i in infos], [i.cmap for i in infos], "stack with an untracked tensor")
    return layout.permute(merged, {a: a + (a >= axis) for a in range(len(infos[0].shape))})


@rule(ops.SPLIT, ops.CHUNK, ops.TENSOR_SPLIT)
def split(ctx: Ctx, node: torch.fx.Node) -> tuple:
    """Pieces along one axis keep their slice of its ids (unbind, which drops the axis, is unknown: frozen)."""
    x = ctx.info(node.args[0])
    shapes = node.meta["sfx_shape"]
    if any(len(s) != len(x.shape) for s in shapes):
        return default_rule(ctx, node)
    axis = _axis(ctx.value(node_arg(node, 2, "dim", 0)), len(x.shape))
    own = _channel_factor(ctx, x, axis, "split of a reshaped channel axis")
    others = [f for f in x.cmap if f is not own]
    if own is None:
        return tuple(list(others) for _ in shapes)
    bounds = np.cumsum([0] + [s[axis] for s in shapes])
    parts = [own.ids[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    ctx.patch(node, "split", parts=parts, axis=axis)
    return tuple([*others, Factor((axis,), part)] for part in parts)


@rule(operator.getitem)
def getitem(ctx: Ctx, node: torch.fx.Node) -> object:
    source, raw = node.args[0], node.args[1]
    if any(ctx.info(i) is not None for i in (raw if isinstance(raw, (tuple, list)) else [raw])):
        return default_rule(ctx, node)  # advanced (tensor) indexing
    index = ctx.value(raw)
    parent = ctx.env.get(source) if isinstance(source, torch.fx.Node) else None
    if isinstance(parent, tuple):
        return parent[index] if isinstance(index, int) else default_rule(ctx, node)
    x = ctx.info(source)
    if x is None:
        return default_rule(ctx, node)
    return _index(ctx, node, x, index if isinstance(index, tuple) else (index,))


def _index(ctx: Ctx, node: torch.fx.Node, x: TensorInfo, index: tuple) -> list[Factor]:
    if any(not isinstance(i, (int, slice, type(None), type(Ellipsis))) for i in index):
        return default_rule(ctx, node)
    if Ellipsis in index:
        at = index.index(Ellipsis)
        fill = len(x.shape) - (len(index) - 1 - sum(i is None for i in index))
        index = index[:at] + (slice(None),) * fill + index[at + 1:]
    mapping, sliced, axis_in, axis_out = {}, {}, 0, 0
    for item in index:
        if item is None:
            axis_out += 1
            continue
        if isinstance(item, int):
            ctx.freeze([f for f in x.cmap if axis_in in f.axes], "indexing a single channel")
        else:
            mapping[axis_in] = axis_out
            if item != slice(None):
                sliced[axis_in] = item
            axis_out += 1
        axis_in += 1
    for rest in range(axis_in, len(x.shape)):
        mapping[rest] = axis_out + rest - axis_in
    return _slice_layout(ctx, node, x, mapping, sliced)


def _slice_layout(ctx: Ctx, node: torch.fx.Node, x: TensorInfo, mapping: dict[int, int],
                  sliced: dict[int, slice]) -> list[Factor]:
    out = []
    for factor in x.cmap:
        if not set(factor.axes) <= set(mapping):
            continue
        cut = [a for a in factor.axes if a in sliced]
        if not cut:
            out.append(factor.moved(mapping))
            continue
        s = sliced[cut[0]]
        whole = layout.drop_whole_axes(ctx.uf, factor, cut) if len(factor.axes) > 1 else None
        if whole is not None:  # a slice inside each unit (rotate_half's halves of a head): units stay whole
            out.append(whole.moved(mapping))
            continue
        if len(factor.axes) > 1 or (s.step or 1) != 1:
            ctx.uf.freeze(factor.ids, "strided or multi-axis slice of channels")
            continue
        start, stop, _ = s.indices(x.shape[cut[0]])
        ctx.patch(node, "slice", axis=mapping[cut[0]], ids=factor.ids, start=start, stop=stop, in_axis=cut[0])
        out.append(Factor((mapping[cut[0]],), factor.ids[start:stop]))
    return out


@rule(aten.slice)
def aten_slice(ctx: Ctx, node: torch.fx.Node) -> list[Factor]:
    x = ctx.info(node.args[0])
    axis = _axis(ctx.value(node_arg(node, 1, "dim", 0)), len(x.shape))
    start, stop, step = (ctx.value(node_arg(node, i, n, d)) for i, n, d in ((2, "start", None), (3, "end", None),
                                                                         (4, "step", 1)))
    mapping = {a: a for a in range(len(x.shape))}
    whole = (start in (None, 0)) and (stop is None or stop >= x.shape[axis]) and step == 1
    return _slice_layout(ctx, node, x, mapping, {} if whole else {axis: slice(start, stop, step)})


@rule(aten.select)
def aten_select(ctx: Ctx, node: torch.fx.Node) -> list[Factor]:
    x = ctx.info(node.args[0])
    axis = _axis(ctx.value(node.args[1]), len(x.shape))
    ctx.freeze([f for f in x.cmap if axis in f.axes], "indexing a single channel")
    mapping = {a: a - (a > axis) for a in range(len(x.shape)) if a != axis}
    return [f.moved(mapping) for f in x.cmap if axis not in f.axes]


# --- matmul and attention ------------------------------------------------------------------
def _matmul_layout(ctx: Ctx, a: TensorInfo, b: TensorInfo, out: tuple[int, ...], why: str) -> list[Factor] | None:
    """a (..., n, k) @ b (..., k, m): batch axes meet element-wise, k is contracted.

    Coordinates: the output axes plus one extra, K, for the contracted axis. A factor
    spanning K and an output axis (a head split over k) collapses: the head is whole."""
    if len(a.shape) < 2 or len(b.shape) < 2:
        return None
    nd, contracted = len(out), len(out)

    def place(info: TensorInfo, row_axis: int, col_axis: int) -> tuple[tuple[int, ...], list[Factor]]:
        n = len(info.shape)
        mapping = {i: i + nd - n for i in range(n - 2)}
        mapping[n - 2], mapping[n - 1] = row_axis, col_axis
        shape = [1] * (nd + 1)
        for i, size in enumerate(info.shape):
            shape[mapping[i]] = size
        return tuple(shape), layout.permute(info.cmap, mapping)

    shape_a, cmap_a = place(a, nd - 2, contracted)
    shape_b, cmap_b = place(b, contracted, nd - 1)
    merged = layout.merge(ctx.uf, [shape_a, shape_b], [cmap_a, cmap_b], why)
    result = []
    for factor in merged:
        if contracted in factor.axes:
            factor = layout.collapse_axis(ctx.uf, factor, contracted)
        if factor is not None:
            result.append(factor)
    return result


@rule(ops.MATMUL)
def matmul(ctx: Ctx, node: torch.fx.Node) -> list[Factor]:
    a, b = ctx.info(node.args[0]), ctx.info(node.args[1])
    if a is None or b is None:
        return default_rule(ctx, node)
    result = _matmul_layout(ctx, a, b, _out_shape(node), f"{describe_node(node)} with an untracked operand")
    return default_rule(ctx, node) if result is None else result


@rule(ops.ATTENTION)
def attention(ctx: Ctx, node: torch.fx.Node) -> list[Factor]:
    """softmax(q @ k^T + mask) @ v: q/k meet per head and feature, heads tie to v's heads."""
    q, k, v = (ctx.info(node_arg(node, i, n)) for i, n in enumerate(("query", "key", "value")))
    mask = ctx.info(node_arg(node, 3, "attn_mask"))
    why = "attention with an untracked operand"
    nd = len(q.shape)
    k_t = TensorInfo(k.node, k.shape[:-2] + (k.shape[-1], k.shape[-2]),
                     layout.permute(k.cmap, {**{i: i for i in range(nd - 2)}, nd - 2: nd - 1, nd - 1: nd - 2}))
    scores_shape = q.shape[:-1] + (k.shape[-2],)
    scores = _matmul_layout(ctx, q, k_t, scores_shape, why)
    if mask is not None:
        offset = nd - len(mask.shape)
        mask_shape = (1,) * offset + mask.shape
        mask_cmap = layout.permute(mask.cmap, {a: a + offset for a in range(len(mask.shape))})
        scores = layout.merge(ctx.uf, [scores_shape, mask_shape], [scores, mask_cmap], why)
    softmaxed = [f for f in scores if nd - 1 not in f.axes]
    ctx.freeze([f for f in scores if f not in softmaxed], "attention softmax over channels")
    probs = TensorInfo(node, scores_shape, softmaxed)
    return _matmul_layout(ctx, probs, v, _out_shape(node), why)
