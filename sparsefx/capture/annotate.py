"""Analysis pass: cost facts per node (needs `ShapeProp` facts first).

Facts written (node.meta):
- ``sfx_macs``: multiply-accumulates of the op (convolutions, transposed convolutions, linear
  layers, matmuls, attention); 0 for element-wise and data-movement ops. Counters live in the
  `MACS` op registry (see `capture.ops`), so a subclass of a counted module is counted too.
- ``sfx_params``: number of parameter elements the node owns (call_module: the module's
  parameters; get_attr: the tensor's elements).
- ``sfx_bytes``: bytes read and written: tensor inputs + parameters + outputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.fx
from torch import nn

from sparsefx.capture import ops

aten = torch.ops.aten
MacCounter = Callable[[torch.fx.Node, torch.fx.GraphModule], int]
MACS: ops.OpRegistry[MacCounter] = ops.OpRegistry("macs")


def numel(shape: object) -> int:
    """Elements of a shape, or of every shape of a list of them (tuple outputs); 0 for None."""
    if isinstance(shape, list):
        return sum(numel(s) for s in shape)
    return math.prod(shape) if shape is not None else 0


def _shape(arg: object) -> tuple | None:
    return arg.meta.get("sfx_shape") if isinstance(arg, torch.fx.Node) else None


def node_arg(node: torch.fx.Node, index: int, name: str, default: object = None) -> object:
    """Argument `name` of a call node, given positionally at `index` or by keyword."""
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def is_transposed(node: torch.fx.Node) -> bool:
    """A transposed convolution spelled as aten.convolution (its `transposed` argument)."""
    return node.target is aten.convolution.default and bool(node.args[6])


def _conv_macs(out: tuple, weight: tuple) -> int:
    # weight (out, in/groups, k...): every output element sums over one group's inputs x kernel
    return numel(out) * math.prod(weight[1:])


def _conv_transpose_macs(x: tuple, weight: tuple) -> int:
    # weight (in, out/groups, k...): every input element scatters into one group's outputs x kernel
    return numel(x) * math.prod(weight[1:])


@MACS.register(ops.CONV)
def conv_function(node: torch.fx.Node, gm: torch.fx.GraphModule) -> int:
    weight = _shape(node_arg(node, 1, "weight"))
    if not weight:
        return 0
    if is_transposed(node):
        return _conv_transpose_macs(_shape(node.args[0]), weight)
    return _conv_macs(node.meta["sfx_shape"], weight)


@MACS.register(ops.CONV_TRANSPOSE)
def conv_transpose_function(node: torch.fx.Node, gm: torch.fx.GraphModule) -> int:
    weight = _shape(node_arg(node, 1, "weight"))
    return _conv_transpose_macs(_shape(node.args[0]), weight) if weight else 0


@MACS.register(ops.LINEAR)
def linear_function(node: torch.fx.Node, gm: torch.fx.GraphModule) -> int:
    weight = _shape(node_arg(node, 1, "weight"))
    return numel(node.meta["sfx_shape"]) * weight[-1] if weight else 0


@MACS.register(ops.ADDMM)
def addmm(node: torch.fx.Node, gm: torch.fx.GraphModule) -> int:
    return numel(node.meta["sfx_shape"]) * _shape(node.args[1])[-1]


@MACS.register(ops.MATMUL)
def matmul(node: torch.fx.Node, gm: torch.fx.GraphModule) -> int:
    a = _shape(node.args[0])
    return numel(node.meta["sfx_shape"]) * a[-1] if a else 0


@MACS.register(ops.ATTENTION)
def attention(node: torch.fx.Node, gm: torch.fx.GraphModule) -> int:
    q, k = _shape(node.args[0]), _shape(node.args[1])
    out = node.meta["sfx_shape"]
    return numel(q[:-1]) * k[-2] * q[-1] + numel(out) * k[-2]


@MACS.register(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def conv_module(node: torch.fx.Node, gm: torch.fx.GraphModule) -> int:
    return _conv_macs(node.meta["sfx_shape"], gm.get_submodule(node.target).weight.shape)


@MACS.register(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def conv_transpose_module(node: torch.fx.Node, gm: torch.fx.GraphModule) -> int:
    return _conv_transpose_macs(_shape(node.args[0]), gm.get_submodule(node.target).weight.shape)


@MACS.register(nn.Linear)
def linear_module(node: torch.fx.Node, gm: torch.fx.GraphModule) -> int:
    return numel(node.meta["sfx_shape"]) * gm.get_submodule(node.target).weight.shape[1]


@MACS.register(nn.MultiheadAttention)
def multihead_attention_module(node: torch.fx.Node, gm: torch.fx.GraphModule) -> int:
    m = gm.get_submodule(node.target)
    query = _shape(node.args[0])
    tokens = numel(query[:-1])
    length = query[1] if m.batch_first else query[0]
    return 4 * tokens * m.embed_dim * m.embed_dim + 2 * tokens * length * m.embed_dim


def _dtype_bytes(dtype: object) -> int:
    if isinstance(dtype, list):
        return next((_dtype_bytes(d) for d in dtype if d is not None), 0)
    return dtype.itemsize if isinstance(dtype, torch.dtype) else 0


def _bytes_of(node: torch.fx.Node) -> int:
    return numel(node.meta.get("sfx_shape")) * _dtype_bytes(node.meta.get("sfx_dtype"))


def annotate(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    for node in gm.graph.nodes:
        params = param_bytes = 0
        count = MACS.lookup(node, gm)
        macs = count(node, gm) if count else 0
        if node.op == "call_module":
            tensors = list(gm.get_submodule(node.target).parameters())
            params = sum(p.numel() for p in tensors)
            param_bytes = sum(p.numel() * p.element_size() for p in tensors)
        elif node.op == "get_attr":
            params = numel(node.meta.get("sfx_shape"))
        inputs = sum(_bytes_of(a) for a in node.all_input_nodes if a.op != "get_attr")
        weights = sum(_bytes_of(a) for a in node.all_input_nodes if a.op == "get_attr")
        own = 0 if node.op in ("get_attr", "placeholder", "output") else _bytes_of(node)
        node.meta["sfx_macs"] = int(macs)
        node.meta["sfx_params"] = int(params)
        node.meta["sfx_bytes"] = int(inputs + weights + param_bytes + own)
    return gm


def total_macs(gm: torch.fx.GraphModule) -> int:
    return sum(n.meta.get("sfx_macs", 0) for n in gm.graph.nodes)
