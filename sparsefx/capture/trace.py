"""Capture a model as a torch.fx GraphModule and annotate every node.

Two capture routes: `torch.fx.symbolic_trace` (keeps the user's module hierarchy,
call_module nodes) and `torch.export` (aten-level graph; handles data-dependent
Python that fx cannot, e.g. Hugging Face models). The facts written on nodes are
documented in `sparsefx.capture.annotate`.
"""

from __future__ import annotations

import traceback
from collections.abc import Sequence

import torch
import torch.fx
from torch import nn

from sparsefx.capture.annotate import annotate
from sparsefx.capture.shape_prop import ShapeProp
from sparsefx.errors import TraceError, one_line

METHODS = ("fx", "export", "auto")


def as_inputs(example_inputs: object) -> tuple:
    """Normalise example inputs to a tuple (a single tensor is accepted)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, Sequence) and not isinstance(example_inputs, str):
        return tuple(example_inputs)
    raise TraceError(
        f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}; "
        "pass e.g. (torch.randn(1, 3, 224, 224),)"
    )


def trace(model: nn.Module, example_inputs: object, method: str = "fx") -> torch.fx.GraphModule:
    """Capture `model` and annotate each node (shape, dtype, MACs, params, bytes).

    The model itself is never modified; the returned GraphModule shares its parameters
    on the fx route (deep-copy first if you intend to mutate it).
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if method not in METHODS:
        raise TraceError(f"unknown trace method {method!r}; use one of {', '.join(METHODS)}")
    inputs = as_inputs(example_inputs)
    if method == "fx":
        gm = _fx_trace(model)
    elif method == "export":
        gm = _export_trace(model, inputs)
    else:
        try:
            gm = _fx_trace(model)
        except TraceError as fx_error:
            try:
                gm = _export_trace(model, inputs)
            except TraceError as export_error:
                raise TraceError(f"{fx_error.args[0].split(';')[0]}; torch.export also failed: "
                                 f"{export_error.args[0]}") from None
    try:
        with torch.no_grad():
            ShapeProp(gm).run(*inputs)
    except TraceError:
        raise
    except Exception as error:  # the captured graph must run on the example inputs
        raise TraceError(f"the traced graph does not run on the example inputs: {one_line(error)}") from None
    annotate(gm)
    gm.meta["sfx_method"] = "export" if is_aten_graph(gm) else "fx"
    return gm


def is_aten_graph(gm: torch.fx.GraphModule) -> bool:
    """True for graphs of aten ops (the torch.export route), False for torch.fx graphs."""
    return any(n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) for n in gm.graph.nodes)


def _fx_trace(model: nn.Module) -> torch.fx.GraphModule:
    try:
        return torch.fx.symbolic_trace(model)
    except Exception as error:
        where = _offending_frame(model, error)
        raise TraceError(
            f"torch.fx cannot trace {where}: {one_line(error)}; fix: make that module a leaf "
            "(torch.fx.Tracer.is_leaf_module) or capture with method='export' (torch.export)"
        ) from None


def _offending_frame(model: nn.Module, error: BaseException) -> str:
    """Name the deepest module forward on the traceback: 'name (Class) at file:line'."""
    names = {id(m): name or "<root>" for name, m in model.named_modules()}
    found = None
    for frame, lineno in traceback.walk_tb(error.__traceback__):
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in names:
            found = (names[id(owner)], type(owner).__name__, frame.f_code.co_filename, lineno)
    if found is None:
        return "the model"
    name, cls, filename, lineno = found
    return f"module {name} ({cls}) at {filename}:{lineno}"


def _export_trace(model: nn.Module, inputs: tuple) -> torch.fx.GraphModule:
    dynamic = tuple(_dynamic_dims(x) for x in inputs)
    errors = []
    for shapes in (dynamic, None):
        try:
            program = torch.export.export(model, inputs, dynamic_shapes=shapes, strict=False)
            exported = program.module()
            # A plain GraphModule (same graph and pytree calling convention) can be trained,
            # which the exported wrapper refuses.
            return torch.fx.GraphModule(exported, exported.graph, class_name=f"Exported{type(model).__name__}")
        except Exception as error:  # retry with static shapes before giving up
            errors.append(error)
    raise TraceError(f"torch.export cannot capture the model: {one_line(errors[-1])}")


def _dynamic_dims(x: object) -> dict | None:
    """Batch (and token length for integer id inputs) stay symbolic so the result serves any batch."""
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        return None
    dims = {0: torch.export.Dim.AUTO}
    if x.dim() == 2 and not x.is_floating_point():
        dims[1] = torch.export.Dim.AUTO
    return dims


def _silence_export_logs() -> None:
    # torch.export prints long warnings for Dim.AUTO specialisations; they are not actionable here.
    import logging

    logging.getLogger("torch._export").setLevel(logging.ERROR)
    logging.getLogger("torch.export").setLevel(logging.ERROR)


_silence_export_logs()
