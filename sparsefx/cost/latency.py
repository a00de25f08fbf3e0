"""Analysis pass: predicted latency of every node on a target (needs ShapeProp facts).

Each node maps, through a registry keyed like `annotate`'s, to the kernels the compiled
model runs for it: convolutions and matmuls (measured), element-wise, reduction and pooling
kernels (calibrated TIR), or nothing (views, sizes, dropout). An element-wise node whose
producer is a compute or element-wise node used by nothing else is fused into it (BN and
ReLU ride in a convolution's epilogue, chains of element-wise ops become one TIR kernel)
and costs nothing of its own.

Shapes come from a `shape_of(node)` callable, so the same pass prices the model as it is
and as it would be after channel removal (`ShrinkModel.shape`).

Facts written (node.meta) by `annotate_latency`:
- ``sfx_latency_ms``: predicted milliseconds of the node's kernels on the target.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from sparsefx.capture.annotate import _numel, node_arg, target_key
from sparsefx.cost.model import CostModel, Kernel, conv2d_kernel, matmul_kernel

aten = torch.ops.aten
ShapeOf = Callable[[torch.fx.Node], object]
Handler = Callable[[torch.fx.Node, torch.fx.GraphModule, ShapeOf, int], list[Kernel]]


def _bytes(node: torch.fx.Node, shape_of: ShapeOf) -> int:
    tensors = [a for a in node.all_input_nodes if a.op != "get_attr"]
    return 4 * (sum(_numel(shape_of(a)) for a in tensors) + _numel(shape_of(node)))


def _kind(kind: str) -> Handler:
    return lambda node, gm, shape_of, lanes: [Kernel(kind, (_bytes(node, shape_of),))]


def _free(node: torch.fx.Node, gm: torch.fx.GraphModule, shape_of: ShapeOf, lanes: int) -> list[Kernel]:
    return []


def _conv(node: torch.fx.Node, x: object, groups: int, w_shape: tuple, stride: object, padding: object,
          dilation: object, shape_of: ShapeOf, lanes: int) -> list[Kernel]:
    x_shape, out = shape_of(x), shape_of(node)
    if not (isinstance(x_shape, tuple) and len(x_shape) == 4 and isinstance(padding, (int, tuple, list))):
        return [Kernel("elementwise", (_bytes(node, shape_of),))]
    pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    if groups > 1:  # whole groups go: a grouped conv keeps its per-group width, loses groups
        groups = max(1, groups * x_shape[1] // x.meta["sfx_shape"][1])
    return [conv2d_kernel(x_shape, out, groups, tuple(w_shape[2:]), pair(stride), pair(padding), pair(dilation), lanes)]


def _conv_module(node: torch.fx.Node, gm: torch.fx.GraphModule, shape_of: ShapeOf, lanes: int) -> list[Kernel]:
    m = gm.get_submodule(node.target)
    return _conv(node, node.args[0], m.groups, tuple(m.weight.shape), m.stride, m.padding, m.dilation, shape_of, lanes)


def _conv_fn(node: torch.fx.Node, gm: torch.fx.GraphModule, shape_of: ShapeOf, lanes: int) -> list[Kernel]:
    weight = node_arg(node, 1, "weight")
    w_shape = weight.meta.get("sfx_shape") if isinstance(weight, torch.fx.Node) else None
    if node.target is aten.convolution.default:
        stride, padding, dilation, groups = node.args[3], node.args[4], node.args[5], node.args[8]
    else:
        stride, padding = node_arg(node, 3, "stride", 1), node_arg(node, 4, "padding", 0)
        dilation, groups = node_arg(node, 5, "dilation", 1), node_arg(node, 6, "groups", 1)
    if w_shape is None or len(w_shape) != 4:
        return [Kernel("elementwise", (_bytes(node, shape_of),))]
    return _conv(node, node.args[0], groups, w_shape, stride, padding, dilation, shape_of, lanes)


def _linear(node: torch.fx.Node, x: object, has_bias: bool, shape_of: ShapeOf, lanes: int) -> list[Kernel]:
    x_shape, out = shape_of(x), shape_of(node)
    if not isinstance(x_shape, tuple) or not isinstance(out, tuple):
        return []
    kernels = [matmul_kernel(1, math.prod(x_shape[:-1]), x_shape[-1], out[-1], lanes)]
    if has_bias:  # the bias add is its own TIR kernel after a dispatched matmul
        kernels.append(Kernel("elementwise", (8 * _numel(out),)))
    return kernels


def _linear_module(node: torch.fx.Node, gm: torch.fx.GraphModule, shape_of: ShapeOf, lanes: int) -> list[Kernel]:
    return _linear(node, node.args[0], gm.get_submodule(node.target).bias is not None, shape_of, lanes)


def _linear_fn(node: torch.fx.Node, gm: torch.fx.GraphModule, shape_of: ShapeOf, lanes: int) -> list[Kernel]:
    return _linear(node, node.args[0], node_arg(node, 2, "bias") is not None, shape_of, lanes)


def _addmm(node: torch.fx.Node, gm: torch.fx.GraphModule, shape_of: ShapeOf, lanes: int) -> list[Kernel]:
    return _linear(node, node.args[1], True, shape_of, lanes)


def _matmul(node: torch.fx.Node, gm: torch.fx.GraphModule, shape_of: ShapeOf, lanes: int) -> list[Kernel]:
    a, b = shape_of(node.args[0]), shape_of(node.args[1])
    out = shape_of(node)
    if not all(isinstance(s, tuple) and len(s) >= 2 for s in (a, b, out)):
        return [Kernel("elementwise", (_bytes(node, shape_of),))]
    return [matmul_kernel(math.prod(out[:-2]), out[-2], a[-1], out[-1], lanes)]


def _attention(node: torch.fx.Node, gm: torch.fx.GraphModule, shape_of: ShapeOf, lanes: int) -> list[Kernel]:
    q, k, out = shape_of(node.args[0]), shape_of(node.args[1]), shape_of(node)
    batch = math.prod(q[:-2])
    scores = batch * q[-2] * k[-2]
    return [matmul_kernel(batch, q[-2], q[-1], k[-2], lanes), Kernel("reduce", (8 * scores,)),
            matmul_kernel(batch, q[-2], k[-2], out[-1], lanes)]


ELEMENTWISE_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
                       nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.LeakyReLU, nn.Mish, nn.ELU)
REDUCE_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.Softmax, nn.LogSoftmax)
POOL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
FREE_MODULES = (nn.Dropout, nn.Identity, nn.Flatten, nn.Unflatten)

MODULES: dict[type, Handler] = {nn.Conv2d: _conv_module, nn.Linear: _linear_module}
MODULES.update(dict.fromkeys(ELEMENTWISE_MODULES, _kind("elementwise")))
MODULES.update(dict.fromkeys(REDUCE_MODULES, _kind("reduce")))
MODULES.update(dict.fromkeys(POOL_MODULES, _kind("pool")))
MODULES.update(dict.fromkeys(FREE_MODULES, _free))

FUNCTIONS: dict[object, Handler] = {
    F.conv2d: _conv_fn, aten.conv2d: _conv_fn, aten.convolution: _conv_fn,
    F.linear: _linear_fn, aten.linear: _linear_fn, aten.addmm: _addmm,
    torch.matmul: _matmul, operator.matmul: _matmul, torch.bmm: _matmul, torch.mm: _matmul,
    "matmul": _matmul, "bmm": _matmul, aten.mm: _matmul, aten.bmm: _matmul, aten.matmul: _matmul,
    F.scaled_dot_product_attention: _attention, aten.scaled_dot_product_attention: _attention,
}
for _fn in (F.softmax, F.log_softmax, F.layer_norm, F.group_norm, torch.softmax, torch.mean, torch.sum,
            "softmax", "mean", "sum", "log_softmax", aten.softmax, aten._softmax, aten.layer_norm,
            aten.native_layer_norm, aten.group_norm, aten.mean, aten.sum, aten._log_softmax):
    FUNCTIONS[_fn] = _kind("reduce")
for _fn in (F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, aten.max_pool2d,
            aten.avg_pool2d, aten.adaptive_avg_pool2d, aten.max_pool2d_with_indices, aten._adaptive_avg_pool2d):
    FUNCTIONS[_fn] = _kind("pool")
for _fn in (operator.getitem, getattr, torch.flatten, F.dropout, "size", "view", "reshape", "flatten", "unsqueeze",
            "squeeze", "expand", "dim", "type_as", "to", "float", "chunk", "split", torch.chunk, torch.split,
            torch.unsqueeze, torch.squeeze, torch.reshape, aten.view, aten.reshape, aten._unsafe_view,
            aten.unsqueeze, aten.squeeze, aten.expand, aten.dropout, aten.alias, aten.split, aten.split_with_sizes,
            aten.chunk, aten.slice, aten.select, aten.sym_size, aten.detach, aten.lift_fresh_copy, aten.flatten,
            aten.unflatten, aten._assert_tensor_metadata, aten.clone, aten.contiguous, "contiguous"):
    FUNCTIONS[_fn] = _free

COMPUTE_OPS = ("conv2d", "matmul")


def node_kernels(node: torch.fx.Node, gm: torch.fx.GraphModule, shape_of: ShapeOf, lanes: int) -> list[Kernel]:
    """The kernels `node` runs, at the shapes `shape_of` gives (no fusion applied)."""
    if node.op in ("placeholder", "output", "get_attr") or not isinstance(shape_of(node), (tuple, list)):
        return []
    if node.op == "call_module":
        handler = MODULES.get(type(gm.get_submodule(node.target)), _kind("elementwise"))
    else:
        handler = FUNCTIONS.get(target_key(node), _kind("elementwise"))
    return handler(node, gm, shape_of, lanes)


# What a dispatched convolution's epilogue absorbs, in this order (see
# `backends.tvm.dispatch.epilogue_pass`): the bias (BN folds into it), one residual add, one
# activation that oneDNN applies as a post-op. Stage numbers say how far an epilogue has got.
_BIAS, _ADD, _ACT = 0, 1, 2
EPILOGUE_MODULES: dict[type, tuple[int, str]] = {nn.BatchNorm2d: (_BIAS, ""), nn.ReLU: (_ACT, "relu"),
                                                 nn.ReLU6: (_ACT, "relu6"), nn.SiLU: (_ACT, "silu")}
EPILOGUE_FUNCTIONS: dict[object, tuple[int, str]] = {
    aten._native_batch_norm_legit_no_training: (_BIAS, ""), aten.batch_norm: (_BIAS, ""),
    **dict.fromkeys((operator.add, torch.add, operator.iadd, "add", "add_", aten.add, aten.add_), (_ADD, "")),
    **dict.fromkeys((F.relu, torch.relu, "relu", "relu_", aten.relu, aten.relu_), (_ACT, "relu")),
    **dict.fromkeys((F.relu6, aten.hardtanh, aten.hardtanh_), (_ACT, "relu6")),
    **dict.fromkeys((F.silu, aten.silu, aten.silu_), (_ACT, "silu")),
}


def _epilogue_step(node: torch.fx.Node, gm: torch.fx.GraphModule) -> tuple[int, str] | None:
    if node.op == "call_module":
        return EPILOGUE_MODULES.get(type(gm.get_submodule(node.target)))
    return EPILOGUE_FUNCTIONS.get(target_key(node))


def dense_kernels(gm: torch.fx.GraphModule, lanes: int) -> dict[torch.fx.Node, list[Kernel]]:
    """Every node's kernels at its traced shapes: the reference grid and the fusion structure."""
    shape = lambda n: n.meta.get("sfx_shape")
    return {n: node_kernels(n, gm, shape, lanes) for n in gm.graph.nodes}


@dataclass
class Fusion:
    """Which nodes run inside another node's kernel (structural: pruning keeps it).

    A convolution runs on PyTorch with an epilogue (bias, residual add, activation); anything
    else after it starts a TIR kernel, into which following element-wise ops fuse, as they do
    after matmuls (whose bias add is a TIR kernel), reductions and pools. `epilogues` gives each
    convolution's (activation, residual) for `Kernel.with_epilogue`."""

    fused: set[torch.fx.Node] = field(default_factory=set)
    epilogues: dict[torch.fx.Node, tuple[str, bool]] = field(default_factory=dict)


def analyze_fusion(gm: torch.fx.GraphModule, kernels: dict[torch.fx.Node, list[Kernel]]) -> Fusion:
    kinds = {n: [k.op for k in ks] for n, ks in kernels.items()}
    host: dict[torch.fx.Node, tuple[str, torch.fx.Node, int]] = {}  # node -> (kind, host node, stage)
    fusion = Fusion()
    for node in gm.graph.nodes:
        ops = kinds[node]
        if not ops:
            continue
        if ops != ["elementwise"]:
            host[node] = ("conv", node, _BIAS) if ops[-1] == "conv2d" else ("tir", node, 0)
            continue
        where = _producer_host(node, kinds, host)
        step = _epilogue_step(node, gm)
        if where and where[0] == "tir":
            fusion.fused.add(node)
            host[node] = where
        elif where and where[0] == "conv" and step and (step[0] > where[2] or step[0] == where[2] == _BIAS):
            conv, (stage, act) = where[1], step
            fusion.fused.add(node)
            host[node] = ("conv", conv, stage)
            old_act, residual = fusion.epilogues.get(conv, ("none", False))
            fusion.epilogues[conv] = (act or old_act, residual or stage == _ADD)
        else:
            host[node] = ("tir", node, 0)
    return fusion


def _producer_host(node: torch.fx.Node, kinds: dict, host: dict) -> tuple[str, torch.fx.Node, int] | None:
    """The kernel `node` could ride in: its first (for an add, either) tensor input's, when that
    input has no other user."""
    for producer in [a for a in node.all_input_nodes if a.op != "get_attr"][:2]:
        while not kinds.get(producer) and producer.op not in ("placeholder", "get_attr") \
                and len(producer.users) == 1 and producer.all_input_nodes:
            producer = producer.all_input_nodes[0]  # look through views: they compile to nothing
        if len(producer.users) == 1 and producer in host:
            return host[producer]
    return None


def priced_kernels(node: torch.fx.Node, gm: torch.fx.GraphModule, shape_of: ShapeOf, lanes: int,
                   fusion: Fusion) -> list[Kernel]:
    """The kernels the compiled model runs for `node`: none when fused, a conv with its epilogue."""
    if node in fusion.fused:
        return []
    kernels = node_kernels(node, gm, shape_of, lanes)
    epilogue = fusion.epilogues.get(node)
    return [k.with_epilogue(*epilogue) if epilogue and k.op == "conv2d" else k for k in kernels]


def annotate_latency(gm: torch.fx.GraphModule, cost: CostModel) -> float:
    """Write `sfx_latency_ms` on every node; returns the predicted end-to-end ms."""
    fusion = analyze_fusion(gm, dense_kernels(gm, cost.lanes))
    shape = lambda n: n.meta.get("sfx_shape")
    total = 0.0
    for node in gm.graph.nodes:
        ms = sum(cost.latency(k) for k in priced_kernels(node, gm, shape, cost.lanes, fusion))
        node.meta["sfx_latency_ms"] = ms
        total += ms
    cost.save()
    return total
