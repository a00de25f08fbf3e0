"""Analysis pass: cost facts per node (needs `ShapeProp` facts first).

Facts written (node.meta):
- ``sfx_macs``: multiply-accumulates of the op (convolutions, linear layers, matmuls,
  attention); 0 for element-wise and data-movement ops.
- ``sfx_params``: number of parameter elements the node owns (call_module: the module's
  parameters; get_attr: the tensor's elements).
- ``sfx_bytes``: bytes read and written: tensor inputs + parameters + outputs.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

aten = torch.ops.aten


def _numel(shape: object) -> int:
    if isinstance(shape, list):
        return sum(_numel(s) for s in shape)
    return math.prod(shape) if shape is not None else 0


def _shape(arg: object) -> tuple | None:
    return arg.meta.get("sfx_shape") if isinstance(arg, torch.fx.Node) else None


def node_arg(node: torch.fx.Node, index: int, name: str, default: object = None) -> object:
    """Argument `name` of a call node, given positionally at `index` or by keyword."""
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _conv_fn(node: torch.fx.Node, gm: torch.fx.GraphModule) -> int:
    weight = _shape(node_arg(node, 1, "weight"))
    return _numel(node.meta["sfx_shape"]) * math.prod(weight[1:]) if weight else 0


def _linear_fn(node: torch.fx.Node, gm: torch.fx.GraphModule) -> int:
    weight = _shape(node_arg(node, 1, "weight"))
    return _numel(node.meta["sfx_shape"]) * weight[-1] if weight else 0


def _addmm(node: torch.fx.Node, gm: torch.fx.GraphModule) -> int:
    return _numel(node.meta["sfx_shape"]) * _shape(node.args[1])[-1]


def _matmul(node: torch.fx.Node, gm: torch.fx.GraphModule) -> int:
    a = _shape(node.args[0])
    return _numel(node.meta["sfx_shape"]) * a[-1] if a else 0


def _attention(node: torch.fx.Node, gm: torch.fx.GraphModule) -> int:
    q, k = _shape(node.args[0]), _shape(node.args[1])
    out = node.meta["sfx_shape"]
    return _numel(q[:-1]) * k[-2] * q[-1] + _numel(out) * k[-2]


def _conv_module(m: nn.Module, node: torch.fx.Node) -> int:
    return _numel(node.meta["sfx_shape"]) * m.weight.shape[1] * math.prod(m.weight.shape[2:])


def _linear_module(m: nn.Module, node: torch.fx.Node) -> int:
    return _numel(node.meta["sfx_shape"]) * m.in_features


def _mha_module(m: nn.MultiheadAttention, node: torch.fx.Node) -> int:
    query = _shape(node.args[0])
    tokens = _numel(query[:-1])
    length = query[1] if m.batch_first else query[0]
    return 4 * tokens * m.embed_dim * m.embed_dim + 2 * tokens * length * m.embed_dim


MODULE_MACS: dict[type, Callable[[nn.Module, torch.fx.Node], int]] = {
    nn.Conv1d: _conv_module, nn.Conv2d: _conv_module, nn.Conv3d: _conv_module,
    nn.Linear: _linear_module, nn.MultiheadAttention: _mha_module,
}
FUNCTION_MACS: dict[object, Callable[[torch.fx.Node, torch.fx.GraphModule], int]] = {
    F.conv1d: _conv_fn, F.conv2d: _conv_fn, F.conv3d: _conv_fn, F.linear: _linear_fn,
    torch.matmul: _matmul, operator.matmul: _matmul, torch.bmm: _matmul, torch.mm: _matmul,
    "matmul": _matmul, "bmm": _matmul, "mm": _matmul,
    F.scaled_dot_product_attention: _attention,
    aten.convolution: _conv_fn, aten.conv1d: _conv_fn, aten.conv2d: _conv_fn, aten.conv3d: _conv_fn,
    aten.linear: _linear_fn, aten.addmm: _addmm, aten.mm: _matmul, aten.bmm: _matmul,
    aten.matmul: _matmul, aten.scaled_dot_product_attention: _attention,
}


def target_key(node: torch.fx.Node) -> object:
    """Registry key of a call node: the function, aten packet, or method name."""
    if node.op == "call_method":
        return node.target
    if isinstance(node.target, torch._ops.OpOverload):
        return node.target.overloadpacket
    return node.target


def _dtype_bytes(dtype: object) -> int:
    if isinstance(dtype, list):
        return next((_dtype_bytes(d) for d in dtype if d is not None), 0)
    return dtype.itemsize if isinstance(dtype, torch.dtype) else 0


def _bytes_of(node: torch.fx.Node) -> int:
    return _numel(node.meta.get("sfx_shape")) * _dtype_bytes(node.meta.get("sfx_dtype"))


def annotate(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    for node in gm.graph.nodes:
        macs = params = param_bytes = 0
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            count = MODULE_MACS.get(type(module))
            macs = count(module, node) if count else 0
            tensors = list(module.parameters())
            params = sum(p.numel() for p in tensors)
            param_bytes = sum(p.numel() * p.element_size() for p in tensors)
        elif node.op in ("call_function", "call_method"):
            count = FUNCTION_MACS.get(target_key(node))
            macs = count(node, gm) if count else 0
        elif node.op == "get_attr":
            params = _numel(node.meta.get("sfx_shape"))
        inputs = sum(_bytes_of(a) for a in node.all_input_nodes if a.op != "get_attr")
        weights = sum(_bytes_of(a) for a in node.all_input_nodes if a.op == "get_attr")
        own = 0 if node.op in ("get_attr", "placeholder", "output") else _bytes_of(node)
        node.meta["sfx_macs"] = int(macs)
        node.meta["sfx_params"] = int(params)
        node.meta["sfx_bytes"] = int(inputs + weights + param_bytes + own)
    return gm


def total_macs(gm: torch.fx.GraphModule) -> int:
    return sum(n.meta.get("sfx_macs", 0) for n in gm.graph.nodes)
