"""sparsefx's own TIR kernels for convolutions, and the Relax pass that swaps them in.

Each kernel module (`depthwise`, `pointwise` for 1x1, `direct` for dense k x k) says which conv
workloads it runs (`supported`), builds a spec for one (`spec_of`) and its PrimFunc (`kernel`),
and whether it fuses a residual add (`FUSES_RESIDUAL`); the dispatch times it beside PyTorch and
records `impl: <name>` where it wins, and the cost model prices the same choice.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import numpy as np
import tvm
from tvm import relax

from . import depthwise, direct, pointwise

# first match wins (`kind_of`); their `supported` sets do not overlap
KERNELS: dict[str, ModuleType] = {"depthwise": depthwise, "pointwise": pointwise, "direct": direct}


def kind_of(attrs: tuple[int, ...], shapes: tuple[tuple[int, ...], ...]) -> str | None:
    """The name of the own kernel that runs this conv workload, if any."""
    return next((name for name, module in KERNELS.items() if module.supported(attrs, shapes)), None)


def build(kind: str, specs: list, target: tvm.target.Target) -> tvm.runtime.Module:
    """One library holding the `kind` kernels of `specs` (one LLVM build), each under its spec's `name`."""
    funcs = {s.name: KERNELS[kind].kernel(s).with_attr("global_symbol", s.name) for s in dict.fromkeys(specs)}
    return tvm.compile(tvm.IRModule(funcs), target)


def own_kernel_pass(decisions: dict[str, dict]) -> tvm.transform.Pass:
    """Relax pass: a conv decided for an own kernel, with its per-channel bias, the residual add
    where the kernel fuses one, and the activation (ReLU, ReLU6, SiLU) where they follow, becomes
    one `call_tir` of that kernel (runs before the torch epilogue and dispatch passes, which leave
    `call_tir` alone)."""
    from tvm.relax.dpl import rewrite_call

    from .dispatch import _activation, _per_channel, epilogue_patterns, workload_of

    ep = epilogue_patterns()
    x, w, b, residual, conv = ep.x, ep.w, ep.b, ep.residual, ep.conv
    patterns = [*ep.patterns, conv]

    def spec_for(expr: relax.Expr, matches: dict) -> tuple[str, object] | None:
        wl = workload_of(matches[conv])
        kind = decisions.get(wl.key, {}).get("impl") if wl is not None else None
        if kind not in KERNELS:
            return None
        act = _activation(expr) if b in matches else "none"
        if act is None or (b in matches and not _per_channel(matches[b], wl.shapes[1][0])):
            return None
        if residual not in matches:
            return kind, KERNELS[kind].spec_of(wl.attrs, wl.shapes, act)
        if not KERNELS[kind].FUSES_RESIDUAL or [int(d) for d in matches[residual].ty.shape] != list(wl.shapes[2]):
            return None
        return kind, KERNELS[kind].spec_of(wl.attrs, wl.shapes, act, residual=True)

    def rewrite_all(mod: tvm.IRModule, rewriter: Callable) -> tvm.IRModule:
        for gvar, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                for pattern in patterns:
                    func = rewrite_call(pattern, rewriter, func)
                mod[gvar] = func
        return mod

    @tvm.transform.module_pass(opt_level=0, name="FuseOwnKernels")
    def _pass(mod: tvm.IRModule, _ctx: object) -> tvm.IRModule:
        # a call_tir needs its callee typed, i.e. already in the module: find the kernels first
        specs: dict[str, tuple[str, object]] = {}

        def find(expr: relax.Expr, matches: dict) -> relax.Expr:
            if (found := spec_for(expr, matches)) is not None:
                specs[found[1].name] = found
            return expr

        rewrite_all(mod, find)
        if not specs:
            return mod
        bb = relax.BlockBuilder(mod)
        gvars = {name: bb.add_func(KERNELS[kind].kernel(spec), name) for name, (kind, spec) in specs.items()}

        def swap(expr: relax.Expr, matches: dict) -> relax.Expr:
            if (found := spec_for(expr, matches)) is None:
                return expr
            spec = found[1]
            channels = spec.arg_shapes[2][0]
            bias = matches[b].value.numpy().reshape(-1) if b in matches else np.zeros(channels, "float32")
            args = [matches[x], matches[w], relax.const(bias)] + ([matches[residual]] if residual in matches else [])
            return relax.call_tir(gvars[spec.name], args, relax.TensorType(spec.out_shape, "float32"))

        return rewrite_all(bb.get(), swap)

    return _pass
