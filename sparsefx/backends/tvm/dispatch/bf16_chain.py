"""Relax pass: a bf16 convolution whose output only feeds other bf16 convolutions hands it on in bf16.

A dispatched bf16 conv takes and returns float32 (`torch_kernels`), so between two of them the
activation is written as float32 and read back to be cast to bf16: on ResNet-50's 1x1 convs at
56x56 those two passes cost more than the bf16 conv itself (one thread: 1.39 ms with the casts,
0.51 ms without). Where every use of a conv's result is the input or the residual of another
dispatched bf16 conv, the producer returns bf16 (precision "bf16-out") and the consumers' casts
become no-ops. Results read by TIR, by a matmul, or returned stay float32. Runs after
`dispatch_pass`.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, PyExprVisitor, mutator, visitor

from sparsefx.backends.tvm.dispatch.torch_kernels import CONV, CONV_EPILOGUE, CONV_RESIDUAL, PRECISIONS
from sparsefx.backends.tvm.function_pass import function_pass

CONVS = {CONV: (0,), CONV_EPILOGUE: (0,), CONV_RESIDUAL: (0, 3)}  # which of their tensor arguments take activations
BF16, BF16_OUT = PRECISIONS.index("bf16"), PRECISIONS.index("bf16-out")


def _packed(call: relax.Expr) -> str | None:
    """The packed function a call_pure_packed calls, or None for any other expression."""
    if isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.call_pure_packed":
        return str(call.args[0].global_symbol)
    return None


def _bf16_conv(call: relax.Expr) -> bool:
    name = _packed(call)
    return name in CONVS and int(call.args[-1].value) == BF16


@visitor
class _Uses(PyExprVisitor):
    """Which bf16 convs' results are read only as another bf16 conv's activation input."""

    def __init__(self) -> None:
        super().__init__()
        self.producers: dict[relax.Var, relax.Call] = {}
        self.others: set[relax.Var] = set()  # vars read anywhere else (TIR, matmuls, tuples, outputs)

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        if _bf16_conv(binding.value):
            self.producers[binding.var] = binding.value
        super().visit_var_binding_(binding)

    def visit_call_(self, call: relax.Call) -> None:
        activations = CONVS[_packed(call)] if _bf16_conv(call) else ()
        for position, arg in enumerate(call.args[1:] if _packed(call) else call.args):
            if not isinstance(arg, relax.Var):
                self.visit_expr(arg)
            elif position not in activations:
                self.others.add(arg)

    def visit_var_(self, var: relax.Var) -> None:
        self.others.add(var)  # reached outside a call's argument list: a tuple, the function's output

    def visit_dataflow_var_(self, var: relax.Var) -> None:
        self.others.add(var)  # the same inside a dataflow block (call_tir's argument tuple)

    def chained(self) -> set[relax.Call]:
        return {call for var, call in self.producers.items() if var not in self.others}


@mutator
class _Chain(PyExprMutator):
    def __init__(self, chained: set[relax.Call]) -> None:
        super().__init__()
        self.chained = chained

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        new = self.visit_expr_post_order(call)
        if call not in self.chained:
            return new
        out = call.ty if isinstance(call.ty, relax.TensorType) else call.sinfo_args[0]
        return relax.call_pure_packed(new.args[0], *new.args[1:-1], relax.prim_value(BF16_OUT),
                                      ty_args=relax.TensorType(out.shape, "bfloat16"))


def _chained(func: relax.Function) -> relax.Function:
    uses = _Uses()
    uses.visit_expr(func)
    chained = uses.chained()
    return _Chain(chained).visit_expr(func) if chained else func


bf16_chain_pass = function_pass("ChainBf16", _chained)
