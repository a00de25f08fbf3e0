"""The TVM backend's `Timer` for this host's CPU: what the compiled model can run a kernel on, timed.

Implementations of one kernel (see `cost.timing` for how they are timed):
- "torch", "torch_prepacked": the PyTorch kernel a dispatched op calls (`dispatch.torch_kernels`),
  a conv plain or on oneDNN with its weight prepacked, with its bias and epilogue, in the
  target's precision (bf16 convs and matmuls cast their input and output as the model's do);
  a float32 conv each run on memory the C heap has just handed back to the system, as inside a
  model (`release_freed_memory`), a bf16 linear beside `amx_linear` charged what it loses there
  (`PYTORCH_LINEAR_AMID_TILES`);
- every float32 conv, PyTorch's or own, each run on an input written just before (`rewrite_input`),
  as the layer before leaves it in a model;
- "blocked", "blocked_depthwise", and for what they leave "depthwise", "pointwise", "direct":
  sparsefx's own TIR kernel for the conv (`kernels.registry`), all of one kind in one LLVM build;
  "amx" in bf16 where the CPU has AMX tiles, else "dpbf16" (AVX512-BF16); those and the blocked kinds
  (NCHW16c) timed as chained
  (in their layout in and out), the rivals that break the chain charged the conversions out of it
  and back (`add_edge_casts`);
  "linear", "amx_linear" for a matmul by a weight;
- "tir": TVM's default schedule through the model's pipeline, only where the pre-filter
  (`dispatch.prefilter`) cannot rule it out, or where asked for by name.
PyTorch's kernels cost the model a call out of the VM beyond their time (`overheads`).
"""

from __future__ import annotations

import ctypes
import functools
import math
import random
import time
from collections.abc import Callable, Iterable, Sequence

import torch
import tvm
from tvm import relax

from sparsefx.backends.tvm.dispatch import prefilter
from sparsefx.backends.tvm.dispatch.math_ops import BY_NAME
from sparsefx.backends.tvm.dispatch.torch_kernels import (
    CONV_EPILOGUE,
    PREPACK,
    TORCH_IMPLEMENTATIONS,
    conv,
    forget_packed,
    matmul,
)
from sparsefx.backends.tvm.kernels import amx
from sparsefx.backends.tvm.kernels import blocked as blocked_conv
from sparsefx.backends.tvm.kernels import linear as linear_kernel
from sparsefx.backends.tvm.kernels import registry as own_kernels
from sparsefx.backends.tvm.kernels.blocked_layout import BLOCK, blocked, stored
from sparsefx.backends.tvm.kernels.workers import build_kernels
from sparsefx.backends.tvm.measure.calibrate import calibrate
from sparsefx.backends.tvm.measure.emit import emit_kernel, operand_shapes
from sparsefx.backends.tvm.pipeline import build_module
from sparsefx.backends.tvm.threads import running_with
from sparsefx.cost.kernel import Kernel
from sparsefx.cost.timing import Times, cold_traffic, time_in_turn, weight_copies
from sparsefx.target import Target

# an own kernel and PyTorch's timed apart (`time_rivals`) closer than this are timed again in turn
NEAR_TIE = 1.25
SLOW_MS = 50.0  # a default-TIR kernel that took longer once is not run again: its time is not in doubt
# PyTorch's bf16 linear (oneDNN, prepacked) in a model of AMX tile kernels, in-model over timed: a
# classifier's 1024 -> 1000 0.305 / 0.156 ms, 2048 -> 1000 0.46-0.55 / 0.27-0.34 (pruned and dense
# ResNet-50, one thread); `amx_linear` ran 0.08 ms in the model against 0.09-0.21 timed (both read a
# cold weight when timed, at memory's bandwidth: a tie the noise decided). Charged where `amx_linear` competes.
PYTORCH_LINEAR_AMID_TILES = 1.6
Build = Callable[[tvm.IRModule, tvm.target.Target], object]


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc
    except (AttributeError, OSError):
        return None


def release_freed_memory() -> None:
    """Hand the C heap's free memory back to the system (glibc's `malloc_trim`), as it stands between two
    calls of one layer in a compiled model, whose other PyTorch calls free their outputs meanwhile: a
    PyTorch kernel then takes fresh pages for its output and oneDNN's reorders, and faults on each.
    Timed back to back it reused the pages its last run freed: ResNet-18's stem at 8 images (one
    thread) 13-15 ms timed so, 29-30 ms after a trim (12,556 page faults a run), 26.6 ms in the model;
    ResNet-50's 1x1 256 -> 64 at 56x56, one image, 0.53 -> 0.69 ms (the model ran its float32 convs on
    PyTorch 1.43x their untrimmed timing, the own kernels 1.22x). Where there is no glibc, nothing.
    Convs only: a matmul's output is small (BERT-base's, 128 x 768), and released before each run
    pruned BERT-base's 384 -> 768 went to `linear`, which ran the model 2% slower."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def before_run(name: str, runs: Sequence[Callable[[], object]]) -> Callable[[], None]:
    """What a float32 conv's run `name` finds in a model, made before each timed run: its input just
    written (`rewrite_input`), and for PyTorch's kernels the freed memory released (`release_freed_memory`)."""
    rewrite = rewrite_input(runs)
    if name not in TORCH_IMPLEMENTATIONS:
        return rewrite

    def released_and_rewritten() -> None:
        release_freed_memory()
        rewrite()

    return released_and_rewritten


def rewrite_input(runs: Sequence[Callable[[], object]]) -> Callable[[], None]:
    """A call that writes the input of `runs` (each a `functools.partial` on the input first, as
    `torch_rivals` and `cycled_weight_runs` make them) in place, unchanged: in a model a conv reads
    what the layer before has just written, from cache as far as it fits. Timed in turn without it,
    a kernel found its input where the rival before it had pushed it out, and the rival after a
    heavy one lost: ResNet-50's 1x1 256 -> 64 at 56x56 (one image, one thread) took 0.79 ms timed
    alone, 0.96 after PyTorch's prepacked conv, which reorders its input and output each run (0.83
    with the input rewritten), and lost to PyTorch's plain conv (0.89) that beat it in the model
    (1.13-1.31 ms there, the own kernel 0.95-1.02; the whole model 1.5% faster on it)."""
    first = runs[0].args[0]
    x = first if isinstance(first, torch.Tensor) else torch.from_dlpack(first)
    return functools.partial(torch.Tensor.mul_, x, 1.0)


CALL_FLUSH_BYTES = 8 << 20  # what the model's own kernels move between two PyTorch calls, at least


@functools.cache
def call_overhead_ms() -> float:
    """ms a PyTorch kernel costs the compiled model beyond the kernel itself as timed (warm): the call
    out through a packed function and the DLPack hand-overs, with the code and data of that path and
    of PyTorch's dispatcher cold, as the model's TIR kernels between two PyTorch calls leave them.
    Timed warm, a 1x1 conv's call cost 0.008 ms here; after 8 MB of other traffic 0.064, while
    Fashion-MNIST's small ResNet at batch 64 ran its classifier (0.005 ms timed) in 0.10 ms. TIR
    kernels are called in place; the decision charges this to PyTorch, so small kernels within it of
    a TIR one stay in TIR."""
    x, w, b = torch.ones(1, 1, 1, 1), torch.ones(1, 1, 1, 1), torch.ones(1)
    packed, args = tvm.get_global_func(CONV_EPILOGUE), [tvm.runtime.tensor(t.numpy()) for t in (x, w, b)]
    attrs = (1, 1, 0, 0, 1, 1, 1)
    traffic = torch.zeros(CALL_FLUSH_BYTES // 4)
    ms = time_in_turn({"through": [lambda: packed(*args, *attrs, 0, 0, 0)], "direct": [lambda: conv(x, w, b, attrs)]},
                      rounds=(200, 200), before={"through": traffic.sum})
    return max(ms["through"] - ms["direct"], 0.0)


def torch_rivals(kernel: Kernel, precision: str = "fp32") -> tuple[dict[str, list[Callable[[], object]]], list[int]]:
    """The PyTorch runs of `kernel` (one per weight copy) by implementation, in `precision`, and the
    keys of the prepacked or converted weights they make (to forget after timing)."""
    if kernel.op in BY_NAME:  # inputs are activations, just written
        args = [torch.randn(s) for s in operand_shapes(kernel)]
        return {"torch": [lambda: BY_NAME[kernel.op].run(args, kernel.attrs)]}, []
    if kernel.op == "matmul":
        a, b = (torch.randn(s) for s in kernel.shapes[:2])
        if kernel.dims[0] > 1:  # attention's batched matmuls multiply two activations, both just written
            return {"torch": [lambda: matmul(a, b, 0, precision)]}, []
        weights = weight_copies(b.shape)
        keys = [random.getrandbits(62) or 1 for _ in weights]  # bf16: converted copies; fp32: prepacked ones
        if precision != "fp32":
            return {"torch": [functools.partial(matmul, a, w, key, precision) for w, key in zip(weights, keys)]}, keys
        rivals = {"torch": [functools.partial(matmul, a, w) for w in weights]}
        if PREPACK:
            rivals["torch_prepacked"] = [functools.partial(matmul, a, w, key) for w, key in zip(weights, keys)]
        return rivals, keys if PREPACK else []
    x_shape, w_shape, out_shape = kernel.shapes
    act, residual = kernel.epilogue
    x, b = torch.randn(x_shape), torch.randn(w_shape[0])  # BN folds into the bias
    add = torch.randn(out_shape) if residual else None
    if precision == "bf16":  # timed as inside a chain of bf16 convs (`bf16_chain`): bf16 in and out, no casts
        x, add = (t if t is None else t.to(torch.bfloat16, memory_format=torch.channels_last) for t in (x, add))
        precision = "bf16-out"
    weights = weight_copies(w_shape)
    rivals = {"torch": [functools.partial(conv, x, w, b, kernel.conv_attrs, 0, act, add, precision) for w in weights]}
    keys = [random.getrandbits(62) or 1 for _ in weights] if PREPACK else []  # names for the packed copies
    if keys:
        rivals["torch_prepacked"] = [functools.partial(conv, x, w, b, kernel.conv_attrs, key, act, add, precision)
                                     for w, key in zip(weights, keys)]
    return rivals, keys


def _blocked_edges(x: torch.Tensor | None, out: torch.Tensor) -> None:
    """What a PyTorch conv between blocked kernels costs them: its input (n, c/16, h, w, 16) out of
    the layout (none for a stem's image), its NCHW output into it."""
    if x is not None:
        x.permute(0, 1, 4, 2, 3).contiguous()
    n, c, h, w = out.shape
    torch.nn.functional.pad(out, (0, 0, 0, 0, 0, stored(c) - c)).view(n, -1, BLOCK, h, w).permute(0, 1, 3, 4, 2).contiguous()


def _edge_casts(x: torch.Tensor, out: torch.Tensor) -> None:
    """What a float32 kernel between bf16 convs costs them: its input back to float32, its output to bf16."""
    x.to(torch.float32, memory_format=torch.contiguous_format)
    out.to(torch.bfloat16, memory_format=torch.channels_last)


def matrix_vector(kernel: Kernel) -> bool:
    """A matmul by a weight on one row block's rows or fewer (a classifier at a small batch): each
    weight read once, its time how fast the weight streams in, timed with the cold traffic before
    every run. Its weight's copies taken in turn left it warmer than a model does: PyTorch's 2048 ->
    1000 at batch 1 (one thread) 0.53-0.67 ms timed so, 0.80-1.03 in ResNet-50 and 0.87 with the
    traffic before each run; `linear`'s 0.60, 0.58 and 0.69, the dispatch's pick between them a
    coin toss (float32; bf16 left as measured before)."""
    return kernel.op == "matmul" and has_weight(kernel) and kernel.dims[1] <= linear_kernel.ROWS[linear_kernel.BLOCK]


def has_weight(kernel: Kernel) -> bool:
    """Whether the kernel's second operand is a weight (cycled through copies when timed)."""
    return kernel.op == "conv2d" or (kernel.op == "matmul" and kernel.dims[0] == 1)


def random_tensor(shape: Sequence[int], dtype: str = "float32") -> tvm.runtime.Tensor:
    """A TVM tensor of standard normals, made by PyTorch and shared (numpy's took 18 ms for 1x256x56x56);
    "uint16": their bf16 bit patterns."""
    values = torch.randn(tuple(shape))
    return tvm.runtime.from_dlpack(values if dtype == "float32" else values.to(torch.bfloat16).view(torch.uint16))


def cycled_weight_runs(run: Callable[..., object], args: list[tvm.runtime.Tensor]) -> list[Callable[[], object]]:
    """`run` on `args`, one run per timed copy of the weight (the second argument, `weight_copies`); a
    uint16 weight (bf16 bits, pairs in its last axis) is cut from float32 copies of half its size."""
    shape = tuple(args[1].shape)
    if args[1].dtype == "uint16":
        copies = [w.view(torch.uint16) for w in weight_copies((*shape[:-1], shape[-1] // 2))]
    else:
        copies = weight_copies(shape)
    return [functools.partial(run, args[0], tvm.runtime.from_dlpack(w), *args[2:]) for w in copies]


class HostTimer:
    """Times kernels on this host's CPU (`cost.timing.Timer`). `build` compiles a Relax module as the
    model's pipeline does; `history` holds earlier default-TIR and own-kernel measurements (dispatch
    table entries) that set the pre-filter's ceilings, and grows with this timer's."""

    device = ""
    # an own kernel adds the bias and applies ReLU/ReLU6 to its accumulators before it stores them (a
    # max and a min per vector): timed both ways in a cold plan of ResNet-50 (Intel Xeon, 2 threads), the
    # fused kernel ran at 0.86-0.99 (median) of the bare one's time, inside the noise of two timings.
    # A residual add reads another tensor, and SiLU is a polynomial per element: those are timed
    free_epilogues = dict.fromkeys(own_kernels.KERNELS, ("none", "relu", "relu6"))

    def __init__(self, target: Target, build: Build | None = None, history: Iterable[dict] = ()) -> None:
        self.target = target
        self.build = build or (lambda mod, tvm_target: build_module(mod, tvm_target, target))
        self.history = list(history)
        self.own_ruled_out: dict[str, tuple[str, float]] = {}  # kernel key -> (own kind, its ceiling GFLOP/s)
        self.torch_ruled_out: dict[str, float] = {}  # kernel key -> PyTorch's ceiling GFLOP/s
        self.progress: Callable[[int], object] | None = None  # told of each kernel `time` has timed
        self.built: dict[str, Callable] = {}  # spec name -> own kernel built (`built_kernels`)

    def overheads(self) -> dict[str, float]:
        return dict.fromkeys(TORCH_IMPLEMENTATIONS, call_overhead_ms())

    def calibrate(self) -> dict[str, list[float]]:
        with running_with(self.target.cores):
            return calibrate(self.target)

    def time(self, kernels: list[Kernel], implementations: Sequence[Sequence[str]] | None = None,
             ahead: Sequence[Kernel] = ()) -> list[Times]:
        """Times on `target.cores` threads of PyTorch's and TVM's pools, as the compiled model runs them
        (set for the call, as `CompiledModel` sets them: nothing process-wide changes); the own kernels
        of `ahead` are built with this call's (`built`)."""
        wanted = [set(names) for names in implementations] if implementations is not None else [None] * len(kernels)
        with running_with(self.target.cores):
            times = self.time_rivals(kernels, wanted, [mine for k in ahead if (mine := self.own_kernel(k, None))])
            self.add_default_tir(kernels, times, wanted)
            self.add_edge_casts(kernels, times, self.target.precision)
        return times

    @staticmethod
    def add_edge_casts(kernels: list[Kernel], times: list[Times], precision: str) -> None:
        """In float32, a conv the blocked kernels can run is in their chain (`blocked_layout`), which
        PyTorch breaks: its times pay the conversion of the input out of the layout and the output
        back. In bf16, a conv left in float32 TIR breaks a chain of bf16 convs (`bf16_chain`): the conv
        before it returns float32 and the one after casts back. PyTorch's times are chained (no casts),
        so the float32 kernels pay those two casts here, else MobileNetV2's small convs stayed in TIR by
        a few microseconds each and the casts around them made the bf16 build slower than fp32. Where
        AMX tiles can run the conv, the chain is theirs (`tile_layout`) and PyTorch breaks it: PyTorch
        pays the casts instead (ResNet-50's stem: 0.31 ms timed chained, 1.56 ms in the model)."""
        for kernel, kernel_times in zip(kernels, times, strict=True):
            names = set(kernel_times)
            if precision == "fp32":
                if kernel.op == "conv2d" and names & set(own_kernels.BLOCKED_KINDS):
                    x_shape, _, out_shape = kernel.shapes
                    x = None if x_shape[1] <= blocked_conv.FEW else torch.randn(blocked(x_shape))  # a stem reads NCHW
                    edges = functools.partial(_blocked_edges, x, torch.randn(out_shape))
                    cost = time_in_turn({"edges": [edges]})["edges"]
                    for name in names - set(own_kernels.BLOCKED_KINDS):
                        kernel_times[name] += cost
                continue
            tiled = names & set(own_kernels.TILE_KINDS)
            breakers = names - set(own_kernels.TILE_KINDS) if tiled else names - set(TORCH_IMPLEMENTATIONS)
            if kernel.op != "conv2d" or not breakers:
                continue
            x_shape, _, out_shape = kernel.shapes
            x = torch.randn(x_shape).to(torch.bfloat16, memory_format=torch.channels_last)
            cast = time_in_turn({"casts": [functools.partial(_edge_casts, x, torch.randn(out_shape))]})["casts"]
            for name in breakers:
                kernel_times[name] += cast

    def time_rivals(self, kernels: list[Kernel], wanted: list[set | None],
                    ahead: list[tuple[str, object]] = ()) -> list[Times]:
        """Each kernel on PyTorch's kernels and its own kernel (`own_kernels.own_kernel`), in turn, the
        own kernels built together (`build_kernels`). Where both the own kernel's kind and PyTorch have
        a ceiling (`prefilter`), the side whose ceiling is lower is timed first, and the other left out
        where it beats that side's ceiling by `prefilter.OWN_MARGIN` (PyTorch's: its best on the conv's
        family where it has one, `prefilter.family_ceilings`; recorded in `own_ruled_out` or
        `torch_ruled_out`); elsewhere the two are timed apart, and again in turn where they are within
        `NEAR_TIE` (timing PyTorch twice took a sixth of a cold plan of ResNet-50). The (kind, spec)
        pairs `ahead` are built with them, for a later call."""
        own = [self.own_kernel(kernel, allowed) for kernel, allowed in zip(kernels, wanted, strict=True)]
        ceilings = prefilter.ceilings(self.history, (*prefilter.OWN_FILTERED, "torch"))
        pytorch = ceilings.get("torch", (0.0, 0))
        families = prefilter.family_ceilings(self.history)
        filtered = [i for i, mine in enumerate(own) if mine and wanted[i] is None and pytorch[1] >= prefilter.OWN_CALIBRATE
                    and ceilings.get(mine[0], (0.0, 0))[1] >= prefilter.OWN_CALIBRATE]
        own_first = {i for i in filtered if ceilings[own[i][0]][0] >= pytorch[0]}
        times: list[Times | None] = [None] * len(kernels)
        for i in set(filtered) - own_first:
            times[i] = self.time_one(kernels[i], None, None)
            candidate = prefilter.Candidate(kernels[i].key, own[i][0], prefilter.gflop(kernels[i]),
                                            min(times[i].values()))
            ceiling = prefilter.skip(candidate, ceilings, prefilter.OWN_MARGIN)
            if ceiling is not None:
                self.own_ruled_out[kernels[i].key] = (own[i][0], ceiling)
                own[i] = None
        built = self.built_kernels([mine for mine in own if mine] + list(ahead))
        for i, kernel in enumerate(kernels):
            mine = own[i] and (own[i][0], built[own[i][1].name], own[i][1])
            if i in own_first:
                alone = self.time_one(kernel, {mine[0]}, mine)
                ceiling = families.get(prefilter.family(kernel), pytorch[0])
                if prefilter.gflop(kernel) / alone[mine[0]] * 1e3 > prefilter.OWN_MARGIN * ceiling:
                    times[i] = alone
                    self.torch_ruled_out[kernel.key] = ceiling
                else:
                    times[i] = self.in_turn_near_tie(kernel, mine, self.time_one(kernel, None, None), alone)
            elif times[i] is None:
                times[i] = self.time_one(kernel, wanted[i], mine)
            elif mine:  # PyTorch's timed first
                times[i] = self.in_turn_near_tie(kernel, mine, times[i], self.time_one(kernel, {mine[0]}, mine))
            if mine and mine[0] in times[i] and wanted[i] is None:
                self.remember(kernel, mine[0], times[i])
                self.add_alternatives(kernel, times[i], ceilings)
            if self.progress:
                self.progress(1)
        return times

    def built_kernels(self, pairs: list[tuple[str, object]]) -> dict[str, Callable]:
        """The built kernels of these (kind, spec) pairs by spec name, those this timer has not built
        yet built together (`build_kernels`); a residual conv's kernel is asked for after its bare
        conv's (`CostModel.time_all`), ResNet-50's 1x1s one at a time, each built while a core idled."""
        new = [pair for pair in pairs if pair[1].name not in self.built]
        if new:
            self.built.update(build_kernels(new, self.target.to_tvm()))
        return self.built

    def in_turn_near_tie(self, kernel: Kernel, mine: tuple[str, Callable, object], pytorch: Times, alone: Times) -> Times:
        """PyTorch's and the own kernel's times taken apart, or, where they are within `NEAR_TIE`, all timed again in turn."""
        pair = sorted((alone[mine[0]], min(pytorch.values())))
        return self.time_one(kernel, None, mine) if pair[1] < NEAR_TIE * pair[0] else {**pytorch, **alone}

    def own_kernel(self, kernel: Kernel, allowed: set | None) -> tuple[str, object] | None:
        """The first own kernel that runs `kernel` (of those `allowed`)."""
        found = next((pair for pair in own_kernels.own_kernels(kernel, self.target.precision)
                      if allowed is None or pair[0] in allowed), None)
        if found and found[0] in own_kernels.AMX_KINDS:
            amx.enable()
        return found

    def add_alternatives(self, kernel: Kernel, times: Times, ceilings: dict[str, tuple[float, int]]) -> None:
        """The own kernels after the first that run `kernel` (`own_kernels.ALTERNATIVES`), each timed
        alone and added to `times` unless its kind's ceiling says it cannot beat the best so far."""
        for kind, spec in own_kernels.own_kernels(kernel, self.target.precision)[1:]:
            best = prefilter.Candidate(kernel.key, kind, prefilter.gflop(kernel), min(times.values()))
            if prefilter.skip(best, ceilings, prefilter.OWN_MARGIN) is None:
                built = self.built_kernels([(kind, spec)])[spec.name]
                times.update(self.time_one(kernel, {kind}, (kind, built, spec)))
                if kind in times:
                    self.remember(kernel, kind, times)

    def remember(self, kernel: Kernel, kind: str, times: Times) -> None:
        """An own kind's time on `kernel` beside PyTorch's, in `history` (its ceiling, `prefilter`)."""
        self.history.append({"gflop": prefilter.gflop(kernel), f"{kind}_ms": times[kind],
                             "torch_ms": min(times.get(t, math.inf) for t in TORCH_IMPLEMENTATIONS),
                             "family": prefilter.family(kernel)})

    def time_one(self, kernel: Kernel, allowed: set | None, mine: tuple[str, Callable, object] | None) -> Times:
        """`kernel` on PyTorch's kernels (those `allowed`), and on `mine` (kind, built kernel, spec), in turn."""
        with torch.inference_mode():
            rivals, keys = torch_rivals(kernel, self.target.precision)
            if mine:
                rivals[mine[0]] = self.own_runs(mine[1], mine[2], has_weight(kernel))
            rivals = {name: runs for name, runs in rivals.items() if allowed is None or name in allowed}
            # PyTorch's plain conv and matmul and the own kernels keep nothing per weight; prepacked
            # convs and matmuls and bf16-converted matmul weights (`keys`) do
            stateless = set(rivals) - {"torch_prepacked"} - \
                ({"torch"} if kernel.op == "matmul" and self.target.precision != "fp32" else set())
            cold = self.cold(kernel)
            fresh = {name: before_run(name, runs) for name, runs in rivals.items()} \
                if self.target.precision == "fp32" and kernel.op == "conv2d" else None
            if self.target.precision == "fp32" and matrix_vector(kernel):
                fresh = dict.fromkeys(rivals, cold)
            times = time_in_turn(rivals, between=cold, stateless=stateless, before=fresh) if rivals else {}
            forget_packed(keys)
        if set(times) & set(own_kernels.BF16_KINDS):
            for name in set(times) & set(TORCH_IMPLEMENTATIONS):
                times[name] *= PYTORCH_LINEAR_AMID_TILES
        return times

    @staticmethod
    def cold(kernel: Kernel) -> Callable[[], None] | None:
        """What makes the kernel's timed weight copies cold after their warm-up (`cold_traffic`)."""
        return cold_traffic(tuple(kernel.shapes[1])) if has_weight(kernel) else None

    @staticmethod
    def own_runs(run: Callable[..., object], spec: object, weighted: bool = True) -> list[Callable[[], object]]:
        """Runs of an own kernel on random arguments, through the timed copies of its weight where it has one."""
        dtypes = getattr(spec, "arg_dtypes", ("float32",) * len(spec.arg_shapes))
        args = [random_tensor(shape, dtype) for shape, dtype in zip(spec.arg_shapes, dtypes, strict=True)]
        return cycled_weight_runs(run, args) if weighted else [functools.partial(run, *args)]

    def add_default_tir(self, kernels: list[Kernel], times: list[Times], wanted: list[set | None]) -> None:
        """Time TVM's default schedule where asked for by name, or (unasked) for kernels no own kernel
        runs where the pre-filter cannot rule it out; records those in `history`."""
        asked = [i for i, allowed in enumerate(wanted) if allowed is not None and "tir" in allowed]
        self.time_tir(kernels, times, asked)
        open_ = {kernels[i].key: i for i, allowed in enumerate(wanted)
                 if allowed is None and own_kernels.own_kernel(kernels[i], self.target.precision) is None}
        candidates = [prefilter.Candidate(key, prefilter.op_class(kernels[i]), prefilter.gflop(kernels[i]),
                                          min(times[i].get(t, math.inf) for t in TORCH_IMPLEMENTATIONS))
                      for key, i in open_.items()]
        first = prefilter.calibration(candidates, self.history)
        self.time_tir(kernels, times, [open_[c.key] for c in first], candidates)
        ceilings = prefilter.tir_ceilings(self.history)
        rest = [c for c in candidates if c not in first and prefilter.skip(c, ceilings) is None]
        self.time_tir(kernels, times, [open_[c.key] for c in rest], candidates)
        for i, allowed in enumerate(wanted):  # duplicates of a timed kernel
            if allowed is None and kernels[i].key in open_ and "tir" in times[open_[kernels[i].key]]:
                times[i]["tir"] = times[open_[kernels[i].key]]["tir"]

    def time_tir(self, kernels: list[Kernel], times: list[Times], picked: list[int],
                 candidates: list[prefilter.Candidate] = ()) -> None:
        """Build the `picked` kernels in one module with the model's pipeline and time each."""
        if not picked:
            return
        bb = relax.BlockBuilder()
        shapes = [emit_kernel(bb, f"k{i}", kernels[i]) for i in picked]
        vm = relax.VirtualMachine(self.build(bb.get(), self.target.to_tvm()), tvm.cpu())
        by_key = {c.key: c for c in candidates}
        for i, arg_shapes in zip(picked, shapes, strict=True):
            run = vm[f"k{i}"]
            args = [random_tensor(s) for s in arg_shapes]
            started = time.perf_counter()
            run(*args)
            ms = (time.perf_counter() - started) * 1e3
            if ms < SLOW_MS:
                runs = cycled_weight_runs(run, args) if has_weight(kernels[i]) else [functools.partial(run, *args)]
                ms = time_in_turn({"tir": runs}, between=self.cold(kernels[i]), stateless={"tir"})["tir"]
            times[i]["tir"] = ms
            if kernels[i].key in by_key:
                c = by_key[kernels[i].key]
                self.history.append({"op_class": c.op_class, "gflop": c.gflop, "tir_ms": ms, "torch_ms": c.torch_ms})
