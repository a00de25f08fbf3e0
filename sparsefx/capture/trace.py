"""Capture a model as a torch.fx GraphModule and annotate every node.

Two capture routes: `torch.fx.symbolic_trace` (keeps the user's module hierarchy,
call_module nodes) and `torch.export` (aten-level graph; handles data-dependent
Python that fx cannot, e.g. Hugging Face models). The facts written on nodes are
documented in `sparsefx.capture.annotate`.
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import torch
import torch.fx
from torch import nn

from sparsefx import log
from sparsefx.capture import ops
from sparsefx.capture.annotate import annotate
from sparsefx.capture.shape_prop import ShapeProp
from sparsefx.errors import TraceError, one_line

METHODS = ("fx", "export", "auto")
T = TypeVar("T")


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
    with no_kv_cache(model):
        if method == "fx":
            gm = _fx_trace(model)
        elif method == "export":
            gm = _exported_graph(export_program(model, inputs, dynamic_batch=True), model)
        else:
            gm, _ = fx_else_export(model, inputs, _fx_trace, lambda program: _exported_graph(program, model),
                                   dynamic_batch=True)
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


@contextlib.contextmanager
def no_kv_cache(model: nn.Module) -> Iterator[None]:
    """A Hugging Face decoder returns its key/value cache (a DynamicCache torch.export refuses as an
    output) unless `config.use_cache` is False: capture, and every run compared with a capture, see
    the model without it. The flag is restored after, so `generate()` keeps its cache."""
    config = getattr(model, "config", None)
    if getattr(config, "use_cache", None) is not True:
        yield
        return
    config.use_cache = False
    try:
        yield
    finally:
        config.use_cache = True


def is_aten_graph(gm: torch.fx.GraphModule) -> bool:
    """True for graphs of aten ops (the torch.export route), False for torch.fx graphs."""
    return any(n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) for n in gm.graph.nodes)


class LeafTracer(torch.fx.Tracer):
    """torch.fx's tracer, also keeping module classes registered in `capture.ops` as one node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return ops.is_registered_module(type(m)) or super().is_leaf_module(m, module_qualified_name)


def _fx_trace(model: nn.Module) -> torch.fx.GraphModule:
    try:
        tracer = LeafTracer()
        graph = tracer.trace(model)
        return torch.fx.GraphModule(tracer.root, graph, type(model).__name__)
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


def fx_else_export(model: nn.Module, inputs: tuple, on_fx: Callable[[nn.Module], T],
                   on_export: Callable[[torch.export.ExportedProgram], T], dynamic_batch: bool) -> tuple[T, str]:
    """The one "torch.fx, else torch.export" fallback (capture here, the TVM importer): `on_fx(model)`
    (which traces with fx and may fail after); where it raises, `on_export` of the model's
    `export_program`. Returns the result and its route, "fx" or "export"; where both fail, a
    TraceError naming both failures."""
    try:
        return on_fx(model), "fx"
    except Exception as fx_error:  # torch.export covers more Python (data-dependent control flow)
        try:
            return on_export(export_program(model, inputs, dynamic_batch)), "export"
        except Exception as export_error:
            first = str(fx_error.args[0] if fx_error.args else fx_error).split(";")[0]
            why = export_error.args[0] if isinstance(export_error, TraceError) else one_line(export_error)
            raise TraceError(f"{first}; torch.export also failed: {why}") from None


def export_program(model: nn.Module, inputs: tuple, dynamic_batch: bool) -> torch.export.ExportedProgram:
    """`torch.export` of `model` on `inputs`, with sparsefx's one shape policy: `dynamic_batch` keeps
    the batch (and the token length of integer id inputs) symbolic so the graph serves any batch,
    and falls back to static shapes where the model specialises them; without it every shape is
    the example's (what a compiled model is built for)."""
    attempts = (tuple(_dynamic_dims(x) for x in inputs), None) if dynamic_batch else (None,)
    errors = []
    for shapes in attempts:
        try:
            # torch.export warns at length about Dim.AUTO specialisations; not actionable here
            with log.quiet("torch._export", "torch.export"), no_kv_cache(model), attributes_restored(model):
                return torch.export.export(model, inputs, dynamic_shapes=shapes, strict=False)
        except Exception as error:  # retry with static shapes before giving up
            errors.append(error)
    raise TraceError(f"torch.export cannot capture the model: {one_line(errors[-1])}")


@contextlib.contextmanager
def attributes_restored(model: nn.Module) -> Iterator[None]:
    """Non-strict torch.export runs the model's Python forward on fake tensors: what a forward caches
    on its modules (Ultralytics' Detect keeps its anchors and strides) would stay behind as fake
    tensors and break the model's next real call, so every module's attributes are put back."""
    saved = [(module, dict(vars(module))) for module in model.modules()]
    try:
        yield
    finally:
        for module, attributes in saved:
            vars(module).clear()
            vars(module).update(attributes)


def _exported_graph(program: torch.export.ExportedProgram, model: nn.Module) -> torch.fx.GraphModule:
    # A plain GraphModule (same graph and pytree calling convention) can be trained, which the
    # exported wrapper refuses.
    exported = program.module()
    return torch.fx.GraphModule(exported, exported.graph, class_name=f"Exported{type(model).__name__}")


def _dynamic_dims(x: object) -> dict | None:
    """Batch (and token length for integer id inputs) stay symbolic so the result serves any batch."""
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        return None
    dims = {0: torch.export.Dim.AUTO}
    if x.dim() == 2 and not x.is_floating_point():
        dims[1] = torch.export.Dim.AUTO
    return dims
