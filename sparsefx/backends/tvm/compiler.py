"""`sparsefx.compile`: a PyTorch model in, a TVM-compiled callable out."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import tvm
import tvm_ffi
from torch import nn
from tvm import relax

from sparsefx.backends import artifacts
from sparsefx.backends.tvm import pipeline
from sparsefx.backends.tvm.build_config import build_context
from sparsefx.backends.tvm.bundle import export_bundle
from sparsefx.backends.tvm.dispatch.patterns import kernel_of
from sparsefx.backends.tvm.expand_attention import expand_attention_pass
from sparsefx.backends.tvm.half import half_passes
from sparsefx.backends.tvm.importer import to_relax
from sparsefx.backends.tvm.kernels import amx
from sparsefx.backends.tvm.kernels import registry as own_kernels
from sparsefx.backends.tvm.measure.host import HostTimer
from sparsefx.backends.tvm.threads import running_with
from sparsefx.backends.tvm.tuning import tune_module
from sparsefx.backends.tvm.tvmscript import cheap_frames
from sparsefx.capture.identity import compile_key
from sparsefx.capture.trace import as_inputs
from sparsefx.errors import SparsefxError, one_line
from sparsefx.log import get_logger
from sparsefx.target import Target, check_threads, compile_target, has_bf16, has_tiles, host_cpu
from sparsefx.version import __version__

ARTIFACT_VERSION = 5  # v2: dispatched PyTorch kernels take a precision index (and matmuls a weight key); v3: Linear layers call `matmul_bias`; v4: a residual conv may call `conv2d_bias_residual_`; v5: AMX tile kernels (the loader asks Linux for the tile state)
ALIGNMENT = 64  # bytes: what TVM's allocator gives and its generated code may assume
LOG = get_logger("tvm")


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """TVM's C++ runtime logs a warning per constant when saving or loading a VM executable."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def compile(model: nn.Module, example_inputs: object, target: object = "cpu", tune: int = 0,
            dispatch: bool | str = True, verbose: bool = True, threads: int | None = None,
            precision: str | None = None, cache: bool = True) -> CompiledModel:
    """Compile `model` for `target` ('cpu', 'cuda[:sm_XX]' or a Target).

    `dispatch` lets each conv, matmul, GELU, softmax and LayerNorm run on PyTorch's kernels
    where they measure faster than TIR on this CPU (recorded in the artifact); "own" puts every conv
    sparsefx has a kernel for on it and the rest in TIR, untimed and never on PyTorch (for runtime-only
    bundles and CPUs other than this one); False leaves everything to TIR's default schedules; `tune` is the MetaSchedule trial
    budget (0: default schedules only; records persist in the on-disk database). `threads` (default: all
    cores) is what the model runs with, PyTorch's and TVM's pools alike: kernels are measured at that
    count, and it is recorded in the artifact for `load`. `precision` (default: the target's, "fp32" unless
    it was made `with_precision`): "fp32"; for CUDA targets also "fp16"
    (sm_70+, matmuls and ungrouped convs on tensor cores) and "bf16" (sm_80+): weights and activations in
    half, float32 accumulation, float32 inputs and outputs (`half`). On CPUs with AVX512-BF16 or AMX,
    "bf16" times each conv and matmul on PyTorch's bf16 kernels (oneDNN, float32 accumulation) against
    TIR in float32 and runs the faster (`dispatch.torch_kernels`); norms, softmax and element-wise
    ops stay float32. It needs the measured dispatch. `cache`: a model compiled and exported before with
    the same code, weights, inputs and options is loaded from its kept artifact instead of compiled again
    (`backends.artifacts`); False compiles afresh."""
    inputs = as_inputs(example_inputs)
    if not isinstance(model, nn.Module):
        raise SparsefxError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not (isinstance(dispatch, bool) or dispatch == "own"):
        raise SparsefxError(f"dispatch must be True (measured), 'own' or False, got {dispatch!r}")
    if not isinstance(tune, int) or tune < 0:
        raise SparsefxError(f"tune must be a trial budget >= 0, got {tune!r}")
    spec, threads, precision = compile_target(target, threads, precision)
    if precision != "fp32" and not spec.is_gpu and dispatch is not True:
        raise SparsefxError(f"precision={precision!r} on a CPU runs convs and matmuls on PyTorch's bf16 kernels, "
                            f"which dispatch={dispatch!r} never calls; use dispatch=True or precision='fp32'")
    key = compile_key(model, inputs, spec, threads, precision, dispatch, tune) if cache else None
    reused = reuse(key, threads, LOG.info if verbose else LOG.debug) if key else None
    if reused is not None:
        return reused
    with running_with(threads), cheap_frames():  # TVMScript parses (own kernels, DLight's tensor intrinsics)
        compiled = build(model, inputs, spec, tune, dispatch, verbose, threads, precision)
    compiled.cache_key = key
    return compiled


def reuse(key: str, threads: int, log: Callable[[str], None]) -> CompiledModel | None:
    """The artifact compiled before under `key` (`backends.artifacts`), loaded; None when there is none
    or it cannot be loaded (then it is dropped and the model compiled again)."""
    path = artifacts.cached(key)
    if path is None:
        return None
    try:
        compiled = load(path, threads)
    except SparsefxError as error:
        LOG.warning(f"a kept compiled artifact could not be loaded ({error}); compiling again")
        artifacts.forget(key)
        return None
    log(f"reused the artifact compiled in {compiled.manifest['compile_seconds']:.1f} s "
        "(same model, inputs and options; cache=False compiles afresh)")
    compiled.cache_key, compiled.reused = key, path
    return compiled


def own_attention(call: relax.Call) -> bool:
    """Whether sparsefx's attention kernel takes this attention call (`dispatch="own"` keeps it whole for it)."""
    k = kernel_of(call)
    return k is not None and own_kernels.own_kernel(k) is not None


def build(model: nn.Module, inputs: tuple, spec: Target, tune: int, dispatch: bool | str, verbose: bool,
          threads: int, precision: str) -> CompiledModel:
    """`compile` after its arguments are checked, run with the model's threads."""
    tvm_target = spec.to_tvm()
    log = LOG.info if verbose else LOG.debug  # verbose=False keeps the lines for --verbose
    started = time.perf_counter()
    log(f"importing {type(model).__name__} into Relax")
    mod, route = to_relax(model, inputs)
    ran = pipeline.optimize_passes()
    if spec.is_gpu or dispatch is not True:  # nothing will run attention on PyTorch's SDPA
        own = dispatch == "own" and not spec.is_gpu
        ran.append(("ExpandAttention", expand_attention_pass(own_attention) if own else expand_attention_pass()))
    if precision != "fp32" and spec.is_gpu:  # after BN folding, which is best done in fp32
        ran += half_passes(precision)
    mod = pipeline.run(ran, mod, tvm_target)
    decisions = {}
    if dispatch and not spec.is_gpu:
        decisions = (pipeline.decide_by_kind(mod) if dispatch == "own" else
                     pipeline.decide_dispatch(mod, spec, lambda history: HostTimer(spec, history=history), log,
                                                              bar=verbose))
        rewrites = pipeline.dispatch(decisions, spec.precision)
        mod = pipeline.run(rewrites, mod, tvm_target)
        ran += rewrites
    tuned, tuning = None, {"trials_per_task": 0, "tasks": 0, "tuned_tasks": 0, "seconds": 0.0}
    if tune:  # after dispatch: only what still runs as TIR is worth tuning
        tuned, tuning = tune_module(mod, spec, tvm_target, tune, log)
    log(f"building for {spec}")
    lowering = pipeline.lowering_passes(spec, tvm_target, tuned)
    with build_context(tvm_target):
        executable = tvm.compile(mod, tvm_target, relax_pipeline=pipeline.as_pipeline(lowering))
    manifest = {
        "format": "sparsefx-tvm", "version": ARTIFACT_VERSION, "sparsefx": __version__, "tvm": tvm.__version__,
        "target": spec.as_dict(), "threads": threads, "precision": precision, "import_route": route,
        "inputs": [{"shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch.")} for x in inputs],
        "dispatch": decisions, "tuning": tuning, "compile_seconds": round(time.perf_counter() - started, 3),
        "passes": [name for name, _ in ran + lowering],
    }
    log(f"compiled in {manifest['compile_seconds']:.1f} s "
        f"({sum(d['impl'] == 'torch' for d in decisions.values())}/{len(decisions)} workloads on torch kernels)")
    return CompiledModel(executable, manifest)


class CompiledModel:
    """A compiled model: call it with torch tensors, get torch tensors back."""

    def __init__(self, executable: object, manifest: dict, threads: int | None = None) -> None:
        self.executable, self.manifest = executable, manifest
        self.cache_key: str | None = None  # set by `compile`: `export` keeps the artifact under it for reuse
        self.reused: Path | None = None  # the kept artifact this was loaded from instead of compiled
        self.target = Target.from_dict(manifest["target"])
        self.threads = runnable_threads(manifest, threads)
        self.device = tvm.cuda(0) if self.target.is_gpu else tvm.cpu(0)
        if self.target.precision == "bf16" and has_tiles():
            amx.enable()  # its convs may run on AMX tiles (`kernels.amx`)
        self._vm, self._main = None, None
        self._shapes = [tuple(e["shape"]) for e in manifest["inputs"]]  # checked on every call: kept as tuples

    @property
    def vm(self) -> relax.VirtualMachine:
        if self._vm is None:
            self._vm = relax.VirtualMachine(self.executable, self.device)
        return self._vm

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if len(inputs) != len(self._shapes) or any(x.shape != shape for x, shape in zip(inputs, self._shapes)):
            got = [tuple(x.shape) for x in inputs]
            raise SparsefxError(f"compiled for inputs {self._shapes}, got {got}; "
                                "compile again with example inputs of the new shape")
        args = [self.argument(x) for x in inputs]  # first: it names a missing GPU before the VM needs one
        if self._main is None:
            self._main = self.vm["main"]  # looked up once: a small model's call is a few microseconds
        with running_with(self.threads):
            return _to_torch(self._main(*args))

    def argument(self, x: torch.Tensor) -> object:
        """`x` as the compiled function takes it: contiguous, on the target's device, 64-byte aligned
        (TVM's allocator aligns so and its kernels may load so; a view into a tensor need not be)."""
        x = x.detach().contiguous()
        want = "cuda" if self.target.is_gpu else "cpu"
        if x.device.type != want:
            if want == "cuda" and not torch.cuda.is_available():
                raise SparsefxError("this model is compiled for an NVIDIA GPU and PyTorch sees none here; run it on a "
                                    "host with CUDA, or compile for target='cpu'")
            x = x.to(want)
        if x.data_ptr() % ALIGNMENT:
            x = x.clone()  # a fresh allocation: PyTorch's allocators align to 64 bytes
        return tvm_ffi.from_dlpack(x)

    def profile(self, *inputs: torch.Tensor, repeat: int = 10) -> list[dict]:
        """Every call one run of the model makes (its kernels, PyTorch calls and VM builtins) in call
        order: {"name", "kind", "shapes", "ms"}, `ms` the fastest of `repeat` runs. The instrument
        costs each call a few microseconds, so the sum exceeds an uninstrumented run."""
        vm = relax.VirtualMachine(self.executable, self.device)  # its own: the instrument stays on it
        args = [self.argument(x) for x in inputs]
        with running_with(self.threads):
            vm["main"](*args)
        calls: list[tuple[str, tuple, float]] = []
        started = [0.0]

        def instrument(_func: object, symbol: str, before: bool, _ret: object, *call_args: object) -> int:
            if before:
                started[0] = time.perf_counter()
            else:
                shapes = tuple(tuple(a.shape) for a in call_args if hasattr(a, "shape"))
                calls.append((symbol, shapes, time.perf_counter() - started[0]))
            return 0

        vm.set_instrument(instrument)
        with running_with(self.threads):
            for _ in range(repeat):
                vm["main"](*args)
        per_run = len(calls) // repeat
        return [{"name": name, "kind": kernel_kind(name), "shapes": [list(s) for s in shapes],
                 "ms": min(calls[i + r * per_run][2] for r in range(repeat)) * 1e3}
                for i, (name, shapes, _) in enumerate(calls[:per_run])]

    def export(self, path: str | Path) -> Path:
        """One file: the compiled library plus a JSON manifest (target, inputs, dispatch, tuning)."""
        path = Path(path)
        if self.reused is not None and self.reused.is_file():
            shutil.copyfile(self.reused, path)  # a loaded library cannot be exported again
            return path
        with tempfile.TemporaryDirectory() as tmp:
            library = self.export_library(Path(tmp) / "model.so")
            (Path(tmp) / "manifest.json").write_text(json.dumps(self.manifest, indent=1))
            with tarfile.open(path, "w") as tar:
                tar.add(Path(tmp) / "manifest.json", "manifest.json")
                tar.add(library, "model.so")
        if self.cache_key:
            artifacts.keep(self.cache_key, path)
        return path

    def export_library(self, path: str | Path) -> Path:
        """The compiled library alone (weights included), loadable by the TVM runtime."""
        with quiet_native_stderr():
            self.executable.export_library(str(path))
        return Path(path)

    def export_bundle(self, path: str | Path, python: str = "3.12", numpy: bool = True) -> Path:
        """A directory (or .tar.gz) that runs this model on a host with Python `python` and no TVM
        compiler: library, TVM runtime libraries, wheels and run.py (see `bundle`)."""
        return export_bundle(self, path, python, numpy)

    def __repr__(self) -> str:
        return f"CompiledModel(target={self.target}, inputs={[tuple(i['shape']) for i in self.manifest['inputs']]})"


def kernel_kind(name: str) -> str:
    """What runs a call of a compiled model, by its symbol: one of sparsefx's own conv kernels or its
    sparse kernels, PyTorch (a dispatched op), a VM builtin (allocation and bookkeeping) or a TIR
    kernel of TVM's lowering."""
    head = name.split("_")[0]
    if head in own_kernels.KERNELS or head == "sparse":
        return head
    return "torch" if name.startswith("sparsefx.torch.") else "vm" if name.startswith("vm.builtin.") else "tir"


def ms_by_kind(profile: list[dict]) -> dict[str, float]:
    """A `CompiledModel.profile` summed per kind of kernel, the largest first."""
    totals: dict[str, float] = {}
    for row in profile:
        totals[row["kind"]] = totals.get(row["kind"], 0.0) + row["ms"]
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def _to_torch(value: object) -> torch.Tensor | tuple:
    if isinstance(value, (tuple, list)) or type(value).__name__ == "Array":  # a Relax tuple output
        return tuple(_to_torch(v) for v in value)
    return torch.from_dlpack(value)


def runnable_threads(manifest: dict, threads: int | None = None) -> int:
    """The threads a compiled model runs with here: `threads` when given, else the count it was compiled
    for (all cores for artifacts that predate the field), at most the cores this process may use."""
    here = host_cpu()
    if threads is not None:
        return check_threads(threads, here)
    recorded = manifest.get("threads") or here.cores
    if recorded > here.cores:
        LOG.warning(f"compiled for {recorded} threads, this process may use {here.cores} cores: running with "
                    f"{here.cores}")
    return min(recorded, here.cores)


def load(path: str | Path, threads: int | None = None) -> CompiledModel:
    """Load an artifact written by `CompiledModel.export`; it runs with the threads it was compiled
    for unless `threads` says otherwise."""
    path = Path(path)
    if not path.is_file():
        raise SparsefxError(f"no compiled model at {path}; export one with CompiledModel.export(path)")
    extract = Path(tempfile.mkdtemp(prefix="sparsefx-"))
    try:
        with tarfile.open(path) as tar:
            tar.extractall(extract, filter="data")
        manifest = json.loads((extract / "manifest.json").read_text())
        if manifest.get("format") != "sparsefx-tvm":
            raise ValueError("wrong format tag")
    except (tarfile.TarError, OSError, ValueError, KeyError) as error:
        raise SparsefxError(f"{path} is not a sparsefx compiled model or is corrupt ({type(error).__name__}); "
                            "export it again with CompiledModel.export") from None
    if manifest["version"] > ARTIFACT_VERSION:
        raise SparsefxError(f"{path} was written by a newer sparsefx (artifact v{manifest['version']}); upgrade")
    if manifest["version"] < 2 and any(d.get("impl") == "torch" for d in manifest.get("dispatch", {}).values()):
        raise SparsefxError(f"{path} (artifact v{manifest['version']}) calls PyTorch kernels by an older signature; "
                            "compile the model again with this sparsefx")
    impls = {d.get("impl") for d in manifest.get("dispatch", {}).values()}
    for kinds, runs, lacks in ((own_kernels.AMX_KINDS, has_tiles, "AMX"),
                               (own_kernels.BF16_KINDS, has_bf16, "AVX512-BF16")):
        if impls & set(kinds) and not runs():
            raise SparsefxError(f"{path} runs bf16 kernels ({', '.join(sorted(impls & set(kinds)))}) that need "
                                f"{lacks}, which this CPU lacks; compile the model again on this machine, "
                                "or with precision='fp32'")
    try:
        with quiet_native_stderr():
            library = tvm.runtime.load_module(str(extract / "model.so"))
    except Exception as error:
        raise SparsefxError(f"{path}: cannot load its library ({one_line(error)}); "
                            "export it again with CompiledModel.export") from None
    return CompiledModel(library, manifest, threads)

