"""Relax pass: a bf16 convolution whose output only feeds other bf16 convolutions hands it on in bf16.

A dispatched bf16 conv takes and returns float32 (`torch_kernels`), so between two of them the
activation is written as float32 and read back to be cast to bf16: on ResNet-50's 1x1 convs at
56x56 those two passes cost more than the bf16 conv itself (one thread: 1.39 ms with the casts,
0.51 ms without). Where every use of a conv's result is the input or the residual of another
dispatched bf16 conv, the producer returns bf16 (precision "bf16-out") and the consumers' casts
become no-ops. A max-pool between such convs (ResNet's stem) joins the chain: it runs on PyTorch in
bf16 (`torch_kernels.MAX_POOL`) instead of in float32 TIR, which needed the stem's output as compact
float32 NCHW and both convs after it to cast back (ResNet-50, one thread, Intel Xeon with AMX: the
stem conv took 1.25 ms with its cast against 0.38 in oneDNN, the TIR pool 0.69 ms). Results read by
TIR, by a matmul, or returned stay float32. Runs after `dispatch_pass`.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, PyExprVisitor, mutator, visitor

from sparsefx.backends.tvm.dispatch.torch_kernels import (
    CONV,
    CONV_EPILOGUE,
    CONV_RESIDUAL,
    MAX_POOL,
    PRECISIONS,
)
from sparsefx.backends.tvm.function_pass import function_pass
from sparsefx.backends.tvm.kernels.pool import window_of

CONVS = {CONV: (0,), CONV_EPILOGUE: (0,), CONV_RESIDUAL: (0, 3)}  # which of their tensor arguments take activations
BF16, BF16_OUT = PRECISIONS.index("bf16"), PRECISIONS.index("bf16-out")


def packed_name(call: relax.Expr) -> str | None:
    """The packed function a call_pure_packed calls, or None for any other expression."""
    if isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.call_pure_packed":
        return str(call.args[0].global_symbol)
    return None


def _bf16_conv(call: relax.Expr) -> bool:
    name = packed_name(call)
    return name in CONVS and int(call.args[-1].value) == BF16


def _pool_window(call: relax.Expr) -> list[int] | None:
    """The window `torch_kernels.MAX_POOL` takes for a Relax max_pool2d PyTorch can run (NCHW, each
    side padded alike, by at most half the window), else None."""
    window = window_of(call, ("relax.nn.max_pool2d",))
    if window is None or not window.symmetric:
        return None
    return [*window.size, *window.stride, *window.padding[:2], *window.dilation, int(window.ceil)]


@visitor
class _Uses(PyExprVisitor):
    """Which bf16 convs' results, and which max-pools', are read only as bf16 convs' (or such pools') activations."""

    def __init__(self) -> None:
        super().__init__()
        self.producers: dict[relax.Var, relax.Call] = {}
        self.pools: dict[relax.Var, tuple[relax.Call, relax.Var]] = {}  # PyTorch-runnable pools and their input
        self.others: set[relax.Var] = set()  # vars read anywhere else (TIR, matmuls, tuples, outputs)

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        value = binding.value
        if _bf16_conv(value):
            self.producers[binding.var] = value
        elif _pool_window(value) is not None and isinstance(value.args[0], relax.Var):
            self.pools[binding.var] = (value, value.args[0])
        super().visit_var_binding_(binding)

    def visit_call_(self, call: relax.Call) -> None:
        activations = CONVS[packed_name(call)] if _bf16_conv(call) else (0,) if _pool_window(call) is not None else ()
        for position, arg in enumerate(call.args[1:] if packed_name(call) else call.args):
            if not isinstance(arg, relax.Var):
                self.visit_expr(arg)
            elif position not in activations:
                self.others.add(arg)

    def visit_var_(self, var: relax.Var) -> None:
        self.others.add(var)  # reached outside a call's argument list: a tuple, the function's output

    def visit_dataflow_var_(self, var: relax.Var) -> None:
        self.others.add(var)  # the same inside a dataflow block (call_tir's argument tuple)

    def chained(self) -> set[relax.Call]:
        """The convs that hand on bf16 and the pools that run in it: a pool is in a chain when a bf16
        conv alone reads it and it reads a conv in the chain; a conv when only bf16 convs and such
        pools read it."""
        pools = {var for var, (_, source) in self.pools.items() if var not in self.others and source in self.producers}
        while True:  # what a float32 pool reads must be float32 too
            read_by_float32 = {source for var, (_, source) in self.pools.items() if var not in pools}
            if not pools & read_by_float32:
                break
            pools -= read_by_float32
        convs = {var for var in self.producers if var not in self.others | read_by_float32}
        return {self.producers[var] for var in convs} | {self.pools[var][0] for var in pools if self.pools[var][1] in convs}


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
        bf16 = relax.TensorType(out.shape, "bfloat16")
        if (window := _pool_window(call)) is not None:
            return relax.call_pure_packed(MAX_POOL, new.args[0], *map(relax.prim_value, window), ty_args=bf16)
        return relax.call_pure_packed(new.args[0], *new.args[1:-1], relax.prim_value(BF16_OUT), ty_args=bf16)


def _chained(func: relax.Function) -> relax.Function:
    uses = _Uses()
    uses.visit_expr(func)
    chained = uses.chained()
    return _Chain(chained).visit_expr(func) if chained else func


bf16_chain_pass = function_pass("ChainBf16", _chained)
