"""The Relax compilation pipeline as named passes, so each step can be listed and tested."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable

import torch
import tvm
from tqdm import tqdm
from tvm import relax
from tvm.relax.backend import gpu_generic
from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

from sparsefx.backends.tvm.build_config import build_context
from sparsefx.backends.tvm.dispatch.bf16_chain import bf16_chain_pass
from sparsefx.backends.tvm.dispatch.residual_in_place import residual_in_place_pass
from sparsefx.backends.tvm.dispatch.table import (  # noqa: F401
    DispatchTable,
    collect_kernels,
    dispatch_pass,
    epilogue_pass,
    table_key,
)
from sparsefx.backends.tvm.fold import numpy_fold_pass
from sparsefx.backends.tvm.kernels import layer_norm, pool
from sparsefx.backends.tvm.kernels import registry as own_kernels
from sparsefx.backends.tvm.kernels.layout_chain import layout_chain_pass
from sparsefx.backends.tvm.kernels.registry import own_attention_pass, own_kernel_pass, own_linear_pass
from sparsefx.backends.tvm.schedule import default_schedule_pass
from sparsefx.backends.tvm.silu import silu_pass
from sparsefx.backends.tvm.sparse.relax import sparse_kernel_pass
from sparsefx.backends.tvm.tvmscript import parsed
from sparsefx.cost.timing import Timer
from sparsefx.target import Target

NamedPass = tuple[str, tvm.transform.Pass]


def own_legalization(spec_of: Callable[[relax.Call], object | None], kernel: Callable[[object], tvm.tirx.PrimFunc],
                     operands: int) -> Callable[[relax.BlockBuilder, relax.Call], relax.Expr]:
    """A `LegalizeOps` entry: the call on `kernel(spec)` (its first `operands` arguments in, `spec.out_shape`
    out) where `spec_of(call)` gives a spec, else TVM's own legalization."""
    def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        spec = spec_of(call)
        if spec is None:
            return call.op.get_attr("FLegalize")(bb, call)
        func = bb.add_func(parsed(kernel, spec), spec.name)
        return relax.call_tir(func, list(call.args[:operands]), relax.TensorType(spec.out_shape, "float32"))
    return legalize


# CPU: ops lowered to sparsefx's kernels, not TVM's TOPI (each falls back to TOPI where its kernel does not apply)
OWN_LEGALIZE = {"relax.nn.max_pool2d": own_legalization(pool.spec_of, pool.kernel, 1),
                "relax.nn.avg_pool2d": own_legalization(pool.spec_of, pool.kernel, 1),
                "relax.nn.layer_norm": own_legalization(layer_norm.spec_of, layer_norm.kernel, 3)}


def optimize_passes() -> list[NamedPass]:
    """Graph-level clean-up before any dispatch decision: BN and friends become element-wise
    arithmetic on constants, which FoldConstant then folds."""
    return [
        ("FoldBatchnormToConv2D", relax.transform.FoldBatchnormToConv2D()),
        ("DecomposeOpsForInference", relax.transform.DecomposeOpsForInference()),
        ("CanonicalizeBindings", relax.transform.CanonicalizeBindings()),
        ("FuseSiLU", silu_pass),  # x * sigmoid(x) as silu: a conv epilogue the dispatch fuses
        ("NumpyFoldConstant", numpy_fold_pass),  # BN's arithmetic on weights, without an LLVM build per op
        ("FoldConstant", relax.transform.FoldConstant()),
        ("DeadCodeElimination", relax.transform.DeadCodeElimination()),
    ]


def lowering_passes(target: Target, tvm_target: tvm.target.Target, tuned: tvm.transform.Pass | None) -> list[NamedPass]:
    generic = gpu_generic if target.is_gpu else cpu_generic
    passes: list[NamedPass] = [(type(p).__name__, p) for p in generic.library_dispatch_passes(tvm_target)]
    passes += [
        ("SparseKernels", sparse_kernel_pass(tvm_target)),  # sparse layers' kernels for this target
        ("LegalizeOps", relax.transform.LegalizeOps(None if target.is_gpu else OWN_LEGALIZE)),
        ("AnnotateTIROpPattern", relax.transform.AnnotateTIROpPattern()),
        ("FoldConstant", relax.transform.FoldConstant()),
        ("FuseOps", relax.transform.FuseOps()),
        ("FuseTIR", relax.transform.FuseTIR()),
    ]
    if tuned is not None:
        passes.append(("MetaScheduleApplyDatabase", tuned))
    passes.append(("DefaultSchedule", default_schedule_pass(tvm_target, target.vector_bits or 512)))
    passes += [(type(p).__name__, p) for p in generic.dataflow_lower_passes(tvm_target)]
    passes += [(type(p).__name__, p) for p in generic.finalize_passes(tvm_target)]
    return passes


def run(passes: list[NamedPass], mod: tvm.IRModule, tvm_target: tvm.target.Target) -> tvm.IRModule:
    with tvm_target, tvm.transform.PassContext(opt_level=3):
        for _, p in passes:
            mod = p(mod)
    return mod


def as_pipeline(passes: list[NamedPass]) -> tvm.transform.Pass:
    return tvm.transform.Sequential([p for _, p in passes], name="sparsefx")


def build_module(mod: tvm.IRModule, tvm_target: tvm.target.Target, target: Target) -> tvm.runtime.Executable:
    """Lower an (already optimised) Relax module with sparsefx's untuned pipeline and build it."""
    with build_context(tvm_target):
        return tvm.compile(mod, tvm_target, relax_pipeline=as_pipeline(lowering_passes(target, tvm_target, None)))


def decide_dispatch(mod: tvm.IRModule, target: Target, timer_for: Callable[[Iterable[dict]], Timer],
                    progress: Callable[[str], None] | None = None, bar: bool = False) -> dict[str, dict]:
    """Measured choice of implementation for each conv, matmul and math-op (`math_ops`) kernel of `mod`
    (CPU targets), by the timer `timer_for(earlier decisions)` makes; status lines to `progress`, and a
    progress bar over the kernels to measure where `bar`."""
    table = DispatchTable(table_key(target, torch.get_num_threads()))
    kernels = collect_kernels(mod)
    fresh = [k for k in kernels if k.key not in table.entries]
    if progress and fresh:
        progress(f"measuring {len(fresh)} conv/matmul/math-op workloads on PyTorch kernels, and on TIR where it could win")
    timer = timer_for(table.entries.values())
    with tqdm(total=len(fresh), desc="measuring kernels", unit=" kernel", disable=not (bar and fresh),
              file=sys.stderr, leave=False) as meter:
        timer.progress = meter.update  # per kernel timed (`HostTimer.time`)
        decisions = table.decide(kernels, timer)
    if progress and fresh:
        by = [table.entries[k.key].get("decided_by") for k in fresh]
        own = ", ".join(f"{by.count(kind)} {kind}" for kind in own_kernels.KERNELS if by.count(kind)) or "0 own"
        progress(f"{by.count('measured')} built in TIR, {own} (sparsefx's kernels, not TIR's default), "
                 f"{by.count('prefilter')} decided by the pre-filter (PyTorch far faster)")
    return decisions


def decide_by_kind(mod: tvm.IRModule) -> dict[str, dict]:
    """Each conv on sparsefx's own kernel where it has one, everything else in TIR: nothing timed and
    nothing on PyTorch, for runtime-only bundles (they carry no PyTorch) and CPUs other than this one."""
    return {k.key: {"impl": own[0] if own else "tir", "decided_by": "kind"}
            for k in collect_kernels(mod) for own in [own_kernels.own_kernel(k)]}


def dispatch(decisions: dict[str, dict], precision: str = "fp32") -> list[NamedPass]:
    passes = [("FuseOwnKernels", own_kernel_pass(decisions)), ("FuseOwnLinear", own_linear_pass(decisions)),
              ("FuseOwnAttention", own_attention_pass(decisions)),
              ("ChainLayouts", layout_chain_pass),
              ("FuseTorchEpilogue", epilogue_pass(decisions, precision)),
              ("DispatchToTorch", dispatch_pass(decisions, precision))]
    passes += [("ChainBf16", bf16_chain_pass)] if precision == "bf16" else []
    return passes + [("ResidualInPlace", residual_in_place_pass)]
