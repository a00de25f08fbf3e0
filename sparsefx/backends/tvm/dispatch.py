"""Kernel dispatch: run an op on the faster of TVM's TIR and PyTorch's CPU kernels.

Untuned TIR convolutions run far slower than oneDNN/MKL. For every convolution and
matmul workload the compiler measures both implementations on the target and rewrites
the ones PyTorch wins into `call_pure_packed` calls of the kernels registered here; the
decisions (with both timings) are cached per target and recorded in the artifact.
Workloads PyTorch runs far faster than TIR's default schedules can (see `prefilter`) are
decided without a TIR build.
Those calls need `import sparsefx` (and torch) where the artifact runs; GPU builds and
`dispatch=False` never use them.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import tvm
import tvm_ffi
from tvm import relax

from ...target import cache_dir
from . import prefilter

CONV = "sparsefx.torch.conv2d"
CONV_EPILOGUE = "sparsefx.torch.conv2d_bias"
CONV_RESIDUAL = "sparsefx.torch.conv2d_bias_residual"
MATMUL = "sparsefx.torch.matmul"


def _conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, attrs: tuple[int, ...]) -> torch.Tensor:
    """PyTorch's conv2d for a workload's attrs (stride, padding, dilation pairs, groups)."""
    s0, s1, p0, p1, d0, d1, groups = attrs
    return F.conv2d(x, w, b, (s0, s1), (p0, p1), (d0, d1), groups)


# The kernels return the tensor PyTorch allocated (shared through DLPack, no copy) rather than
# writing into a buffer TVM allocated, which would cost one more pass over every output.
@tvm_ffi.register_global_func(CONV, override=True)
def _torch_conv2d(x: object, w: object, *attrs: int) -> object:
    return tvm_ffi.from_dlpack(_conv(torch.from_dlpack(x), torch.from_dlpack(w), None, attrs))


@tvm_ffi.register_global_func(CONV_EPILOGUE, override=True)
def _torch_conv2d_epilogue(x: object, w: object, b: object, *attrs_relu: int) -> object:
    """conv + per-channel bias (+ ReLU) in PyTorch: one oneDNN call, then an in-place ReLU."""
    return _conv_tail(x, w, b, None, attrs_relu)


@tvm_ffi.register_global_func(CONV_RESIDUAL, override=True)
def _torch_conv2d_residual(x: object, w: object, b: object, residual: object, *attrs_relu: int) -> object:
    """conv + bias + residual (+ ReLU): the ResNet block tail, without leaving PyTorch."""
    return _conv_tail(x, w, b, residual, attrs_relu)


def _conv_tail(x: object, w: object, b: object, residual: object | None, attrs_relu: tuple[int, ...]) -> object:
    *attrs, relu = attrs_relu
    out = _conv(torch.from_dlpack(x), torch.from_dlpack(w), torch.from_dlpack(b).reshape(-1), tuple(attrs))
    if residual is not None:
        out.add_(torch.from_dlpack(residual))
    return tvm_ffi.from_dlpack(out.relu_() if relu else out)


@tvm_ffi.register_global_func(MATMUL, override=True)
def _torch_matmul(a: object, b: object) -> object:
    return tvm_ffi.from_dlpack(torch.matmul(torch.from_dlpack(a), torch.from_dlpack(b)).contiguous())


@dataclass(frozen=True)
class Workload:
    """One op at one shape: the unit the dispatch decision is made for."""

    op: str
    shapes: tuple[tuple[int, ...], ...]
    attrs: tuple[int, ...]

    @property
    def key(self) -> str:
        return f"{self.op}|{self.shapes}|{self.attrs}"

    @property
    def flops(self) -> float:
        if self.op == "conv2d":
            (n, _, _, _), (co, ci, kh, kw), (_, _, oh, ow) = self.shapes
            return 2.0 * n * co * oh * ow * ci * kh * kw
        a, _, out = self.shapes
        return 2.0 * float(np.prod(out)) * a[-1]


def workload_of(call: relax.Call) -> Workload | None:
    """The workload of a dispatchable call, or None (unsupported attributes, symbolic shapes)."""
    if not isinstance(call.op, tvm.ir.Op):
        return None
    try:
        shapes = tuple(tuple(int(d) for d in arg.ty.shape) for arg in call.args) + (
            tuple(int(d) for d in call.ty.shape),)
    except (TypeError, AttributeError):
        return None
    if call.op.name == "relax.nn.conv2d":
        a = call.attrs
        pad = [int(v) for v in a.padding]
        if a.data_layout != "NCHW" or a.kernel_layout != "OIHW" or pad[0] != pad[2] or pad[1] != pad[3] \
                or str(call.ty.dtype) != "float32":
            return None
        s, d = [int(v) for v in a.strides], [int(v) for v in a.dilation]
        return Workload("conv2d", shapes, (s[0], s[1], pad[0], pad[1], d[0], d[1], int(a.groups)))
    if call.op.name == "relax.matmul" and str(call.ty.dtype) == "float32" and len(shapes[0]) >= 2 \
            and len(shapes[1]) >= 2:
        return Workload("matmul", shapes, ())
    return None


def _torch_time(w: Workload, repeat: int = 10) -> float:
    a, b = (torch.randn(s) for s in w.shapes[:2])
    return _best_time(lambda: _conv(a, b, None, w.attrs) if w.op == "conv2d" else torch.matmul(a, b), repeat)


def _best_time(run: object, repeat: int) -> float:
    """Fastest of `repeat` runs in ms: on a shared CPU the minimum is what the kernel can do,
    the median is what the neighbours let it do."""
    run()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return float(np.min(times)) * 1e3


def _tir_times(workloads: list[Workload], target: tvm.target.Target, build: object,
               repeat: int = 5) -> list[float]:
    """Compile every op alone, all in one module (one LLVM build), with the TIR pipeline the
    model gets, and time each."""
    bb = relax.BlockBuilder()
    for i, w in enumerate(workloads):
        params = [relax.Var(f"x{j}", relax.TensorType(s, "float32")) for j, s in enumerate(w.shapes[:2])]
        with bb.function(f"op{i}", params):
            with bb.dataflow():
                if w.op == "conv2d":
                    s0, s1, p0, p1, d0, d1, g = w.attrs
                    out = bb.emit(relax.op.nn.conv2d(params[0], params[1], (s0, s1), (p0, p1, p0, p1), (d0, d1), g))
                else:
                    out = bb.emit(relax.op.matmul(params[0], params[1]))
                result = bb.emit_output(out)
            bb.emit_func_output(result)
    vm = relax.VirtualMachine(build(bb.get(), target), tvm.cpu())
    times = []
    for i, w in enumerate(workloads):
        args = [tvm.runtime.tensor(np.random.randn(*s).astype("float32")) for s in w.shapes[:2]]
        once = _best_time(lambda i=i, args=args: vm[f"op{i}"](*args), 1)
        times.append(once if once > 50 else _best_time(lambda i=i, args=args: vm[f"op{i}"](*args), repeat))
    return times


class DispatchTable:
    """Measured per-workload choice between 'tir' and 'torch', cached on disk per target.

    Every new workload is timed on PyTorch; only those the pre-filter cannot rule out are built
    and timed in TIR. Entries the filter decided say so (`decided_by: prefilter`, `tir_ms: None`)."""

    def __init__(self, target_key: str) -> None:
        self.path = cache_dir() / "dispatch" / f"{target_key}.json"
        self.entries: dict[str, dict] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def decide(self, workloads: list[Workload], target: tvm.target.Target, build: object) -> dict[str, dict]:
        new = {w.key: w for w in workloads if w.key not in self.entries}
        if new:
            candidates = [prefilter.Candidate(w.key, prefilter.op_class(w.op, w.attrs), w.flops / 1e9, _torch_time(w))
                          for w in new.values()]
            first = prefilter.calibration(candidates, self.entries.values())
            self._measure(first, new, target, build)
            ceilings = prefilter.tir_ceilings(self.entries.values())
            rest = []
            for c in candidates:
                if c.key in self.entries:
                    continue
                ceiling = prefilter.skip(c, ceilings)
                if ceiling is None:
                    rest.append(c)
                else:
                    self.entries[c.key] = {**self._entry(c, None), "decided_by": "prefilter",
                                           "tir_ceiling_gflops": round(ceiling, 2)}
            self._measure(rest, new, target, build)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.entries, indent=1))
        return {w.key: self.entries[w.key] for w in workloads}

    def _measure(self, candidates: list[prefilter.Candidate], workloads: dict[str, Workload],
                 target: tvm.target.Target, build: object) -> None:
        if candidates:
            times = _tir_times([workloads[c.key] for c in candidates], target, build)
            for c, tir_ms in zip(candidates, times, strict=True):
                self.entries[c.key] = {**self._entry(c, tir_ms), "decided_by": "measured"}

    @staticmethod
    def _entry(c: prefilter.Candidate, tir_ms: float | None) -> dict:
        impl = "torch" if tir_ms is None or c.torch_ms < tir_ms else "tir"
        return {"impl": impl, "torch_ms": c.torch_ms, "tir_ms": tir_ms, "gflop": c.gflop, "op_class": c.op_class}


def dispatch_pass(decisions: dict[str, dict]) -> tvm.transform.Pass:
    """Relax pass: rewrite calls whose workload was decided 'torch' into packed calls."""

    @relax.expr_functor.mutator
    class _Rewrite(relax.PyExprMutator):
        def visit_call_(self, call: relax.Call) -> relax.Expr:
            call = super().visit_call_(call)
            w = workload_of(call)
            if w is None or decisions.get(w.key, {}).get("impl") != "torch":
                return call
            if w.op == "conv2d":
                extra = [relax.prim_value(v) for v in w.attrs]
                return relax.call_pure_packed(CONV, call.args[0], call.args[1], *extra, ty_args=call.ty)
            return relax.call_pure_packed(MATMUL, call.args[0], call.args[1], ty_args=call.ty)

    return _each_relax_function("DispatchToTorch", lambda func: _Rewrite().visit_expr(func))


def _each_relax_function(name: str, rewrite: object) -> tvm.transform.Pass:
    """A module pass that applies `rewrite` to every Relax function of the module."""

    @tvm.transform.module_pass(opt_level=0, name=name)
    def _pass(mod: tvm.IRModule, _ctx: object) -> tvm.IRModule:
        for gvar, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                mod[gvar] = rewrite(func)
        return mod

    return _pass


def _per_channel(bias: relax.Expr, channels: int) -> bool:
    shape = [int(d) for d in bias.ty.shape]
    return shape in ([1, channels, 1, 1], [channels, 1, 1])


def epilogue_pass(decisions: dict[str, dict]) -> tvm.transform.Pass:
    """Relax pass: a conv PyTorch runs keeps its bias, residual add and ReLU in the same
    call, so no TIR kernel has to re-read its output (runs before `dispatch_pass`)."""
    from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard

    x, w, b, residual = wildcard(), is_const(), is_const(), wildcard()
    conv = is_op("relax.nn.conv2d")(x, w)
    biased = is_op("relax.add")(conv, b)
    summed = is_op("relax.add")(biased, residual) | is_op("relax.add")(residual, biased)
    patterns = [is_op("relax.nn.relu")(summed), is_op("relax.nn.relu")(biased), summed, biased]

    def rewriter(expr: relax.Expr, matches: dict) -> relax.Expr:
        call = matches[conv]
        wl = workload_of(call)
        if wl is None or decisions.get(wl.key, {}).get("impl") != "torch" or \
                not _per_channel(matches[b], wl.shapes[1][0]):
            return expr
        relu = relax.prim_value(int(isinstance(expr, relax.Call) and expr.op.name == "relax.nn.relu"))
        attrs = [relax.prim_value(v) for v in wl.attrs]
        if residual in matches:  # only the patterns with the residual add bind it
            if [int(d) for d in matches[residual].ty.shape] != list(wl.shapes[2]):
                return expr
            return relax.call_pure_packed(CONV_RESIDUAL, matches[x], matches[w], matches[b], matches[residual],
                                          *attrs, relu, ty_args=expr.ty)
        return relax.call_pure_packed(CONV_EPILOGUE, matches[x], matches[w], matches[b], *attrs, relu,
                                      ty_args=expr.ty)

    def rewrite_all(func: relax.Function) -> relax.Function:
        for pattern in patterns:
            func = rewrite_call(pattern, rewriter, func)
        return func

    return _each_relax_function("FuseTorchEpilogue", rewrite_all)


def collect_workloads(mod: tvm.IRModule) -> list[Workload]:
    found: dict[str, Workload] = {}

    @relax.expr_functor.visitor
    class _Collect(relax.PyExprVisitor):
        def visit_call_(self, call: relax.Call) -> None:
            super().visit_call_(call)
            w = workload_of(call)
            if w is not None:
                found.setdefault(w.key, w)

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            _Collect().visit_expr(func)
    return list(found.values())
