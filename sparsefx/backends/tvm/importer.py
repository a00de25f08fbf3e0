"""Import a PyTorch model into Relax: torch.fx first, torch.export where fx cannot."""

from __future__ import annotations

import re

import torch
import tvm
from torch import nn
from tvm import relax
from tvm.relax.frontend.torch import from_exported_program, from_fx

from ...errors import SparsefxError
from ...trace import trace


class ImportError_(SparsefxError):
    """TVM's importer cannot translate an op of the model."""


def to_relax(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[tvm.IRModule, str]:
    """A Relax module whose `main` takes the inputs, weights bound as constants; and the route used."""
    model = model.eval()
    info = [(tuple(x.shape), str(x.dtype).removeprefix("torch.")) for x in inputs]
    errors = []
    try:
        gm = model if isinstance(model, torch.fx.GraphModule) and not _is_aten(model) else torch.fx.symbolic_trace(model)
        with torch.no_grad():
            mod = from_fx(gm, info, keep_params_as_input=True, unwrap_unit_return_tuple=True)
        return _bind_params(mod, len(inputs)), "fx"
    except Exception as error:  # fall through to torch.export, which covers more Python
        errors.append((error, model if isinstance(model, torch.fx.GraphModule) else None))
    try:
        program = torch.export.export(model, inputs, strict=False)
        with torch.no_grad():
            mod = from_exported_program(program, keep_params_as_input=True, unwrap_unit_return_tuple=True)
        return _bind_params(mod, len(inputs)), "export"
    except Exception as error:
        raise _explain(error, model, inputs) from None


def _is_aten(gm: torch.fx.GraphModule) -> bool:
    return any(isinstance(n.target, torch._ops.OpOverload) for n in gm.graph.nodes)


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
    return ImportError_(f"TVM's Relax importer does not support {what}; replace that op, or keep this model on "
                        "the torch eager backend")


def _find_node(model: nn.Module, inputs: tuple, op: str) -> str | None:
    try:
        gm = trace(model, inputs, "auto")
    except SparsefxError:
        return None
    short = op.rsplit(".", 1)[-1]
    for node in gm.graph.nodes:
        name = getattr(node.target, "__name__", str(node.target))
        if name.split(".")[0] == short.split(".")[0] or short in str(node.target):
            return node.name
    return None
