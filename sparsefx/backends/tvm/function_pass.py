"""The one way the TVM backend turns a rewrite of a Relax function into a module pass."""

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
