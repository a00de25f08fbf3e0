"""Analysis pass: predicted latency of every node on a target (needs ShapeProp facts).

Each node maps, through the `KERNELS` op registry (`capture.ops`), to the kernels the compiled
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
import torchvision
from torch import nn

from sparsefx.capture import ops
from sparsefx.capture.annotate import is_transposed, node_arg, numel
from sparsefx.cost.fusion import EPILOGUE_RULES, FusionRules
from sparsefx.cost.kernel import Kernel, conv2d_kernel, matmul_kernel, matmul_of_shapes
from sparsefx.cost.model import CostModel

aten = torch.ops.aten
ShapeOf = Callable[[torch.fx.Node], object]
Handler = Callable[[torch.fx.Node, torch.fx.GraphModule, ShapeOf, int], list[Kernel]]


def _bytes(node: torch.fx.Node, shape_of: ShapeOf) -> int:
    tensors = [a for a in node.all_input_nodes if a.op != "get_attr"]
    return 4 * (sum(numel(shape_of(a)) for a in tensors) + numel(shape_of(node)))


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
    if is_transposed(node):  # priced like the transposed-conv modules: by its bytes
        return [Kernel("elementwise", (_bytes(node, shape_of),))]
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
        kernels.append(Kernel("elementwise", (8 * numel(out),)))
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
    return [matmul_of_shapes(a, b, out, lanes)]  # as the dispatch reads the same matmul off Relax


def _attention(node: torch.fx.Node, gm: torch.fx.GraphModule, shape_of: ShapeOf, lanes: int) -> list[Kernel]:
    """On 4-D inputs one fused attention, the workload the TVM backend imports and dispatches it as
    (`backends/tvm/importer.py`); otherwise its two matmuls and the softmax between."""
    q, k, out = shape_of(node.args[0]), shape_of(node.args[1]), shape_of(node)
    args = ops.attention_args(node)
    if len(q) == 4:
        b, heads, s, d = q
        return [Kernel("attention", (b, s, heads, d, k[-2], out[-1]),
                       (float(args.get("scale") or 0.0), float(bool(args.get("is_causal"))),
                        float(args.get("attn_mask") is not None)))]
    batch = math.prod(q[:-2])
    scores = batch * q[-2] * k[-2]
    return [matmul_kernel(batch, q[-2], q[-1], k[-2], lanes), Kernel("reduce", (8 * scores,)),
            matmul_kernel(batch, q[-2], k[-2], out[-1], lanes)]


KERNELS: ops.OpRegistry[Handler] = ops.OpRegistry("latency")
KERNELS.add(_conv_module, nn.Conv2d)
KERNELS.add(_linear_module, nn.Linear)
KERNELS.add(_conv_fn, ops.CONV)
KERNELS.add(_linear_fn, ops.LINEAR)
KERNELS.add(_addmm, ops.ADDMM)
KERNELS.add(_matmul, ops.MATMUL)
KERNELS.add(_attention, ops.ATTENTION)
KERNELS.add(_kind("elementwise"), nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid,
            nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.LeakyReLU, nn.Mish, nn.ELU)
KERNELS.add(_kind("reduce"), nn.LayerNorm, nn.GroupNorm, nn.Softmax, nn.LogSoftmax, ops.SOFTMAX, ops.LOG_SOFTMAX,
            ops.LAYER_NORM, ops.GROUP_NORM, ops.MEAN, ops.SUM, aten.native_layer_norm)
KERNELS.add(_kind("pool"), nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, ops.MAX_POOL,
            ops.AVG_POOL, ops.ADAPTIVE_AVG_POOL, ops.ADAPTIVE_MAX_POOL)
KERNELS.add(_free, nn.Dropout, nn.Identity, nn.Flatten, nn.Unflatten, operator.getitem, getattr, "dim", ops.SIZE,
            ops.DROPOUT, ops.RESHAPE, ops.FLATTEN, ops.UNFLATTEN, ops.SQUEEZE, ops.UNSQUEEZE, ops.EXPAND, ops.CAST,
            ops.CHUNK, ops.SPLIT, ops.DETACH, ops.CLONE, ops.CONTIGUOUS, aten.alias, aten.slice, aten.select,
            aten.lift_fresh_copy, aten._assert_tensor_metadata,
            torchvision.ops.stochastic_depth)  # identity at inference (EfficientNet's residual branches)


def node_kernels(node: torch.fx.Node, gm: torch.fx.GraphModule, shape_of: ShapeOf, lanes: int) -> list[Kernel]:
    """The kernels `node` runs, at the shapes `shape_of` gives (no fusion applied)."""
    if node.op in ("placeholder", "output", "get_attr") or not isinstance(shape_of(node), (tuple, list)):
        return []
    handler = KERNELS.lookup(node, gm) or _kind("elementwise")
    return handler(node, gm, shape_of, lanes)


# What a dispatched convolution's epilogue absorbs, in this order (see
# `backends.tvm.dispatch.epilogue_pass`): the bias (BN folds into it), one residual add, one
# activation that oneDNN applies as a post-op. Stage numbers say how far an epilogue has got.
_BIAS, _ADD, _ACT = 0, 1, 2
EPILOGUE: ops.OpRegistry[tuple[int, str]] = ops.OpRegistry("epilogue")
EPILOGUE.add((_BIAS, ""), nn.BatchNorm2d, ops.BATCH_NORM)
EPILOGUE.add((_ADD, ""), ops.ADD)
EPILOGUE.add((_ACT, "relu"), nn.ReLU, ops.RELU)
EPILOGUE.add((_ACT, "relu6"), nn.ReLU6, F.relu6, ops.HARDTANH)
EPILOGUE.add((_ACT, "silu"), nn.SiLU, ops.SILU)


SCALES: ops.OpRegistry[bool] = ops.OpRegistry("scale")  # an element-wise op that may scale a conv's input
SCALES.add(True, ops.MUL)


def _epilogue_step(node: torch.fx.Node, gm: torch.fx.GraphModule) -> tuple[int, str] | None:
    return EPILOGUE.lookup(node, gm)


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
    convolution's (activation, residual) for `Kernel.with_epilogue`; `hosts` the node whose kernel
    each fused node runs in."""

    fused: set[torch.fx.Node] = field(default_factory=set)
    epilogues: dict[torch.fx.Node, tuple[str, bool]] = field(default_factory=dict)
    hosts: dict[torch.fx.Node, torch.fx.Node] = field(default_factory=dict)


def analyze_fusion(gm: torch.fx.GraphModule, kernels: dict[torch.fx.Node, list[Kernel]],
                   rules: FusionRules = EPILOGUE_RULES) -> Fusion:
    """The fusion the backend whose `rules` these are applies (see `cost.fusion`)."""
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
        if _folds_into_conv(node, gm, kernels, rules):
            fusion.fused.add(node)  # its only user is the conv: nothing rides in it
            fusion.hosts[node] = next(iter(node.users))
            continue
        where = _producer_host(node, kinds, host)
        step = _epilogue_step(node, gm)
        if step and not _absorbed(step, rules):
            step = None
        if where and where[0] == "tir" and not _broadcasts_up(node, where[1]):
            fusion.fused.add(node)
            fusion.hosts[node] = where[1]
            host[node] = where
        elif where and where[0] == "conv" and step and (step[0] > where[2] or step[0] == where[2] == _BIAS):
            conv, (stage, act) = where[1], step
            fusion.fused.add(node)
            fusion.hosts[node] = conv
            host[node] = ("conv", conv, stage)
            old_act, residual = fusion.epilogues.get(conv, ("none", False))
            fusion.epilogues[conv] = (act or old_act, residual or stage == _ADD)
        else:
            host[node] = ("tir", node, 0)
    return fusion


def _broadcasts_up(node: torch.fx.Node, host: torch.fx.Node) -> bool:
    """Whether `node` writes more than the kernel it would ride in (squeeze-excite's x * s after the
    sigmoid of s): the fused kernel then moves `node`'s bytes, so `node` is priced as the kernel."""
    return numel(node.meta.get("sfx_shape")) > numel(host.meta.get("sfx_shape"))


def _absorbed(step: tuple[int, str], rules: FusionRules) -> bool:
    stage, act = step
    return stage == _BIAS or (stage == _ADD and rules.residual) or (stage == _ACT and act in rules.activations)


def _folds_into_conv(node: torch.fx.Node, gm: torch.fx.GraphModule, kernels: dict[torch.fx.Node, list[Kernel]],
                     rules: FusionRules) -> bool:
    """Whether `node` is a per-(image, channel) scale of a conv's input that the conv takes in (`scale_fold`)."""
    if rules.scale_fold is None or len(node.users) != 1 or SCALES.lookup(node, gm) is None:
        return False
    conv = next(iter(node.users))
    ks = kernels.get(conv, [])
    if len(ks) != 1 or ks[0].op != "conv2d" or conv.args[:1] != (node,) or not rules.scale_fold(ks[0]):
        return False
    shapes = sorted((a.meta.get("sfx_shape") for a in node.all_input_nodes if a.op != "get_attr"), key=len)
    x = node.meta.get("sfx_shape")
    return len(shapes) == 2 and isinstance(x, tuple) and len(x) == 4 and shapes[1] == x \
        and shapes[0] in ((*x[:2], 1, 1), (x[1], 1, 1))


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
    fusion = analyze_fusion(gm, dense_kernels(gm, cost.lanes), cost.fusion)
    shape = lambda n: n.meta.get("sfx_shape")
    total = 0.0
    for node in gm.graph.nodes:
        ms = sum(cost.latency(k) for k in priced_kernels(node, gm, shape, cost.lanes, fusion))
        node.meta["sfx_latency_ms"] = ms
        total += ms
    cost.save()
    return total
