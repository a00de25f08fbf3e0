"""Kernel dispatch: run an op on the faster of TVM's TIR and PyTorch's CPU kernels.

Untuned TIR convolutions run far slower than oneDNN/MKL. For every convolution and
matmul workload the compiler measures both implementations on the target and rewrites
the ones PyTorch wins into `call_pure_packed` calls of the kernels in `torch_kernels`; the
decisions (with both timings) are cached per target and recorded in the artifact.
Workloads PyTorch runs far faster than TIR's default schedules can (see `prefilter`) are
decided without a TIR build.
Those calls need `import sparsefx` (and torch) where the artifact runs; GPU builds and
`dispatch=False` never use them.
"""

from __future__ import annotations

import functools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import tvm
from tvm import relax

from sparsefx.backends.tvm.dispatch import prefilter
from sparsefx.backends.tvm.dispatch.math_ops import BY_NAME, MATH_OPS
from sparsefx.backends.tvm.dispatch.torch_kernels import (
    ACTIVATIONS,
    CONV,
    CONV_EPILOGUE,
    CONV_RESIDUAL,
    MATMUL,
    best_time,
    conv,
    forget_packed,
    torch_time,
    weight_key,
)
from sparsefx.backends.tvm.kernels import registry as own_kernels
from sparsefx.cache import Table, cache_dir

TABLE_VERSION = 7  # v7: own kernels timed in turn with PyTorch's, caches flushed (`duel`); `direct` since v6, `pointwise` v5


@dataclass(frozen=True)
class Workload:
    """One op at one shape: the unit the dispatch decision is made for."""

    op: str
    shapes: tuple[tuple[int, ...], ...]  # inputs..., output
    attrs: tuple[float, ...]

    @property
    def key(self) -> str:
        return f"{self.op}|{self.shapes}|{self.attrs}"

    @property
    def flops(self) -> float:
        """FLOPs of a conv or matmul; for a math op (`math_ops`) its output's element count."""
        if self.op in BY_NAME:
            return float(np.prod(self.shapes[-1]))
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
    if call.op.name in MATH_OPS and str(call.ty.dtype) == "float32":
        attrs = MATH_OPS[call.op.name].attrs(call, len(shapes[0]))
        return None if attrs is None else Workload(MATH_OPS[call.op.name].name, shapes, attrs)
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


def _torch_time(w: Workload) -> tuple[float, bool]:
    """Best PyTorch time in ms, and whether prepacked weights gave it (convs only)."""
    if w.op in BY_NAME:
        args = [torch.randn(s) for s in w.shapes[:-1]]
        return best_time(lambda: BY_NAME[w.op].run(args, w.attrs), 10), False
    return torch_time(w.op, w.shapes, w.attrs)


def _tir_times(workloads: list[Workload], target: tvm.target.Target, build: object,
               repeat: int = 5) -> list[float]:
    """Compile every op alone, all in one module (one LLVM build), with the TIR pipeline the
    model gets, and time each."""
    bb = relax.BlockBuilder()
    for i, w in enumerate(workloads):
        params = [relax.Var(f"x{j}", relax.TensorType(s, "float32")) for j, s in enumerate(w.shapes[:-1])]
        with bb.function(f"op{i}", params):
            with bb.dataflow():
                if w.op in BY_NAME:
                    out = bb.emit(BY_NAME[w.op].emit(params, w.attrs))
                elif w.op == "conv2d":
                    s0, s1, p0, p1, d0, d1, g = w.attrs
                    out = bb.emit(relax.op.nn.conv2d(params[0], params[1], (s0, s1), (p0, p1, p0, p1), (d0, d1), g))
                else:
                    out = bb.emit(relax.op.matmul(params[0], params[1]))
                result = bb.emit_output(out)
            bb.emit_func_output(result)
    vm = relax.VirtualMachine(build(bb.get(), target), tvm.cpu())
    times = []
    for i, w in enumerate(workloads):
        args = [tvm.runtime.tensor(np.random.randn(*s).astype("float32")) for s in w.shapes[:-1]]
        once = best_time(lambda i=i, args=args: vm[f"op{i}"](*args), 1)
        times.append(once if once > 50 else best_time(lambda i=i, args=args: vm[f"op{i}"](*args), repeat))
    return times


class DispatchTable:
    """Measured per-workload choice between 'tir' and 'torch', cached on disk per target.

    Every new workload is timed on PyTorch; only those the pre-filter cannot rule out are built
    and timed in TIR. Entries the filter decided say so (`decided_by: prefilter`, `tir_ms: None`)."""

    def __init__(self, target_key: str) -> None:
        self.table = Table(cache_dir() / "dispatch" / f"{target_key}.json", TABLE_VERSION)
        self.entries: dict[str, dict] = self.table.entries

    def decide(self, workloads: list[Workload], target: tvm.target.Target, build: object) -> dict[str, dict]:
        new = {w.key: w for w in workloads if w.key not in self.entries}
        if new:
            timed = {key: _torch_time(w) for key, w in new.items()}
            candidates = [prefilter.Candidate(w.key, prefilter.op_class(w.op, w.attrs), w.flops / 1e9, timed[w.key][0])
                          for w in new.values()]
            # sparsefx's own kernels are TIR schedules written for exactly these convs; the depthwise
            # one beat the default schedule on all 11 MobileNetV2 shapes both were timed on (and TIR's
            # default dense conv runs 10-50x slower than PyTorch), so only they are built besides PyTorch's
            own = {w.key: kind for w in new.values() if w.op == "conv2d"
                   and (kind := own_kernels.kind_of(w.attrs, w.shapes)) is not None}
            for c in candidates:
                if c.key in own:
                    self.entries[c.key] = {**self._entry(c, None), "decided_by": own[c.key]}
            candidates = [c for c in candidates if c.key not in own]
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
            for key, (_, prepack) in timed.items():
                self.entries[key]["prepack"] = prepack
            flush = flusher() if own else None  # one 64 MiB buffer for every kind's duels
            for kind in dict.fromkeys(own.values()):
                self._measure_own(kind, [new[key] for key, k in own.items() if k == kind], target, flush)
            self.table.save()
        return {w.key: self.entries[w.key] for w in workloads}

    def _measure(self, candidates: list[prefilter.Candidate], workloads: dict[str, Workload],
                 target: tvm.target.Target, build: object) -> None:
        if candidates:
            times = _tir_times([workloads[c.key] for c in candidates], target, build)
            for c, tir_ms in zip(candidates, times, strict=True):
                self.entries[c.key] = {**self._entry(c, tir_ms), "decided_by": "measured"}

    def _measure_own(self, kind: str, workloads: list[Workload], target: tvm.target.Target,
                     flush: Callable[[], object]) -> None:
        """Time an own kernel (one build for all its workloads) in turn with PyTorch's (`duel`), and
        keep it where it wins."""
        specs = [own_kernels.KERNELS[kind].spec_of(w.attrs, w.shapes) for w in workloads]
        library = own_kernels.build(kind, specs, target)
        for w, spec in zip(workloads, specs, strict=True):
            args = [tvm.runtime.tensor(np.random.randn(*shape).astype("float32")) for shape in spec.arg_shapes]
            run = library[spec.name]  # looked up once: a library lookup costs 10-80 us, more than small kernels
            entry = self.entries[w.key]
            x, weight = torch.randn(w.shapes[0]), torch.randn(w.shapes[1])
            key = (random.getrandbits(62) or 1) if entry["prepack"] else 0
            ms, torch_ms = duel([functools.partial(run, *args), functools.partial(conv, x, weight, None, w.attrs, key)],
                                flush=flush)
            forget_packed([key])
            entry[f"{kind}_ms"], entry["torch_flushed_ms"] = ms, torch_ms
            if ms < min(torch_ms + call_overhead_ms(), entry["tir_ms"] or float("inf")):
                entry["impl"] = kind

    @staticmethod
    def _entry(c: prefilter.Candidate, tir_ms: float | None) -> dict:
        impl = "torch" if tir_ms is None or c.torch_ms + call_overhead_ms() < tir_ms else "tir"
        return {"impl": impl, "torch_ms": c.torch_ms, "tir_ms": tir_ms, "gflop": c.gflop, "op_class": c.op_class}


EVICT_BYTES = 64 << 20  # written before each run of a duel: more than the caches hold of a model's weights


def duel(runs: list[Callable[[], object]], rounds: int = 5, flush: Callable[[], object] | None = None) -> list[float]:
    """Best ms of each of `runs`, timed in turn round after round, each run after the caches were
    flushed. In a model a kernel reads weights that other ops have evicted: timed hot, PyTorch's convs
    looked 2-3x faster than they ran there, and won near-ties they lose in the model (EfficientNet-B0's
    72 -> 12 1x1 at 56x56: 0.04 ms hot, 0.15-0.3 in the model; its 320 -> 1280 at 7x7: 0.35 ms hot or
    after an 8 MiB flush, 0.96 after 64 MiB, 1.0-1.3 in the model, where sparsefx's kernel took 0.75
    after 64 MiB). Timing the rivals in turn also keeps a drift of the host's speed out of the comparison."""
    flush = flush or flusher()
    best = [float("inf")] * len(runs)
    for run in runs:
        run()
    for _ in range(rounds):
        for i, run in enumerate(runs):
            flush()
            start = time.perf_counter()
            run()
            best[i] = min(best[i], time.perf_counter() - start)
    return [b * 1e3 for b in best]


def flusher() -> Callable[[], None]:
    """Writes EVICT_BYTES when called (its buffer allocated once: paging in 64 MiB costs 0.16 s, writing it 9 ms)."""
    junk = np.ones(EVICT_BYTES // 4, "float32")
    return lambda: junk.fill(1.0)


@functools.cache
def call_overhead_ms() -> float:
    """ms a PyTorch kernel costs the compiled model beyond the kernel itself: the call out through a
    packed function and the DLPack hand-overs (about 0.01 ms here). TIR kernels are called in place;
    the comparison charges it to PyTorch, so small kernels within it of a TIR one stay in TIR."""
    x, w, b = torch.ones(1, 1, 1, 1), torch.ones(1, 1, 1, 1), torch.ones(1)
    packed, args = tvm.get_global_func(CONV_EPILOGUE), [tvm.runtime.tensor(t.numpy()) for t in (x, w, b)]
    attrs = (1, 1, 0, 0, 1, 1, 1)
    through = best_time(lambda: packed(*args, *attrs, 0, 0), 200)
    return max(through - best_time(lambda: conv(x, w, b, attrs), 200), 0.0)


def dispatch_pass(decisions: dict[str, dict]) -> tvm.transform.Pass:
    """Relax pass: rewrite calls whose workload was decided 'torch' into packed calls."""

    @relax.expr_functor.mutator
    class _Rewrite(relax.PyExprMutator):
        def visit_call_(self, call: relax.Call) -> relax.Expr:
            call = super().visit_call_(call)
            w = workload_of(call)
            if w is None or decisions.get(w.key, {}).get("impl") != "torch":
                return call
            if w.op in BY_NAME:
                attrs = [relax.prim_value(a) for a in w.attrs]
                return relax.call_pure_packed(BY_NAME[w.op].packed, *call.args, *attrs, ty_args=call.ty)
            if w.op == "conv2d":
                extra = [relax.prim_value(v) for v in (*w.attrs, _key(call.args[1], decisions[w.key]))]
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


def _key(weight: relax.Expr, decision: dict) -> int:
    """The prepacking key of a constant weight where prepacking measured faster; 0: plain F.conv2d."""
    if not decision.get("prepack") or not isinstance(weight, tvm.ir.expr.Constant):
        return 0
    return weight_key(weight.value.numpy())


def _shape(expr: relax.Expr) -> list[int]:
    return [int(d) for d in expr.ty.shape]


def _per_channel(bias: relax.Expr, channels: int) -> bool:
    return _shape(bias) in ([1, channels, 1, 1], [channels, 1, 1])


@dataclass(frozen=True)
class EpiloguePatterns:
    """Patterns for a conv with its per-channel bias, a residual add and an activation after it, the
    longest first; `x`, `w`, `b`, `residual`, `conv` name their parts in a match."""

    x: object
    w: object
    b: object
    residual: object
    conv: object
    patterns: tuple


def epilogue_patterns(x: object = None) -> EpiloguePatterns:
    """The patterns over a conv whose input matches `x` (any expression by default)."""
    from tvm.relax.dpl import is_const, is_op, wildcard

    x, w, b, residual = x or wildcard(), is_const(), is_const(), wildcard()
    conv = is_op("relax.nn.conv2d")(x, w)
    biased = is_op("relax.add")(conv, b)
    # both orders of the add as patterns of their own, not one `|`: a match does not fall back to the
    # other order when the rewriter turns it down (ResNet-50's relu(conv3 on PyTorch + strided 1x1 on
    # sparsefx's kernel))
    summed = (is_op("relax.add")(biased, residual), is_op("relax.add")(residual, biased))
    activations = (is_op("relax.nn.relu"), is_op("relax.nn.silu"),
                   lambda t: is_op("relax.clip")(t, wildcard(), wildcard()))
    patterns = [act(inner) for inner in (*summed, biased) for act in activations] + [*summed, biased]
    return EpiloguePatterns(x, w, b, residual, conv, tuple(patterns))


def epilogue_pass(decisions: dict[str, dict]) -> tvm.transform.Pass:
    """Relax pass: a conv PyTorch runs keeps its bias, residual add and activation (ReLU, ReLU6,
    SiLU) in the same call, so no TIR kernel has to re-read its output (runs before `dispatch_pass`)."""
    from tvm.relax.dpl import rewrite_call

    ep = epilogue_patterns()
    x, w, b, residual, conv = ep.x, ep.w, ep.b, ep.residual, ep.conv

    def rewriter(expr: relax.Expr, matches: dict) -> relax.Expr:
        call = matches[conv]
        wl = workload_of(call)
        act = _activation(expr)
        if wl is None or act is None or decisions.get(wl.key, {}).get("impl") != "torch" or \
                not _per_channel(matches[b], wl.shapes[1][0]):
            return expr
        attrs = [relax.prim_value(v) for v in (*wl.attrs, _key(matches[w], decisions[wl.key]),
                                               ACTIVATIONS.index(act))]
        if residual in matches:  # only the patterns with the residual add bind it
            if _shape(matches[residual]) != list(wl.shapes[2]):
                return expr
            return relax.call_pure_packed(CONV_RESIDUAL, matches[x], matches[w], matches[b], matches[residual],
                                          *attrs, ty_args=expr.ty)
        return relax.call_pure_packed(CONV_EPILOGUE, matches[x], matches[w], matches[b], *attrs, ty_args=expr.ty)

    def rewrite_all(func: relax.Function) -> relax.Function:
        for pattern in ep.patterns:
            func = rewrite_call(pattern, rewriter, func)
        return func

    return _each_relax_function("FuseTorchEpilogue", rewrite_all)


def _activation(expr: relax.Expr) -> str | None:
    """The activation a matched epilogue ends in ('none' for a bare add); None for a clip other than ReLU6."""
    name = expr.op.name if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) else ""
    if name == "relax.clip":
        bounds = [getattr(a, "value", None) for a in expr.args[1:]]
        return "relu6" if [float(v) if v is not None else None for v in bounds] == [0.0, 6.0] else None
    return {"relax.nn.relu": "relu", "relax.nn.silu": "silu"}.get(name, "none")


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
