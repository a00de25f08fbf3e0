"""The one way the TVM backend turns a rewrite of a Relax function into a module pass, and the one
way its passes replace calls."""

from __future__ import annotations

from collections.abc import Callable

import tvm
from tvm import relax


def function_pass(name: str, rewrite: Callable[[relax.Function], relax.Function]) -> tvm.transform.Pass:
    """A module pass called `name` that replaces every Relax function of the module by `rewrite` of it
    (TIR functions pass through)."""

    @tvm.transform.module_pass(opt_level=0, name=name)
    def _pass(mod: tvm.IRModule, _ctx: object) -> tvm.IRModule:
        for gvar, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                mod[gvar] = rewrite(func)
        return mod

    return _pass


def swap_calls(func: relax.Function, swaps: dict[relax.Call, relax.Expr]) -> relax.Function:
    """`func` with each call in `swaps` replaced by its expression (bound to fresh variables where
    it nests calls)."""
    return _Swap(swaps).visit_expr(func) if swaps else func


@relax.expr_functor.mutator
class _Swap(relax.PyExprMutator):
    def __init__(self, swaps: dict[relax.Call, relax.Expr]) -> None:
        super().__init__()
        self.swaps = swaps

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        swap = self.swaps.get(call)
        return self.visit_expr(swap) if swap is not None else self.visit_expr_post_order(call)
