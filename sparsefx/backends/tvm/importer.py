"""Import a PyTorch model into Relax: torch.fx first, torch.export where fx cannot."""

from __future__ import annotations

import contextlib
import copy
import operator
import re

import torch
import torch.nn.functional as F
import tvm
from torch import nn
from tvm import relax, tirx
from tvm.relax.frontend.torch import from_exported_program, from_fx

from sparsefx.backends.tvm.sparse.relax import CONVERT_MAP
from sparsefx.backends.tvm.unbroadcast import unbroadcast_matmul
from sparsefx.capture.ops import attention_args
from sparsefx.capture.trace import fx_else_export, is_aten_graph, trace
from sparsefx.errors import SparsefxError


class UnsupportedOpError(SparsefxError):
    """TVM's importer cannot translate an op of the model."""


def to_relax(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[tvm.IRModule, str]:
    """A Relax module whose `main` takes the inputs, weights bound as constants; and the route used
    (torch.fx, else torch.export at the example's fixed shapes: `fx_else_export`)."""
    with contextlib.suppress(NotImplementedError):  # torch.export's .module() refuses eval(); it is traced already
        model = model.eval()
    info = [(tuple(x.shape), str(x.dtype).removeprefix("torch.")) for x in inputs]

    def from_fx_graph(model: nn.Module) -> tvm.IRModule:
        gm = model if isinstance(model, torch.fx.GraphModule) and not is_aten_graph(model) \
            else torch.fx.symbolic_trace(model)
        gm = avg_pools_as_functions(select_integer_indices(torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))))
        with torch.no_grad():
            mod = from_fx(gm, info, keep_params_as_input=True, unwrap_unit_return_tuple=True,
                          custom_convert_map=FX_CONVERT_MAP)
        return _bind_params(mod, len(inputs))

    def from_program(program: torch.export.ExportedProgram) -> tvm.IRModule:
        with torch.no_grad():
            mod = from_exported_program(keep_attention(program), keep_params_as_input=True,
                                        unwrap_unit_return_tuple=True, custom_convert_map=FX_CONVERT_MAP,
                                        run_ep_decomposition=False)
        return _bind_params(unbroadcast_matmul(mod), len(inputs))

    try:
        return fx_else_export(model, inputs, from_fx_graph, from_program, dynamic_batch=False)
    except Exception as error:
        raise _explain(error, model, inputs) from None


def _layer_norm(node: torch.fx.Node, importer: object) -> relax.Expr:
    """`F.layer_norm` with its keyword arguments. torch.fx records the call as
    `layer_norm(x, shape, weight=w, bias=b, eps=e)` (torchvision's LayerNorm2d, and any
    nn.LayerNorm traced into), and TVM's fx importer reads only positional arguments: it
    dropped weight, bias and eps, so ConvNeXt's LayerNorms ran with eps 1e-5 instead of 1e-6
    (3-8e-4 relative error where a position's channel variance is small) and without their
    affine parameters."""
    args = dict(zip(("input", "normalized_shape", "weight", "bias", "eps"), node.args, strict=False))
    args.update(node.kwargs)
    weight, bias = (importer._retrieve_args(args.get(k)) for k in ("weight", "bias"))
    return importer._layer_norm_impl(importer.env[args["input"]], weight, bias, args.get("eps", 1e-5),
                                     args["normalized_shape"])


def _avg_pool2d(node: torch.fx.Node, importer: object) -> relax.Expr:
    """avg_pool2d, refusing a divisor_override: TVM's importer ignores it (a 3x3/2 pool divided by 4
    instead of 9 compiled silently, 0.78 off)."""
    divisor = node.args[6] if len(node.args) > 6 else node.kwargs.get("divisor_override")
    if divisor is not None:
        raise UnsupportedOpError(f"avg_pool2d with divisor_override={divisor} (TVM's importer ignores it): "
                                 "pool without it and scale the output by kernel area / divisor instead")
    return importer._avg_pool2d(node)


def _cumsum(node: torch.fx.Node, importer: object) -> relax.Expr:
    """`torch.cumsum` with PyTorch's type promotion: bool and integer inputs sum in int64 unless
    `dtype` says otherwise. TVM's importer kept a bool input's dtype, and LLVM cannot add bools:
    transformers' decoders cumsum a bool mask to build position ids / the causal mask, so every
    Llama-style model failed to build ("CreateAdd ... kDLFloat")."""
    x = importer.env[node.args[0]]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    dtype = node.kwargs.get("dtype")
    if dtype is not None:
        dtype = importer._convert_data_type(str(dtype), importer.env)
    elif x.ty.dtype == "bool" or x.ty.dtype.startswith(("int", "uint")):
        dtype = "int64"
    return importer.block_builder.emit(relax.op.cumsum(x, dim, dtype))


def _cat(node: torch.fx.Node, importer: object) -> relax.Expr:
    """`torch.cat` skipping 1-D empty inputs, as PyTorch does. transformers' DynamicCache starts each
    layer as `torch.tensor([])` and concatenates the first keys onto it, so a decode step captured
    with its cache passed in as tensors held a (0,) constant that Relax's concat refused ("same
    ndim")."""
    args = importer.retrieve_args(node)
    axis = args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    kept = [x for x in args[0] if not _empty_vector(x)] or list(args[0])
    return kept[0] if len(kept) == 1 else importer.block_builder.emit(relax.op.concat(kept, axis=axis))


def _empty_vector(x: relax.Expr) -> bool:
    shape = getattr(x.ty, "shape", None)
    return shape is not None and len(shape) == 1 and isinstance(shape[0], tirx.IntImm) and shape[0].value == 0


def _attention(node: torch.fx.Node, importer: object) -> relax.Expr:
    """`F.scaled_dot_product_attention` as Relax's attention with every argument PyTorch takes, so the
    dispatch can run it on PyTorch's fused SDPA (`dispatch.math_ops`). Decomposed (TVM's importer
    after torch.export's default decompositions), ViT-B/16 ran each attention as two matmuls, a
    softmax and PyTorch's safe-softmax masking, 19 ms of 214 on one thread, against 1.1-1.3 ms per
    layer fused. TVM's own converter passed no `scale` and refused boolean masks (BERT's). A bool
    mask becomes a bias of 0 / -inf; a bias is broadcast to (batch, heads, seq, seq_kv); grouped
    key/value heads (`enable_gqa`) are repeated."""
    args = attention_args(node)
    if args.get("dropout_p", 0.0):
        raise UnsupportedOpError("scaled_dot_product_attention with dropout; put the model in eval() first")
    q, k, v = (importer.env[args[name]] for name in ("query", "key", "value"))
    if len(q.ty.shape) != 4:
        raise UnsupportedOpError(f"scaled_dot_product_attention on {len(q.ty.shape)}-D inputs (sparsefx compiles 4-D)")
    bb = importer.block_builder
    heads = int(q.ty.shape[1])
    if args.get("enable_gqa") and int(k.ty.shape[1]) != heads:
        k, v = (bb.emit(relax.op.repeat(x, heads // int(x.ty.shape[1]), axis=1)) for x in (k, v))
    bias = importer.env[args["attn_mask"]] if args.get("attn_mask") is not None else None
    if bias is not None:
        if bias.ty.dtype == "bool":
            zero, masked = relax.const(0.0, q.ty.dtype), relax.const(float("-inf"), q.ty.dtype)
            bias = bb.emit(relax.op.where(bias, zero, masked))
        b, s, s_kv = q.ty.shape[0], q.ty.shape[2], k.ty.shape[2]
        bias = bb.emit(relax.op.broadcast_to(bias, (b, heads, s, s_kv)))
    q, k, v = (bb.emit(relax.op.permute_dims(x, [0, 2, 1, 3])) for x in (q, k, v))  # Relax's (batch, seq, heads, dim)
    out = bb.emit(relax.op.nn.attention(q, k, v, bias, args.get("scale"), "TopLeft" if args.get("is_causal") else None))
    return bb.emit(relax.op.permute_dims(out, [0, 2, 1, 3]))


def keep_attention(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """torch.export's default decompositions, except scaled-dot-product attention (see `_attention`).
    A program holding sparse tensors is left as it is, as TVM's importer leaves it."""
    state = [*program.state_dict.values(), *program.constants.values()]
    if any(isinstance(t, torch.Tensor) and t.layout != torch.strided for t in state):
        return program
    table = torch.export.default_decompositions()
    table.pop(torch.ops.aten.scaled_dot_product_attention.default, None)
    return program.run_decompositions(table)


# layer_norm: from_fx only (from_exported_program sees aten's `layer_norm.default`, always positional)
FX_CONVERT_MAP = {**CONVERT_MAP, "layer_norm": _layer_norm, "cumsum": _cumsum, "cumsum.default": _cumsum,
                  "cat": _cat, "cat.default": _cat, "concat": _cat, "concat.default": _cat,
                  "scaled_dot_product_attention": _attention, "scaled_dot_product_attention.default": _attention,
                  "avg_pool2d": _avg_pool2d, "avg_pool2d.default": _avg_pool2d}


def avg_pools_as_functions(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """nn.AvgPool2d modules as F.avg_pool2d calls, which `_avg_pool2d` converts: TVM's fx importer
    drops a module's count_include_pad, which made count_include_pad=False pools wrong (a 3x3/2
    ceil-mode pool over 15x15: 0.24 off)."""
    modules = dict(gm.named_modules())
    pools = [node for node in gm.graph.nodes if node.op == "call_module" and isinstance(modules.get(node.target), nn.AvgPool2d)]
    for node in pools:
        module = modules[node.target]
        with gm.graph.inserting_before(node):
            call = gm.graph.call_function(F.avg_pool2d, (node.args[0], module.kernel_size, module.stride,
                                                          module.padding, module.ceil_mode, module.count_include_pad,
                                                          module.divisor_override))
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
    if pools:  # most models have none: no second code generation for them
        gm.recompile()
    return gm


def select_integer_indices(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Rewrite `x[:, 0]`-style integer indexing into slicing plus `torch.select`, which the
    Relax importer translates correctly (its getitem keeps the indexed axis)."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not operator.getitem:
            continue
        index = node.args[1]
        if not isinstance(index, tuple) or not any(isinstance(i, int) for i in index) or any(
                not isinstance(i, (int, slice, type(None))) for i in index):
            continue
        axes, axis = [], 0  # output axis of each integer index once every int is a full slice
        for item in index:
            if isinstance(item, int):
                axes.append((axis, item))
            axis += 1
        with gm.graph.inserting_before(node):
            value = gm.graph.call_function(operator.getitem, (node.args[0], tuple(
                slice(None) if isinstance(i, int) else i for i in index)))
            for axis, item in reversed(axes):
                value = gm.graph.call_function(torch.select, (value, axis, item))
        node.replace_all_uses_with(value)
        gm.graph.erase_node(node)
    gm.recompile()
    return gm


def _bind_params(mod: tvm.IRModule, num_inputs: int) -> tvm.IRModule:
    mod, params = relax.frontend.detach_params(mod)
    names = [v.name for v in mod["main"].params[num_inputs:]]
    return relax.transform.BindParams("main", dict(zip(names, params.get("main", []), strict=True)))(mod)


def _explain(error: BaseException, model: nn.Module, inputs: tuple) -> SparsefxError:
    """Name the op and the node TVM's importer stopped at."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    match = re.search(r"Unsupported function types? \[?'?([\w.]+)'?|Unsupported (?:module type|function target) "
                      r"<?(?:class )?'?([\w.<> ]+)'?>?", text)
    op = next((g for g in match.groups() if g), None) if match else None
    node = _find_node(model, inputs, op) if op else None
    where = f" at node {node}" if node else ""
    what = f"op {op!r}{where}" if op else f"the model ({text[:200]})"
    return UnsupportedOpError(f"TVM's Relax importer does not support {what}; replace that op, or keep this model on "
                        "the torch eager backend")


def _find_node(model: nn.Module, inputs: tuple, op: str) -> str | None:
    try:
        gm = trace(model, inputs, "auto")
    except SparsefxError:
        return None
    parts = op.split(".")
    base = parts[-2] if len(parts) > 1 and parts[-1] in _OVERLOADS else parts[-1]
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        name = getattr(node.target, "__name__", str(node.target)).split(".")[0]
        if name == base or name.endswith(base) or base.endswith(name):
            return node.name
    return None


_OVERLOADS = {"default", "Tensor", "Scalar", "int", "dim", "self", "out"}
