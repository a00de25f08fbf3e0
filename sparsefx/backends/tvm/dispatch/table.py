"""Kernel dispatch: run an op on whichever implementation measures fastest on the target.

Untuned TIR convolutions run far slower than oneDNN/MKL. For every convolution, matmul and math-op
kernel (`patterns.kernel_of`) the compiler asks the backend's timer (`measure.host`) for the time of
each implementation that could run it (PyTorch's kernels, sparsefx's own TIR kernels, TVM's default
schedule where the pre-filter cannot rule it out) and decides with `cost.timing.choose`, as the
cost model does; the calls PyTorch wins become `call_pure_packed` calls of the kernels in
`torch_kernels`. Decisions (with the timings) are cached per target and recorded in the artifact.
Those calls need `import sparsefx` (and torch) where the artifact runs; GPU builds and
`dispatch=False` never use them.
"""

from __future__ import annotations

import math

import tvm
from tvm import relax

from sparsefx.backends.tvm.dispatch import prefilter
from sparsefx.backends.tvm.dispatch.math_ops import BY_NAME
from sparsefx.backends.tvm.dispatch.patterns import (
    activation_of,
    epilogue_patterns,
    kernel_of,
    matmul_epilogue_patterns,
    per_channel,
    rewrite_fused,
    shape_of,
)
from sparsefx.backends.tvm.dispatch.torch_kernels import (
    ACTIVATIONS,
    CONV,
    CONV_EPILOGUE,
    CONV_RESIDUAL,
    MATMUL,
    MATMUL_ACTIVATIONS,
    MATMUL_EPILOGUE,
    PRECISIONS,
    TORCH_IMPLEMENTATIONS,
    weight_key,
)
from sparsefx.backends.tvm.function_pass import function_pass
from sparsefx.backends.tvm.kernels import registry as own_kernels
from sparsefx.cache import Table, cache_dir
from sparsefx.cost.kernel import Kernel
from sparsefx.cost.timing import Timer, Times, choose
from sparsefx.target import Target

# v10: TIR kernels' parallel loops on PyTorch's OpenMP pool (`parallel`); v9: a weight copy per round, made cold by `cost.timing.cold_traffic`; v8: kernels timed by the shared
# timer (`measure.host`: rivals in turn on cycled weight copies, PyTorch with its bias), decided by
# `cost.timing.choose`, keyed by `cost.kernel.Kernel`; v7: own kernels in turn with PyTorch's after a
# cache flush; `direct` since v6, `pointwise` v5
TABLE_VERSION = 49  # v11: float32 matmuls timed prepacked on oneDNN too; v12, v13: `pointwise`, `depthwise` by channels on small maps; v14: depthwise rows stored directly; v15: only the channel tile's padding zeroed; v16: `pointwise` in bands, `depthwise` prefetching and 3x3 windows straight from the rows, bf16 matmuls on oneDNN's linear with the weight prepacked, PyTorch's fp32 convs charged `PYTORCH_CONV_IN_MODEL`; v17: bf16 convs on AMX tiles (`amx`); v18: PyTorch's bf16 linear charged beside `amx_linear`; v19: tile layout's 16-channel half step; v20: `direct` in bands of output rows; v21: LayerNorm's TIR on `kernels.layer_norm`; v22: float32 Linear layers on `kernels.linear`; v23: `pointwise` copies bands of large inputs; v24: PyTorch's float32 kernels timed on freshly released memory, uncharged; v25: convs only; v26: float32 convs on a just-written input; v27: float32 convs on the blocked kernels (NCHW16c); v28: no one-vector register blocks in `blocked`; v29: stems on `blocked`; v30: `blocked` output groups of 4, 3 and 2 vectors; v31: `blocked` maps' last few positions in a block of their own; v32: `linear` for fewer rows than a block (classifiers); v33: `linear` blocks of 6 rows x 64 outputs, up to 768 inputs; v34: PyTorch's call overhead timed cold (`measure.host.call_overhead_ms`); v35: 1x1 convs on 8-15 channels on `blocked`; v36: `blocked` unrolls 4 input channels a step, own kernels timed apart from PyTorch's unless near a tie; v37: `amx` writes over its residual and stores a position's channels at once, `amx_linear` takes up to 16 rows; v38: `blocked` copies several images' phase planes at once; v39: up to 2 MB of them; v40: `linear` up to 1536 inputs; v41: `blocked` 3x3 convs read their input in place; v42: `blocked` 1x1 convs with big group weights reduce in passes; v43: bf16 convs on AVX512-BF16 (`dpbf16`); v44: kernels built without TIR's CSE (`build_config`); v45: attention on `kernels.attention`; v46: the tile layout in 16-channel steps without AMX, `dpbf16` blocks of 5 and 3 vectors; v47: `dpbf16` blocks one position short where that computes less; v48: float32 3x3 convs on Winograd F(4x4, 3x3) (`winograd`); v49: bf16 3x3 convs on Winograd F(2x2, 3x3) (`winogradbf16`), `blocked` and `dpbf16` timed beside them


def table_key(target: Target, threads: int) -> str:
    """The table for `target` at `threads` PyTorch threads: PyTorch's kernels and TIR's parallel loops
    scale differently with threads, so decisions are per thread count (and per precision: bf16 kernels
    win where fp32 ones lose)."""
    return f"{target.arch}-{target.cores}-t{threads}" + ("" if target.precision == "fp32" else f"-{target.precision}")


class DispatchTable:
    """Measured per-kernel choice of implementation, cached on disk per target (`table_key`).

    Every new kernel is timed on PyTorch and its own kernel if it has one; TVM's default schedule
    only where the pre-filter cannot rule it out. Entries the filter decided say so
    (`decided_by: prefilter`, `tir_ms: None`)."""

    def __init__(self, target_key: str) -> None:
        self.table = Table(cache_dir() / "dispatch" / f"{target_key}.json", TABLE_VERSION)
        self.entries: dict[str, dict] = self.table.entries

    def decide(self, kernels: list[Kernel], timer: Timer) -> dict[str, dict]:
        """The entry of each kernel; new ones are timed by `timer` and decided by `choose`."""
        new = list({k.key: k for k in kernels if k.key not in self.entries}.values())
        if new:
            overheads = timer.overheads()
            for kernel, times in zip(new, timer.time(new), strict=True):
                self.entries[kernel.key] = decision(kernel, times, overheads)
            ceilings = prefilter.tir_ceilings(self.entries.values())
            ruled_out = getattr(timer, "own_ruled_out", {})
            for kernel in new:
                entry = self.entries[kernel.key]
                if kernel.key in ruled_out:  # an own kernel runs it, left out by its ceiling
                    kind, ceiling = ruled_out[kernel.key]
                    entry[f"{kind}_ceiling_gflops"] = round(ceiling, 2)
                elif kernel.key in getattr(timer, "torch_ruled_out", {}):  # PyTorch left out by its ceiling
                    entry["torch_ceiling_gflops"] = round(timer.torch_ruled_out[kernel.key], 2)
                elif entry["decided_by"] == "prefilter" and entry["op_class"] in ceilings:
                    entry["tir_ceiling_gflops"] = round(ceilings[entry["op_class"]][0], 2)
            self.table.save()
        return {k.key: self.entries[k.key] for k in kernels}


def decision(kernel: Kernel, times: Times, overheads: dict[str, float]) -> dict:
    """A table entry: the implementation `choose` picks (`impl` names what the dispatch passes run:
    "torch" for either PyTorch variant, `prepack` says which) and the timings it was chosen from."""
    choice = choose(times, overheads)
    own = next((kind for kind in times if kind in own_kernels.KERNELS), None)
    entry = {"impl": "torch" if choice in TORCH_IMPLEMENTATIONS else choice, "choice": choice,
             "prepack": times.get("torch_prepacked", math.inf) < times.get("torch", math.inf),
             "torch_ms": min(times.get(t, math.inf) for t in TORCH_IMPLEMENTATIONS), "tir_ms": times.get("tir"),
             "gflop": prefilter.gflop(kernel), "op_class": prefilter.op_class(kernel), "family": prefilter.family(kernel),
             "decided_by": own or ("measured" if "tir" in times else "prefilter")}
    for kind in times:
        if kind in own_kernels.KERNELS:  # the first own kind, and those also timed (`own_kernels.ALTERNATIVES`)
            entry[f"{kind}_ms"] = times[kind]
    return entry


def dispatch_pass(decisions: dict[str, dict], precision: str = "fp32") -> tvm.transform.Pass:
    """Relax pass: rewrite calls whose workload was decided 'torch' into packed calls computing in
    `precision` (convs and matmuls; math ops stay float32)."""
    code = relax.prim_value(PRECISIONS.index(precision))

    @relax.expr_functor.mutator
    class _Rewrite(relax.PyExprMutator):
        def visit_call_(self, call: relax.Call) -> relax.Expr:
            call = super().visit_call_(call)
            k = kernel_of(call)
            if k is None or decisions.get(k.key, {}).get("impl") != "torch":
                return call
            if k.op in BY_NAME:
                attrs = [relax.prim_value(a) for a in k.attrs]
                return relax.call_pure_packed(BY_NAME[k.op].packed, *call.args, *attrs, ty_args=call.ty)
            if k.op == "conv2d":
                extra = [relax.prim_value(v) for v in (*k.conv_attrs, _key(call.args[1], decisions[k.key]))]
                return relax.call_pure_packed(CONV, call.args[0], call.args[1], *extra, code, ty_args=call.ty)
            key = relax.prim_value(_matmul_key(call.args[1], decisions[k.key], precision))
            return relax.call_pure_packed(MATMUL, call.args[0], call.args[1], key, code, ty_args=call.ty)

    return function_pass("DispatchToTorch", lambda func: _Rewrite().visit_expr(func))


def _key(weight: relax.Expr, decision: dict) -> int:
    """The prepacking key of a constant weight where prepacking measured faster; 0: plain F.conv2d or matmul."""
    return _weight_key(weight) if decision.get("prepack") else 0


def _matmul_key(weight: relax.Expr, decision: dict, precision: str) -> int:
    """A matmul weight's key: in bf16 always (converted once), in float32 where prepacking measured faster."""
    return _weight_key(weight) if precision != "fp32" else _key(weight, decision)


def _weight_key(weight: relax.Expr) -> int:
    """The content key of a constant weight (converted or prepacked once per process); 0: not constant."""
    return weight_key(weight.value.numpy()) if isinstance(weight, tvm.ir.expr.Constant) else 0


def epilogue_pass(decisions: dict[str, dict], precision: str = "fp32") -> tvm.transform.Pass:
    """Relax pass: a conv PyTorch runs keeps its bias, residual add and activation (ReLU, ReLU6,
    SiLU) in the same call, so no TIR kernel has to re-read its output, and a matmul by a constant
    its bias and ReLU/GELU (a Linear layer: one oneDNN call where its weight is prepacked); runs
    before `dispatch_pass`."""
    ep, mp = epilogue_patterns(), matmul_epilogue_patterns()
    x, w, b, residual, conv = ep.x, ep.w, ep.b, ep.residual, ep.conv
    code = relax.prim_value(PRECISIONS.index(precision))

    def linear(expr: relax.Expr, matches: dict) -> relax.Expr:
        k = kernel_of(matches[mp.matmul])
        decision = decisions.get(k.key, {}) if k is not None else {}
        bias = shape_of(matches[mp.b])
        if decision.get("impl") != "torch" or bias[-1:] != [k.shapes[1][-1]] or math.prod(bias) != bias[-1]:
            return expr
        weight, product = matches[mp.w], matches[mp.matmul]
        key = _matmul_key(weight, decision, precision)
        fused = relax.call_pure_packed(MATMUL_EPILOGUE, matches[mp.x], weight, matches[mp.b], relax.prim_value(key),
                                       relax.prim_value(MATMUL_ACTIVATIONS.index(activation_of(expr))), code,
                                       ty_args=product.ty)
        # the activation is element-wise: a reshape matched before it can as well come after
        return fused if shape_of(expr) == shape_of(product) else relax.op.reshape(fused, expr.ty.shape)

    def rewriter(expr: relax.Expr, matches: dict) -> relax.Expr:
        k = kernel_of(matches[conv])
        act = activation_of(expr)
        if k is None or act is None or decisions.get(k.key, {}).get("impl") != "torch" or \
                not per_channel(matches[b], k.shapes[1][0]):
            return expr
        attrs = [relax.prim_value(v) for v in (*k.conv_attrs, _key(matches[w], decisions[k.key]),
                                               ACTIVATIONS.index(act), PRECISIONS.index(precision))]
        if residual in matches:  # only the patterns with the residual add bind it
            if shape_of(matches[residual]) != list(k.shapes[2]):
                return expr
            return relax.call_pure_packed(CONV_RESIDUAL, matches[x], matches[w], matches[b], matches[residual],
                                          *attrs, ty_args=expr.ty)
        return relax.call_pure_packed(CONV_EPILOGUE, matches[x], matches[w], matches[b], *attrs, ty_args=expr.ty)

    def rewrite_all(func: relax.Function) -> relax.Function:
        for pattern in ep.patterns:
            func = rewrite_fused(pattern, rewriter, func)
        for pattern in mp.patterns:
            func = rewrite_fused(pattern, linear, func)
        return func

    return function_pass("FuseTorchEpilogue", rewrite_all)


def collect_kernels(mod: tvm.IRModule) -> list[Kernel]:
    """The distinct dispatchable kernels of the module's Relax functions."""
    found: dict[str, Kernel] = {}

    @relax.expr_functor.visitor
    class _Collect(relax.PyExprVisitor):
        def visit_call_(self, call: relax.Call) -> None:
            super().visit_call_(call)
            k = kernel_of(call)
            if k is not None:
                found.setdefault(k.key, k)

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            _Collect().visit_expr(func)
    return list(found.values())
