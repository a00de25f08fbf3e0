"""Relax pass: a dispatched conv + residual add writes its result into the residual where that is free.

oneDNN adds a residual as a sum post-op into the output buffer, so PyTorch first copies the residual
into a fresh output: on ResNet-50's 64 -> 256 1x1 conv at 56x56 in bf16 (one thread, Intel Xeon with
AMX) the call took 0.28 ms with that copy and 0.21 ms writing into the residual, 0.13 against 0.18 ms
at 28x28. The residual can take the result when nothing reads it afterwards, not even through a view of it
(a reshape), the conv does not read it as its input, and PyTorch allocated it (another dispatched conv
or pool made it): a tensor in TVM's planned storage could be handed to another tensor once dead while
the result still lives in it. Runs after `dispatch_pass` (and `bf16_chain`).
Rewrites call names only; invalidates nothing else.
"""

from __future__ import annotations

from tvm import relax

from sparsefx.backends.tvm.dispatch.bf16_chain import packed_name
from sparsefx.backends.tvm.dispatch.torch_kernels import (
    CONV,
    CONV_EPILOGUE,
    CONV_RESIDUAL,
    CONV_RESIDUAL_IN_PLACE,
    MAX_POOL,
)
from sparsefx.backends.tvm.function_pass import function_pass, swap_calls

TORCH_ALLOCATED = (CONV, CONV_EPILOGUE, CONV_RESIDUAL, CONV_RESIDUAL_IN_PLACE, MAX_POOL)  # results PyTorch allocated
VIEWS = ("relax.reshape", "relax.expand_dims", "relax.squeeze", "relax.flatten", "relax.memory.view")  # may alias


def _fresh_result(value: relax.Expr) -> bool:
    """Whether a binding's value is a call whose result cannot share its inputs' memory (not a view,
    tuple or alias): a reader of the residual that may outlive the call must not see it overwritten."""
    if not isinstance(value, relax.Call):
        return False
    name = getattr(value.op, "name", None)
    return name == "relax.call_tir" or packed_name(value) in TORCH_ALLOCATED \
        or (name is not None and name not in VIEWS and name != "relax.call_pure_packed")


def _in_place(func: relax.Function) -> relax.Function:
    bindings = [b for block in func.body.blocks for b in block.bindings]
    readers: dict[relax.Var, list[tuple[int, relax.Expr]]] = {}  # in binding order
    for i, binding in enumerate(bindings):
        for var in relax.analysis.free_vars(binding.value):
            readers.setdefault(var, []).append((i, binding.value))
    returned = set(relax.analysis.free_vars(func.body.body))
    torch_made = {b.var for b in bindings if packed_name(b.value) in TORCH_ALLOCATED}
    swaps: dict[relax.Call, relax.Call] = {}
    for i, binding in enumerate(bindings):
        call = binding.value
        if packed_name(call) != CONV_RESIDUAL:
            continue
        x, residual = call.args[1], call.args[4]
        if residual in torch_made and residual not in returned and readers[residual][-1][0] == i \
                and not x.same_as(residual) and all(_fresh_result(value) for _, value in readers[residual]):
            swaps[call] = relax.call_pure_packed(CONV_RESIDUAL_IN_PLACE, *call.args[1:], ty_args=call.ty)
    return swap_calls(func, swaps)


residual_in_place_pass = function_pass("ResidualInPlace", _in_place)
