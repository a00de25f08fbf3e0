"""sparsefx's own TIR kernels for convolutions and matmuls, and the Relax passes that swap them in.

Each conv kernel module (`depthwise`, `pointwise` for 1x1, `direct` for dense k x k; in bf16 `amx` on
CPUs with AMX tiles, else `dpbf16` on AVX512-BF16, and `amx_depthwise`) says which conv workloads it
runs (`supported`), builds a spec for one (`spec_of`) and its PrimFunc (`kernel`),
whether it fuses a residual add (`FUSES_RESIDUAL`; `RESIDUAL_IN_PLACE` where it writes its result
over the residual, called by `call_tir_inplace`), PyTorch's weight shape (`spec.weight_shape`) and,
where a spec's weight argument is not in that layout (`arg_shapes[1]` differs), `pack_weight(spec, weight)`,
applied to the constant weight at compile time; the dispatch times it beside PyTorch and
records `impl: <name>` where it wins, and the cost model prices the same choice. Matmul kernels
(`amx_linear`, `linear`) say the same of a matmul `Kernel` and are swapped in by `own_linear_pass`,
and `attention` of an attention `Kernel` (PyTorch's SDPA), swapped in by `own_attention_pass`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import ModuleType

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import is_op, wildcard

from sparsefx.backends.tvm.build_config import build_context
from sparsefx.backends.tvm.dispatch.patterns import (
    EpiloguePatterns,
    activation_of,
    epilogue_patterns,
    kernel_of,
    matmul_epilogue_patterns,
    per_channel,
    rewrite_fused,
    shape_of,
)
from sparsefx.backends.tvm.kernels import (
    amx,
    amx_depthwise,
    amx_linear,
    attention,
    blocked,
    blocked_depthwise,
    depthwise,
    direct,
    dpbf16,
    linear,
    pointwise,
    tile_layout,
    winograd,
    winogradbf16,
)
from sparsefx.backends.tvm.kernels.layout_chain import LAYOUTS, Layout
from sparsefx.backends.tvm.tvmscript import parsed
from sparsefx.cost.kernel import Kernel
from sparsefx.target import has_bf16, has_tiles

# first match wins (`kind_of`): in bf16 `amx` first where it applies at all (else Winograd's unstrided 3x3s,
# else `dpbf16`), then in float32 the blocked kernels (NCHW16c, `blocked_layout`; Winograd's 3x3s first),
# then the NCHW ones for what those leave (a stem's few input channels)
CONV_KERNELS: dict[str, ModuleType] = {"amx": amx, "winogradbf16": winogradbf16, "dpbf16": dpbf16,
                                       "amx_depthwise": amx_depthwise, "blocked_depthwise": blocked_depthwise,
                                       "winograd": winograd, "blocked": blocked, "depthwise": depthwise,
                                       "pointwise": pointwise, "direct": direct}
MATMUL_KERNELS: dict[str, ModuleType] = {"amx_linear": amx_linear, "linear": linear}  # first match wins
ATTENTION_KERNELS: dict[str, ModuleType] = {"attention": attention}  # float32, also in bf16 builds (softmax stays float32)
KERNELS: dict[str, ModuleType] = {**CONV_KERNELS, **MATMUL_KERNELS, **ATTENTION_KERNELS}
# kinds also timed where a kind wins `kind_of` and its module says the conv is `contested`: one image's
# 128 -> 128 3x3 at 14x14 (16 tiles) ran on `blocked` in 0.280 ms, on `winograd` 0.303 (two threads, AMD EPYC
# Zen 4), while 64 -> 64 at 28x28 took 0.494 and 0.229
ALTERNATIVES: dict[str, tuple[str, ...]] = {"winograd": ("blocked",), "winogradbf16": ("dpbf16",)}
BF16_KINDS = ("amx", "winogradbf16", "dpbf16", "amx_depthwise", "amx_linear")  # only for bf16 targets on CPUs with AVX512-BF16
AMX_KINDS = ("amx",)  # of those, the ones on AMX tiles, which also need the CPU to have them
TILE_KINDS = ("amx", "winogradbf16", "dpbf16", "amx_depthwise")  # of those, the ones in the tiles' layout (`tile_layout`)
BLOCKED_KINDS = ("winograd", "blocked", "blocked_depthwise")  # float32 only, in `blocked_layout`
LAYOUT_KINDS = TILE_KINDS + BLOCKED_KINDS  # called between conversions (`layout_call`) that `layout_chain` drops


def runs_here(name: str, precision: str) -> bool:
    """Whether the own kernel kind `name` may run in `precision` on this CPU: the bf16 kinds only in bf16
    on CPUs with AVX512-BF16 (AMX's with tiles too), the blocked ones only in float32."""
    if name in BF16_KINDS:
        return precision == "bf16" and has_bf16() and (name not in AMX_KINDS or has_tiles())
    return precision == "fp32" or name not in BLOCKED_KINDS


def kind_of(attrs: tuple[int, ...], shapes: tuple[tuple[int, ...], ...], precision: str = "fp32") -> str | None:
    """The name of the own kernel that runs this conv workload in `precision`, if any."""
    return next((name for name, module in CONV_KERNELS.items()
                 if runs_here(name, precision) and module.supported(attrs, shapes)), None)


def own_kernel(kernel: Kernel, precision: str = "fp32") -> tuple[str, object] | None:
    """(kind, spec) of the sparsefx TIR kernel that runs this conv, matmul or attention in `precision`
    with its bias and epilogue fused, else None."""
    return next(iter(own_kernels(kernel, precision)), None)


def own_kernels(kernel: Kernel, precision: str = "fp32") -> list[tuple[str, object]]:
    """(kind, spec) of each sparsefx TIR kernel that runs this workload in `precision`, the first match
    (`own_kernel`) first: a conv's first kind, and where that kind's module says the conv is `contested`, the
    kinds after it (`ALTERNATIVES`), which the timer also times where their ceiling says they may win."""
    if kernel.op in ("matmul", "attention"):
        kernels = MATMUL_KERNELS if kernel.op == "matmul" else ATTENTION_KERNELS
        kind = next((name for name, module in kernels.items()
                     if runs_here(name, precision) and module.supported(kernel)), None)
        return [(kind, kernels[kind].spec_of(kernel))] if kind else []
    if kernel.op != "conv2d":
        return []
    attrs, shapes = kernel.conv_attrs, kernel.shapes
    kind = kind_of(attrs, shapes, precision)
    if kind is None:
        return []
    others = ALTERNATIVES.get(kind, ())
    kinds = [kind, *(others if others and KERNELS[kind].contested(attrs, shapes) else ())]
    act, residual = kernel.epilogue
    return [(name, KERNELS[name].spec_of(attrs, shapes, act, residual=True) if residual
             else KERNELS[name].spec_of(attrs, shapes, act))
            for name in kinds if KERNELS[name].supported(attrs, shapes)
            and not (residual and not KERNELS[name].FUSES_RESIDUAL)]  # else the residual add would be a kernel of its own


def repacked(spec: object) -> bool:
    """Whether the kernel of `spec` takes its weight in a layout of its own (`pack_weight`)."""
    return tuple(spec.arg_shapes[1]) != tuple(spec.weight_shape)


def build(kind: str, specs: list, target: tvm.target.Target) -> tvm.runtime.Module:
    """One library holding the `kind` kernels of `specs` (one LLVM build), each under its spec's `name`."""
    with build_context(target):
        return tvm.compile(kernel_module([(kind, s) for s in specs]), target)


def kernel_module(pairs: list[tuple[str, object]]) -> tvm.IRModule:
    """The kernels of these (kind, spec) pairs, each under its spec's `name`."""
    return tvm.IRModule({s.name: parsed(KERNELS[kind].kernel, s).with_attr("global_symbol", s.name)
                         for kind, s in dict.fromkeys(pairs)})


def own_kernel_pass(decisions: dict[str, dict]) -> tvm.transform.Pass:
    """Relax pass: a conv decided for an own kernel, with its per-channel bias, the residual add
    where the kernel fuses one, and the activation (ReLU, ReLU6, SiLU) where they follow, becomes
    one `call_tir` of that kernel (runs before the torch epilogue and dispatch passes, which leave
    `call_tir` alone). A 1x1 conv on `pointwise` whose input is scaled per image and channel
    (squeeze-and-excitation's `x * s`, s of shape (n, c, 1, 1)) takes the scale in too."""
    unscaled, scale = wildcard(), wildcard()
    # the scaled patterns first: their conv input would match the plain patterns' wildcard too
    families = [(epilogue_patterns(is_op("relax.multiply")(*operands)), True)
                for operands in ((unscaled, scale), (scale, unscaled))] + [(epilogue_patterns(), False)]

    def spec_for(expr: relax.Expr, matches: dict, ep: EpiloguePatterns, scaled: bool) -> tuple[str, object] | None:
        k = kernel_of(matches[ep.conv])
        kind = decisions.get(k.key, {}).get("impl") if k is not None else None
        if kind not in KERNELS:
            return None
        x_shape, w_shape, out_shape = k.shapes
        act = activation_of(expr) if ep.b in matches else "none"
        if act is None or (ep.b in matches and not per_channel(matches[ep.b], w_shape[0])):
            return None
        if scaled and (kind != "pointwise" or shape_of(matches[scale]) != [*x_shape[:2], 1, 1]
                       or shape_of(matches[unscaled]) != list(x_shape)):
            return None
        options = {"scaled": True} if scaled else {}  # only `pointwise` specs know the option
        if ep.residual in matches:
            if not KERNELS[kind].FUSES_RESIDUAL or shape_of(matches[ep.residual]) != list(out_shape):
                return None
            options["residual"] = True
        spec = KERNELS[kind].spec_of(k.conv_attrs, k.shapes, act, **options)
        if repacked(spec) and not isinstance(matches[ep.w], tvm.ir.expr.Constant):
            return None  # a weight computed at run time cannot be repacked at compile time
        return kind, spec

    def rewrite_all(mod: tvm.IRModule, rewriter: Callable) -> tvm.IRModule:
        for gvar, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                for ep, scaled in families:
                    for pattern in (*ep.patterns, ep.conv):
                        func = rewrite_fused(pattern, lambda e, m, ep=ep, scaled=scaled: rewriter(e, m, ep, scaled), func)
                mod[gvar] = func
        return mod

    def call(gvars: dict, kind: str, spec: object, matches: dict, ep: object, scaled: bool) -> relax.Expr:
        channels = spec.arg_shapes[2][0]
        bias = matches[ep.b].value.numpy().reshape(-1) if ep.b in matches else np.zeros(channels, "float32")
        weight = matches[ep.w]
        if repacked(spec):
            weight = relax.const(KERNELS[kind].pack_weight(spec, weight.value.numpy()))
        if kind in LAYOUT_KINDS:
            bias = KERNELS[kind].pack_bias(spec, bias)
        args = [matches[unscaled] if scaled else matches[ep.x], weight, relax.const(bias)]
        args += [matches[scale]] if scaled else []
        args += [matches[ep.residual]] if ep.residual in matches else []
        if kind in LAYOUT_KINDS:
            return layout_call(gvars, kind, spec, args)
        return relax.call_tir(gvars[spec.name], args, relax.TensorType(spec.out_shape, "float32"))

    return swapping_pass("FuseOwnKernels", rewrite_all, spec_for, call)


def layout_of(kind: str) -> Layout:
    """The layout a `LAYOUT_KINDS` kernel works in (`layout_chain.LAYOUTS`): the tiles' or the blocked one."""
    return next(layout for layout in LAYOUTS if layout.kind == ("amx" if kind in TILE_KINDS else "blocked"))


def layout_kernels(pairs: list[tuple[str, object]]) -> dict[str, Callable[[], tvm.tirx.PrimFunc]]:
    """The layout conversions the (kind, spec) kernels of `pairs` are called between (`layout_call`), by name."""
    made = {}
    for kind, spec in pairs:
        layout = layout_of(kind)
        ins = [] if getattr(spec, "nchw_input", False) else [spec.nchw_in]
        for shape in [*ins, *([spec.nchw_out] if fuses_residual(spec) else [])]:
            made[tile_layout.name(layout.into, shape)] = lambda shape=shape, make=layout.to_layout: make(shape)
        made[tile_layout.name(layout.out_of, spec.nchw_out)] = lambda out=spec.nchw_out, make=layout.from_layout: make(out)
    return made


RESIDUAL = 3  # a layout kernel's residual argument (after input, weight and bias)


def fuses_residual(spec: object) -> bool:
    """Whether a layout kernel's spec takes a residual (`amx`'s and `blocked`'s can)."""
    return getattr(spec, "residual", False)


def layout_call(gvars: dict, kind: str, spec: object, args: list[relax.Expr]) -> relax.Expr:
    """A `LAYOUT_KINDS` kernel's call on float32 NCHW tensors: input (unless the kernel reads NCHW, a
    stem's image) and residual converted in, the result out (`layout_chain.layout_chain_pass` drops
    the conversions between two such kernels)."""
    layout = layout_of(kind)

    def converted(value: relax.Expr) -> relax.Expr:
        shape = tuple(shape_of(value))
        return relax.call_tir(gvars[tile_layout.name(layout.into, shape)], [value],
                              relax.TensorType(layout.shape(shape), layout.dtype))

    x = args[0] if getattr(spec, "nchw_input", False) else converted(args[0])
    args = [x, *args[1:3], *([converted(args[3])] if fuses_residual(spec) else [])]
    ty = relax.TensorType(spec.out_shape, layout.dtype)
    if fuses_residual(spec) and getattr(KERNELS[kind], "RESIDUAL_IN_PLACE", False):
        result = relax.call_tir_inplace(gvars[spec.name], args, RESIDUAL, ty)  # into the converted residual
    else:
        result = relax.call_tir(gvars[spec.name], args, ty)
    out = spec.nchw_out
    return relax.call_tir(gvars[tile_layout.name(layout.out_of, out)], [result], relax.TensorType(out, "float32"))


def own_linear_pass(decisions: dict[str, dict]) -> tvm.transform.Pass:
    """Relax pass: a matmul by a constant decided for a matmul kernel (`MATMUL_KERNELS`), with the
    bias added after it and an activation the kernel applies where one follows, becomes one `call_tir`
    of that kernel (runs before the torch epilogue and dispatch passes); an input or result of more
    than two dimensions (tokens, a channels-last map) is taken as rows, reshaped in and out (views)."""
    mp = matmul_epilogue_patterns()

    def spec_for(expr: relax.Expr, matches: dict, out_shape: list[int]) -> tuple[str, object] | None:
        k = kernel_of(matches[mp.matmul])
        kind = decisions.get(k.key, {}).get("impl") if k is not None else None
        if kind not in MATMUL_KERNELS:
            return None
        act = activation_of(expr) if mp.b in matches else "none"
        spec = KERNELS[kind].spec_of(k, act)
        x_shape = shape_of(matches[mp.x])
        if act not in KERNELS[kind].ACTIVATIONS or [math.prod(x_shape[:-1]), x_shape[-1]] != list(spec.arg_shapes[0]) \
                or [math.prod(out_shape[:-1]), out_shape[-1]] != list(spec.out_shape) \
                or (mp.b in matches and shape_of(matches[mp.b])[-1:] != [spec.outputs]):
            return None
        return kind, spec

    def rewrite_all(mod: tvm.IRModule, rewriter: Callable) -> tvm.IRModule:
        for gvar, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                for pattern in (*mp.patterns, mp.matmul):
                    func = rewrite_fused(pattern, lambda e, m: rewriter(e, m, shape_of(e)), func)
                mod[gvar] = func
        return mod

    def call(gvars: dict, kind: str, spec: object, matches: dict, out_shape: list[int]) -> relax.Expr:
        bias = matches[mp.b].value.numpy().reshape(-1) if mp.b in matches else np.zeros(spec.outputs, "float32")
        weight = relax.const(KERNELS[kind].pack_weight(spec, matches[mp.w].value.numpy()))
        x = matches[mp.x]
        rows = x if len(shape_of(x)) == 2 else relax.op.reshape(x, spec.arg_shapes[0])
        out = relax.call_tir(gvars[spec.name], [rows, weight, relax.const(bias.astype("float32"))],
                             relax.TensorType(spec.out_shape, "float32"))
        return out if len(out_shape) == 2 else relax.op.reshape(out, out_shape)

    return swapping_pass("FuseOwnLinear", rewrite_all, spec_for, call)


def own_attention_pass(decisions: dict[str, dict]) -> tvm.transform.Pass:
    """Relax pass: an attention (`nn.attention`, with or without a bias) decided for an attention kernel
    (`ATTENTION_KERNELS`) becomes one `call_tir` of it on the same operands (runs before the dispatch
    pass, which hands the rest to PyTorch's SDPA)."""
    patterns = [is_op("relax.nn.attention")(wildcard(), wildcard(), wildcard()),
                is_op("relax.nn.attention_bias")(wildcard(), wildcard(), wildcard(), wildcard())]

    def spec_for(expr: relax.Expr, _matches: dict) -> tuple[str, object] | None:
        k = kernel_of(expr)
        kind = decisions.get(k.key, {}).get("impl") if k is not None else None
        return (kind, ATTENTION_KERNELS[kind].spec_of(k)) if kind in ATTENTION_KERNELS else None

    def rewrite_all(mod: tvm.IRModule, rewriter: Callable) -> tvm.IRModule:
        for gvar, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                for pattern in patterns:
                    func = rewrite_fused(pattern, lambda e, m: rewriter(e, {**m, "call": e}), func)
                mod[gvar] = func
        return mod

    def call(gvars: dict, _kind: str, spec: object, matches: dict) -> relax.Expr:
        return relax.call_tir(gvars[spec.name], list(matches["call"].args), relax.TensorType(spec.out_shape, "float32"))

    return swapping_pass("FuseOwnAttention", rewrite_all, spec_for, call)


def swapping_pass(name: str, rewrite_all: Callable, spec_for: Callable, call: Callable) -> tvm.transform.Pass:
    """A module pass that swaps own kernels in: `rewrite_all(mod, rewriter)` offers each match,
    `spec_for(expr, matches, *rest)` says which kernel (kind, spec) takes it, if any, and
    `call(gvars, kind, spec, matches, *rest)` makes its call. A call_tir needs its callee typed, i.e.
    already in the module: the kernels are found and added first, then the matches swapped."""

    @tvm.transform.module_pass(opt_level=0, name=name)
    def _pass(mod: tvm.IRModule, _ctx: object) -> tvm.IRModule:
        specs: dict[str, tuple[str, object]] = {}

        def find(expr: relax.Expr, matches: dict, *rest: object) -> relax.Expr:
            if (found := spec_for(expr, matches, *rest)) is not None:
                specs[found[1].name] = found
            return expr

        rewrite_all(mod, find)
        if not specs:
            return mod
        bb = relax.BlockBuilder(mod)
        gvars = {name: bb.add_func(parsed(KERNELS[kind].kernel, spec), name) for name, (kind, spec) in specs.items()}
        for kernel_name, make in layout_kernels([(kind, spec) for kind, spec in specs.values() if kind in LAYOUT_KINDS]).items():
            gvars[kernel_name] = bb.add_func(make(), kernel_name)

        def swap(expr: relax.Expr, matches: dict, *rest: object) -> relax.Expr:
            found = spec_for(expr, matches, *rest)
            return expr if found is None else call(gvars, *found, matches, *rest)

        return rewrite_all(bb.get(), swap)

    return _pass
