"""Every GPU check of sparsefx in one device run: fp16 against eager and torch.compile, 2:4 against cuBLAS and cuSPARSELt.

The GPU host has PyTorch with CUDA but no TVM compiler, so the benchmark has two halves:

    .venv/bin/python benchmarks/gpu_backend.py build --arch sm_90 --kit gpu_kit     # here, with TVM
    python3 benchmarks/gpu_backend.py run --kit gpu_kit --out results               # on the GPU host

`build` writes, per model of MODELS (dense, or `sparsefx.prune(ratio=0.5)`), the architecture on the
meta device plus its MACs (the GPU host re-creates the weights: 100-400 MB of fp16 weights per model
do not fit the 64 MiB a device call carries), the sparsefx fp16 CUDA runtime-only bundles of TVM_ROWS
(those whose weights fit), with the fp32 eager output for run.py's seeded input, and the 2:4 `mma.sp`
GEMMs (`backends/tvm/sparse/mma.py`, every candidate configuration) as one runtime library with cubins.

`run` (PyTorch only, plus the TVM runtime the kit ships) writes gpu_backend.{json,md} after each part,
so a run cut short still reports what it measured:
1. the 2:4 GEMMs on BERT-base's and a Llama MLP's shapes at 128 to 8192 tokens: each candidate checked
   against the fp32 product and swept, then the fastest against dense fp16 `F.linear` (cuBLAS) and
   `torch.sparse.to_sparse_semi_structured` (cuSPARSELt) in alternating rounds, CUDA-event medians;
2. BERT-base (batch 32, sequence 128) end to end in eager fp16 with its linear layers dense, on
   cuSPARSELt 2:4, and on sparsefx's 2:4 kernels;
3. per model, variant and batch, in one process: PyTorch eager fp16 (channels_last for CNNs,
   cudnn.benchmark), `torch.compile` fp16 (default mode, and mode="reduce-overhead", the CUDA-graph mode
   PyTorch documents for small batches), and the sparsefx fp16 bundle where TVM_ROWS built one
   (checked first in an isolated Python against the fp32 reference). Inductor's compiles are done
   beforehand in parallel processes into a shared cache, so the timed process loads them.
Wall ms per call (launches included), median of alternating rounds.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import datetime
import functools
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"resnet50": "torchvision:resnet50", "mobilenet_v2": "torchvision:mobilenet_v2",
          "vit_b_16": "torchvision:vit_b_16", "bert_base": "hf:bert-base"}
VARIANTS = ("dense", "pruned")
BATCHES = (1, 32)
# sparsefx fp16 bundles carry their weights: what fits beside the runtime in one device call
TVM_ROWS = (("mobilenet_v2", "dense", 1), ("mobilenet_v2", "pruned", 1), ("mobilenet_v2", "dense", 32),
            ("mobilenet_v2", "pruned", 32), ("resnet50", "pruned", 32))
# (weight rows, cols): BERT-base's attention projection and MLP, Llama-2-7B's MLP
MMA_SHAPES = ((768, 768), (3072, 768), (768, 3072), (11008, 4096), (4096, 11008))
MMA_TOKENS = (128, 512, 2048, 8192)
BERT_TOKENS = 32 * 128  # batch 32 x sequence 128
BEST_MMA = Path("/tmp/sparsefx-mma-best.json")  # the 2:4 part's choices, for the BERT part
REL_TOL = {"fp16": 5e-3, "fp32": 1e-4}  # relative L2 against the fp32 reference


# ------------------------------------------------------------------ build (here, with TVM) -----------------

def build(arch: str, kit: Path) -> None:
    if kit.exists():
        shutil.rmtree(kit)
    _build_archs(kit / "archs")
    _build_runtime(arch, kit / "runtime")
    _build_tvm(arch, kit / "tvm")
    _build_mma(arch, kit / "mma")


def _build_runtime(arch: str, out: Path) -> None:
    """The TVM runtime libraries and wheels every bundle of the kit shares (one copy travels), taken
    from the bundle of a one-layer model."""
    import sparsefx

    layer = torch.nn.Linear(8, 8)
    bundle = sparsefx.compile(layer, (torch.randn(1, 8),), target=f"cuda:{arch}", verbose=False) \
        .export_bundle(out.with_name("runtime-probe"), numpy=False)
    out.mkdir(parents=True)
    for shared in ("lib", "wheels", "manifest.json"):
        shutil.move(bundle / shared, out / shared)
    shutil.rmtree(bundle)


def _build_archs(out: Path) -> None:
    import sparsefx
    from sparsefx.capture.models import load_model

    for name, spec in MODELS.items():
        model, inputs = load_model(spec, batch_size=1)
        for variant in VARIANTS:
            folder = out / f"{name}-{variant}"
            folder.mkdir(parents=True)
            pruned = sparsefx.prune(model, inputs, ratio=0.5) if variant == "pruned" else model
            info = {"spec": spec, "macs_b1": sparsefx.count_macs(pruned, inputs),
                    "params": sum(p.numel() for p in pruned.parameters()),
                    "inputs": [{"shape": list(x.shape[1:]), "dtype": str(x.dtype).removeprefix("torch."),
                                "high": 1000 if not x.is_floating_point() else None} for x in inputs]}
            (folder / "info.json").write_text(json.dumps(info))
            torch.save(copy.deepcopy(pruned).to("meta"), folder / "arch.pt")  # `model` itself is the dense one
            print(f"saved {folder.name}", flush=True)


def _build_tvm(arch: str, out: Path) -> None:
    import sparsefx
    from sparsefx.capture.compare import calibrate_norm_statistics, check_reference
    from sparsefx.capture.models import load_model

    out.mkdir(parents=True, exist_ok=True)
    failures = {}
    for name, variant, batch in TVM_ROWS:
        label = f"{name}-{variant}-b{batch}"
        if (out / label / "build.json").exists():  # built by an earlier, interrupted build
            continue
        try:
            model, inputs = load_model(MODELS[name], batch_size=batch)
            # calibrated batch norms: a random-init MobileNetV2 outputs ~3e-9 otherwise, below fp16's range
            calibrate_norm_statistics(model, inputs)
            if variant == "pruned":
                model = sparsefx.prune(model, inputs, ratio=0.5)
                calibrate_norm_statistics(model, inputs)
            check_reference(model, inputs)  # refuses an output near zero or one that ignores the input
            started = time.perf_counter()
            compiled = sparsefx.compile(model, inputs, target=f"cuda:{arch}", precision="fp16", verbose=False)
            compile_s = time.perf_counter() - started
            bundle = compiled.export_bundle(out / label, numpy=False)
        except Exception as error:  # a row that cannot build is reported, the kit still ships
            failures[label] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
            print(f"build {label} failed: {failures[label]}", flush=True)
            continue
        x = np.random.default_rng(0).standard_normal(inputs[0].shape).astype(np.float32)  # run.py's own input
        with torch.no_grad():
            np.save(bundle / "want.npy", model(torch.from_numpy(x)).numpy())
        (bundle / "build.json").write_text(json.dumps({"compile_s": compile_s, "arch_name": f"{name}-{variant}"}))
        for shared in ("lib", "wheels"):  # kit/runtime has them; `run` puts them back in each bundle
            shutil.rmtree(bundle / shared)
        print(f"built {label} in {compile_s:.0f} s", flush=True)
    (out / "failures.json").write_text(json.dumps(failures, indent=1))


def _build_mma(arch: str, out: Path) -> None:
    import tvm

    from sparsefx.backends.tvm.bundle import precompile_cuda
    from sparsefx.backends.tvm.sparse import mma as sparse_mma

    shapes = [(m, k, n) for m, k in MMA_SHAPES for n in MMA_TOKENS]
    shapes += [(m, k, BERT_TOKENS) for m, k in MMA_SHAPES[:3] if BERT_TOKENS not in MMA_TOKENS]
    specs = [c for m, k, n in shapes if sparse_mma.supported(m, k, n)
             for c in sparse_mma.candidates(sparse_mma.MmaSpec(m, k, n, "float16"))]
    lib = sparse_mma.build(specs, tvm.target.Target({"kind": "cuda", "arch": arch}))
    out.mkdir(parents=True)
    lib.export_library(str(out / "mma.so"))
    kernels = precompile_cuda(lib.mod, arch, out / "kernels")
    (out / "manifest.json").write_text(json.dumps({
        "arch": arch, "instruction": sparse_mma.instruction(), "cuda_kernels": kernels,
        "specs": [{"name": s.name, "rows": s.rows, "cols": s.cols, "tokens": s.tokens,
                   "config": s.name.split(s.out_dtype, 1)[-1].strip("_") or "single-buffered"}
                  for s in specs]}, indent=1))
    print(f"built {len(specs)} 2:4 kernels for {len(shapes)} shapes", flush=True)


# ------------------------------------------------------------------ run (GPU host, PyTorch only) -----------

def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _wall_ms(call: object, seconds: float = 0.2) -> float:
    """Mean wall time of one call (launches included) over a ~`seconds` stretch, synchronised at both ends."""
    call()
    _sync()
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for _ in range(5):
            call()
        count += 5
        _sync()
    return (time.perf_counter() - started) / count * 1e3


def _event_ms(call: object, repeat: int = 10, inner: int = 10) -> float:
    """Median over `repeat` CUDA-event timings of `inner` back-to-back calls, per call."""
    for _ in range(3):
        call()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            call()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


def _alternate(calls: dict[str, object], rounds: int, timer: object = _wall_ms) -> dict[str, float]:
    """Median per contender of `rounds` rounds that visit every contender in turn (clock drift hits all alike)."""
    samples: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(rounds):
        for label, call in calls.items():
            samples[label].append(timer(call))
    return {k: statistics.median(v) for k, v in samples.items()}


def _materialize(arch_dir: Path, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """The saved architecture with fresh random weights (the speed of a kernel does not depend on them)."""
    torch.manual_seed(0)
    model = torch.load(arch_dir / "arch.pt", weights_only=False).to_empty(device=device).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.dim() == 1:  # norm scales
                p.fill_(1.0)
            else:
                p.normal_(0, (1.0 / max(p[0].numel(), 1)) ** 0.5)
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.fill_(1.0)
            elif name.endswith(("running_mean", "num_batches_tracked")):
                b.zero_()
            elif b.is_floating_point():
                b.zero_()
            elif name.endswith("position_ids"):
                b.copy_(torch.arange(b.shape[-1], device=device).expand_as(b))
            else:
                b.zero_()
    model = model.to(dtype)
    info = json.loads((arch_dir / "info.json").read_text())
    if len(info["inputs"][0]["shape"]) == 3:
        model = model.to(memory_format=torch.channels_last)
    return model


def _inputs(arch_dir: Path, batch: int, device: str, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    info = json.loads((arch_dir / "info.json").read_text())
    out = []
    for spec in info["inputs"]:
        shape = (batch, *spec["shape"])
        if spec["high"]:
            out.append(torch.randint(0, spec["high"], shape, device=device))
        else:
            x = torch.randn(shape, device=device, dtype=dtype)
            out.append(x.to(memory_format=torch.channels_last) if x.dim() == 4 else x)
    return tuple(out)


def _modes(batch: int) -> tuple[str, ...]:
    """torch.compile's modes to time: CUDA graphs ("reduce-overhead") pay where launches dominate, at batch 1."""
    return ("default", "reduce-overhead") if batch == 1 else ("default",)


def _compiled(model: torch.nn.Module, mode: str | None) -> torch.nn.Module:
    return torch.compile(model, mode=mode) if mode else torch.compile(model)


def warm_one(arch_dir: Path, batch: int, mode: str, device: str) -> dict:
    """Compile once (fills Inductor's on-disk cache for the timed process) and say how long it took."""
    model = _materialize(arch_dir, device, torch.float16 if device == "cuda" else torch.float32)
    inputs = _inputs(arch_dir, batch, device, next(model.parameters()).dtype)
    started = time.perf_counter()
    with torch.no_grad():
        _compiled(model, None if mode == "default" else mode)(*inputs)
    _sync()
    return {"model": arch_dir.name, "batch": batch, "mode": mode, "compile_s": time.perf_counter() - started}


def peer_row(arch_dir: Path, batch: int, bundle: Path | None, rounds: int, device: str) -> dict:
    """Eager, torch.compile (two modes) and the sparsefx bundle (if any) for one model at one batch."""
    dtype = torch.float16 if device == "cuda" else torch.float32
    torch.backends.cudnn.benchmark = True
    info = json.loads((arch_dir / "info.json").read_text())
    row: dict = {"model": arch_dir.name, "batch": batch, "macs": info["macs_b1"] * batch, "params": info["params"]}
    model = _materialize(arch_dir, device, dtype)
    inputs = _inputs(arch_dir, batch, device, dtype)
    calls: dict[str, object] = {}
    with torch.no_grad():
        calls["eager"] = lambda: model(*inputs)
        for mode in _modes(batch):
            try:
                started = time.perf_counter()
                fn = _compiled(model, None if mode == "default" else mode)
                for _ in range(3):  # reduce-overhead records its CUDA graph on the warm-up calls
                    fn(*inputs)
                _sync()
                row[f"compile_{mode}_s"] = time.perf_counter() - started
                calls[f"compile_{mode}"] = (lambda fn=fn: fn(*inputs))
            except Exception as error:
                row[f"compile_{mode}_error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        if bundle is not None:
            try:
                calls["sparsefx"] = _bundle_call(bundle, row)
            except Exception as error:
                row["sparsefx_error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        row["latency_ms"] = _alternate(calls, rounds)
    return row


def _bundle_module(bundle: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(f"bundle_{bundle.name.replace('-', '_')}", bundle / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bundle_call(bundle: Path, row: dict) -> object:
    """Check the bundle in an isolated Python (no PYTHON* variables or user site: what it ships plus the
    host's numpy, which fp16 bundles leave out) against the fp32
    reference, then return a call of it on the GPU in this process."""
    done = subprocess.run([sys.executable, "-I", str(bundle / "run.py"), "--out", str(bundle / "got.npy")],
                          capture_output=True, text=True)
    row["isolated_run"] = done.returncode == 0
    if done.returncode:
        raise RuntimeError((done.stderr.strip().splitlines() or ["no output"])[-1])
    got, want = np.load(bundle / "got.npy").astype(np.float64), np.load(bundle / "want.npy").astype(np.float64)
    row["rel_l2_err"] = float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
    row["want_rms"] = float(np.sqrt((want ** 2).mean()))
    manifest = json.loads((bundle / "manifest.json").read_text())
    row["precision"] = manifest.get("precision", "fp32")
    row["accurate"] = row["rel_l2_err"] < REL_TOL.get(row["precision"], 1e-4)
    row["sparsefx_compile_s"] = json.loads((bundle / "build.json").read_text())["compile_s"]
    shipped = [f for f in bundle.rglob("*") if f.is_file() and "site" not in f.relative_to(bundle).parts
               and f.suffix != ".npy" and f.name != "build.json"]
    row["bundle_mib"] = round(sum(f.stat().st_size for f in shipped) / 2**20, 1)
    model = _bundle_module(bundle).Model()
    args = [model._to_device(x) for x in model.random_inputs()]
    return lambda: model.vm["main"](*args)


def _bare_sparsefx() -> None:
    """Make `sparsefx.<module>` importable without sparsefx/__init__.py, which imports TVM (the 2:4
    packing lives in sparsefx.sparse.formats)."""
    if "sparsefx" not in sys.modules:
        package = types.ModuleType("sparsefx")
        package.__path__ = [str(ROOT / "sparsefx")]
        sys.modules["sparsefx"] = package


def _mma_module(kit: Path) -> tuple[object, dict]:
    """The 2:4 library on the TVM runtime and wheels that the kit's bundles ship."""
    shared = kit / "runtime"
    shutil.copy2(ROOT / "sparsefx" / "backends" / "tvm" / "bundle_run.py", shared / "run.py")
    runtime = _bundle_module(shared)  # finds lib/ and wheels/ beside itself
    runtime.unpack_wheels()
    import tvm_ffi

    runtime.load_runtime(json.loads((shared / "manifest.json").read_text())["bundle"]["runtime_libs"])
    manifest = json.loads((kit / "mma" / "manifest.json").read_text())
    runtime.serve_precompiled_kernels(tvm_ffi, kit / "mma" / "kernels", manifest["cuda_kernels"])
    return tvm_ffi.load_module(str(kit / "mma" / "mma.so")), manifest


@functools.cache
def _nm_weight(rows: int, cols: int, seed: int = 0) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    _bare_sparsefx()
    import sparsefx.sparse.formats as formats

    torch.manual_seed(seed)
    nm = formats.NM.from_dense(torch.randn(rows, cols) / cols ** 0.5, 2, 4)
    values, meta = formats.mma24_pack(nm)
    return nm.to_dense(), values, meta


def run_mma(kit: Path, rounds: int) -> list[dict]:
    module, manifest = _mma_module(kit)
    import tvm_ffi

    by_shape: dict[tuple, list[dict]] = {}
    for spec in manifest["specs"]:
        by_shape.setdefault((spec["rows"], spec["cols"], spec["tokens"]), []).append(spec)
    rows = []
    for shape, specs in by_shape.items():
        rows.append(_mma_shape(module, tvm_ffi, shape, specs, rounds))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "configs"}), flush=True)
    return rows


def _mma_shape(module: object, tvm_ffi: object, shape: tuple[int, int, int], specs: list[dict], rounds: int) -> dict:
    """One GEMM shape: every candidate checked and swept, the fastest against cuBLAS and cuSPARSELt."""
    m, k, n = shape
    weight, values, meta = _nm_weight(m, k)
    w16 = weight.half().cuda()
    x = torch.randn(n, k, device="cuda").half()
    bias = torch.randn(m, device="cuda") * 0.1
    bias16 = bias.half()
    v, e = torch.from_numpy(values).cuda(), torch.from_numpy(meta).cuda()
    want = x.float() @ w16.float().T + bias
    row: dict = {"rows": m, "cols": k, "tokens": n, "configs": {}}
    best = None
    for spec in specs:  # correctness, then a short sweep over the candidate configurations
        out = torch.empty(n, m, dtype=torch.float16, device="cuda")
        tensors = [tvm_ffi.from_dlpack(t) for t in (x, v, e, bias, out)]
        call = (lambda f=module[spec["name"]], a=tensors: f(*a))
        try:
            call()
            torch.cuda.synchronize()
            error = float((out.float() - want).norm() / want.norm())
            ms = _event_ms(call, repeat=5) if error < 1e-2 else None
        except Exception as failure:
            error, ms = None, None
            row["configs"][spec["config"]] = {"error": str(failure).splitlines()[0][:200]}
            continue
        row["configs"][spec["config"]] = {"rel_l2_err": error, "ms": ms}
        if ms is not None and (best is None or ms < best[1]):
            best = (call, ms, spec["config"], error, spec["name"])
    calls = {"cublas_dense": lambda: torch.nn.functional.linear(x, w16, bias16)}
    try:
        ws = torch.sparse.to_sparse_semi_structured(w16)
        row["semi_structured_backend"] = type(ws).__name__
        got = torch.nn.functional.linear(x, ws, bias16)
        row["cusparselt_rel_l2_err"] = float((got.float() - want).norm() / want.norm())
        calls["cusparselt"] = lambda: torch.nn.functional.linear(x, ws, bias16)
    except Exception as failure:
        row["cusparselt_error"] = f"{type(failure).__name__}: {str(failure).splitlines()[0][:200]}"
    if best is not None:
        calls["sparsefx"] = best[0]
        row["best_config"], row["rel_l2_err"], row["best_name"] = best[2], best[3], best[4]
    row["ms"] = _alternate(calls, rounds, lambda c: _event_ms(c, repeat=5))
    row["correct"] = best is not None
    return row


def run_bert24(kit: Path, rounds: int) -> dict:
    """BERT-base, batch 32 x sequence 128, eager fp16: linear layers dense, on cuSPARSELt, on sparsefx's 2:4."""
    from transformers import BertConfig, BertModel

    module, manifest = _mma_module(kit)
    import tvm_ffi

    kernels = {}
    for spec in manifest["specs"]:
        if spec["tokens"] == BERT_TOKENS:
            kernels.setdefault((spec["rows"], spec["cols"]), spec["name"])  # first candidate: the fallback
    if BEST_MMA.exists():  # the fastest candidate per shape, as the 2:4 part measured
        for row in json.loads(BEST_MMA.read_text()):
            if row.get("tokens") == BERT_TOKENS and row.get("best_name"):
                kernels[(row["rows"], row["cols"])] = row["best_name"]
    torch.manual_seed(0)
    model = BertModel(BertConfig(), add_pooling_layer=False).cuda().half().eval()
    ids = torch.randint(0, 1000, (32, 128), device="cuda")
    linears = [(name, mod) for name, mod in model.named_modules()
               if isinstance(mod, torch.nn.Linear) and name.startswith("encoder")]
    dense_weights = {}
    with torch.no_grad():
        for name, lin in linears:  # the same 2:4 weights for all three
            weight, _, _ = _nm_weight(lin.out_features, lin.in_features, seed=len(dense_weights))
            lin.weight.copy_(weight.half())
            dense_weights[name] = lin.weight.detach().clone()
        want = model(ids).last_hidden_state.float()
    result: dict = {"batch": 32, "sequence": 128, "layers_2of4": len(linears),
                    "kernels": {f"{m}x{k}": name for (m, k), name in kernels.items()}}
    calls = {"dense": lambda: model(ids)}

    class Mma(torch.nn.Module):
        def __init__(self, lin: torch.nn.Linear, seed: int) -> None:
            super().__init__()
            _, values, meta = _nm_weight(lin.out_features, lin.in_features, seed=seed)
            self.v, self.e = torch.from_numpy(values).cuda(), torch.from_numpy(meta).cuda()
            self.bias = lin.bias.detach().float()
            self.kernel = module[kernels[(lin.out_features, lin.in_features)]]
            self.rows = lin.out_features

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            flat = x.reshape(-1, x.shape[-1]).contiguous()
            out = torch.empty(flat.shape[0], self.rows, dtype=torch.float16, device="cuda")
            self.kernel(*[tvm_ffi.from_dlpack(t) for t in (flat, self.v, self.e, self.bias, out)])
            return out.reshape(*x.shape[:-1], self.rows)

    def swap(make: object) -> torch.nn.Module:
        clone = BertModel(BertConfig(), add_pooling_layer=False).cuda().half().eval()
        clone.load_state_dict(model.state_dict())
        for index, (name, _) in enumerate(linears):
            parent, _, leaf = name.rpartition(".")
            setattr(clone.get_submodule(parent), leaf, make(clone.get_submodule(name), index))
        return clone

    with torch.no_grad():
        for label, make in (("cusparselt", _semi_structured), ("sparsefx", Mma)):
            try:
                swapped = swap(make)
                got = swapped(ids).last_hidden_state.float()
                result[f"{label}_rel_l2_err"] = float((got - want).norm() / want.norm())
                calls[label] = (lambda s=swapped: s(ids))
            except Exception as failure:
                result[f"{label}_error"] = f"{type(failure).__name__}: {str(failure).splitlines()[0][:200]}"
        result["ms"] = _alternate(calls, rounds)
    return result


def _semi_structured(lin: torch.nn.Linear, _index: int) -> torch.nn.Linear:
    lin.weight = torch.nn.Parameter(torch.sparse.to_sparse_semi_structured(lin.weight.detach()), requires_grad=False)
    return lin


def _child(*args: str, timeout: float = 300) -> tuple[object, str]:
    """Run a subcommand of this script in its own process: (its last stdout line as JSON, or None; error)."""
    try:
        done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"
    print(done.stderr[-1500:], file=sys.stderr)
    error = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
    lines = done.stdout.strip().splitlines()
    return (json.loads(lines[-1]) if done.returncode == 0 and lines else None), error


def _host() -> dict:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,power.limit",
                          "--format=csv,noheader"], capture_output=True, text=True).stdout.strip() \
        if shutil.which("nvidia-smi") else "no nvidia-smi"
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")
    return {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (dry run)",
            "nvidia_smi": smi, "host_cpu": cpu, "cpu_cores": os.cpu_count(), "torch": torch.__version__,
            "python": sys.version.split()[0], "load_before": os.getloadavg()}


def run(kit: Path, out: Path, rounds: int, parts: set[str], device: str, only: str = "",
        budget: float = 420.0) -> int:
    """The parts in order; the models part skips the architectures left when `budget` seconds have passed
    (those with sparsefx bundles go first)."""
    deadline = time.monotonic() + budget
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {**_host(), "rounds": rounds}
    cache = Path(os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", "/tmp/sparsefx-inductor"))
    cache.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        report["load_after"] = os.getloadavg()
        (out / "gpu_backend.json").write_text(json.dumps(report, indent=1) + "\n")
        (out / "gpu_backend.md").write_text(markdown(report))

    built = {b.name.rsplit("-b", 1)[0] for b in (kit / "tvm").iterdir() if b.is_dir()} if (kit / "tvm").exists() else set()
    archs = sorted((a for a in (kit / "archs").iterdir() if only in a.name), key=lambda a: (a.name not in built, a.name))
    jobs = [(a, b) for a in archs for b in BATCHES]
    warm: dict[str, list] = {}
    if "models" in parts:  # Inductor compiles on the host's cores while the GPU parts run, in timing order
        pool = concurrent.futures.ThreadPoolExecutor(max(1, min(6, (os.cpu_count() or 2) // 3)))
        for a, b in jobs:
            warm.setdefault(a.name, []).extend(
                pool.submit(_child, "warm", str(a), str(b), mode, "--device", device, timeout=300) for mode in _modes(b))
    if "mma" in parts:
        mma, error = _child("run-mma", str(kit), "--rounds", str(rounds), timeout=200)
        report["mma24"] = mma or [{"error": error}]
        BEST_MMA.write_text(json.dumps(report["mma24"]))
        save()
    if "bert24" in parts:
        bert, error = _child("run-bert24", str(kit), "--rounds", str(rounds), timeout=150)
        report["bert24"] = bert or {"error": error}
        save()
    if "models" in parts:
        report["warm"] = []
        failures = json.loads((kit / "tvm" / "failures.json").read_text()) if (kit / "tvm").exists() else {}
        report["models"] = []
        for arch in archs:  # one process per architecture (each bundle registers its own cubins)
            report["warm"] += [f.result()[0] or {"model": arch.name, "error": f.result()[1]} for f in warm[arch.name]]
            for batch in BATCHES:
                bundle = kit / "tvm" / f"{arch.name}-b{batch}"
                for shared in ("lib", "wheels"):
                    if bundle.exists() and not (bundle / shared).exists():
                        shutil.copytree(kit / "runtime" / shared, bundle / shared)
            left = deadline - time.monotonic()
            rows, error = _child("run-peer", str(arch), "--rounds", str(rounds), "--device", device,
                                 timeout=min(240, left)) if left > 20 else (None, "skipped: the run's time budget was spent")
            for index, batch in enumerate(BATCHES):
                row = rows[index] if rows else {"model": arch.name, "batch": batch, "error": error}
                if f"{arch.name}-b{batch}" in failures:
                    row["sparsefx_build_error"] = failures[f"{arch.name}-b{batch}"]
                report["models"].append(row)
                print(json.dumps(row), flush=True)
            save()
    save()
    print(markdown(report))
    return 0


def _ms(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ratio(slower: float | None, faster: float | None) -> str:
    return f"{slower / faster:.2f}x" if slower and faster else "-"


def _rows(results: list[dict], key: str, width: int, lead: Callable[[dict], list[str]],
          row: Callable[[dict], list[str]]) -> list[str]:
    """Table rows: `row(r)` for a result that holds `key`, else its leading cells and the error."""
    lines = []
    for r in results:
        cells = row(r) if key in r else [*lead(r), f"failed: {r.get('error')}"]
        lines.append("| " + " | ".join(cells + [""] * (width - len(cells))) + " |")
    return lines


def _mma24_row(r: dict) -> list[str]:
    ours, dense, lt = (r["ms"].get(k) for k in ("sparsefx", "cublas_dense", "cusparselt"))
    err = r.get("rel_l2_err")
    return [f"{r['rows']}x{r['cols']}", str(r["tokens"]), _ms(dense, 4), _ms(lt, 4), _ms(ours, 4), _ratio(dense, ours),
            _ratio(lt, ours), "-" if err is None else f"{err:.1e}", str(r.get("best_config", "-"))]


def _model_row(r: dict) -> list[str]:
    lat = r["latency_ms"]
    best = min([lat[k] for k in ("compile_default", "compile_reduce-overhead") if k in lat], default=None)
    ours = lat.get("sparsefx")
    note = r.get("sparsefx_error") or r.get("sparsefx_build_error") or "not built (weights too large to carry)"
    return [r["model"], str(r["batch"]), f"{r['macs'] / 1e9:.2f}", _ms(lat.get("eager")), _ms(lat.get("compile_default")),
            _ms(lat.get("compile_reduce-overhead")), _ms(ours) if ours else note, _ratio(best, ours),
            f"{r['rel_l2_err']:.1e}" if ours else "-"]


def markdown(report: dict) -> str:
    lines = [f"# sparsefx on {report['device']} ({report['date']}; PyTorch {report['torch']}, Python "
             f"{report['python']}; host {report['host_cpu']}, {report['cpu_cores']} cores)", "",
             f"Load average before {report['load_before']}, after {report.get('load_after')}. "
             f"Medians of {report['rounds']} alternating rounds.", ""]
    if "mma24" in report:
        lines += ["## 2:4 GEMM out = x @ Wᵀ + b, fp16 (CUDA-event ms; sparsefx = fastest candidate configuration)", "",
                  "| W rows x cols | tokens | cuBLAS dense | cuSPARSELt 2:4 | sparsefx 2:4 | vs dense | vs cuSPARSELt | "
                  "rel err | config |", "|---|---|---|---|---|---|---|---|---|"]
        lines += _rows(report["mma24"], "ms", 9, lambda r: [], _mma24_row)
    if "bert24" in report:
        b = report["bert24"]
        lines += ["", "## BERT-base encoder, batch 32 x sequence 128, eager fp16, all 72 encoder linears 2:4", ""]
        if "ms" in b:
            ms = b["ms"]
            lines += ["| linears | ms | vs dense | rel err vs dense-weights output |", "|---|---|---|---|"]
            for label in ("dense", "cusparselt", "sparsefx"):
                if label in ms:
                    err = b.get(f"{label}_rel_l2_err")
                    lines.append(f"| {label} | {ms[label]:.3f} | {_ratio(ms['dense'], ms[label])} | "
                                 f"{'-' if err is None else f'{err:.1e}'} |")
            lines += [f"| {k.removesuffix('_error')} | failed: {v} | | |" for k, v in b.items() if k.endswith("_error")]
        else:
            lines.append(f"failed: {b.get('error')}")
    if "models" in report:
        lines += ["", "## Models, fp16 (wall ms per call)", "",
                  "| model | batch | GMACs | eager | torch.compile | compile reduce-overhead | sparsefx | "
                  "sparsefx vs best compile | sparsefx rel err |", "|---|---|---|---|---|---|---|---|---|"]
        lines += _rows(report["models"], "latency_ms", 9, lambda r: [r["model"], str(r["batch"])], _model_row)
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="write the kit (needs TVM)")
    b.add_argument("--arch", default="sm_90")
    b.add_argument("--kit", type=Path, default=ROOT / "gpu_kit")
    r = sub.add_parser("run", help="check and time the kit on this host's GPU (needs PyTorch with CUDA)")
    r.add_argument("--kit", type=Path, default=ROOT / "gpu_kit")
    r.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    r.add_argument("--rounds", type=int, default=5)
    r.add_argument("--parts", default="mma,bert24,models", help="comma-separated subset of mma,bert24,models")
    r.add_argument("--dry-run-cpu", action="store_true", help="check the model part's plumbing on a CPU host (fp32)")
    r.add_argument("--only", default="", help="only the models whose name contains this")
    r.add_argument("--budget", type=float, default=420.0, help="seconds for the whole run (later models are skipped)")
    for name, extra in (("warm", ("arch", "batch", "mode")), ("run-peer", ("arch",)),
                        ("run-mma", ("kit",)), ("run-bert24", ("kit",))):
        p = sub.add_parser(name)
        for arg in extra:
            p.add_argument(arg, type=int if arg == "batch" else (str if arg == "mode" else Path))
        p.add_argument("--rounds", type=int, default=5)
        p.add_argument("--device", default="cuda")
    args = parser.parse_args()
    if args.command == "build":
        build(args.arch, args.kit)
        return 0
    device = "cpu" if getattr(args, "dry_run_cpu", False) else getattr(args, "device", "cuda")
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_backend: no CUDA GPU visible to PyTorch; run this half on the GPU host "
              "(or `run --dry-run-cpu --parts models` to check the plumbing)", file=sys.stderr)
        return 1
    if args.command == "warm":
        print(json.dumps(warm_one(args.arch, args.batch, args.mode, device)))
    elif args.command == "run-peer":
        bundles = [args.arch.parent.parent / "tvm" / f"{args.arch.name}-b{batch}" for batch in BATCHES]
        print(json.dumps([peer_row(args.arch, batch, bundle if bundle.exists() else None, args.rounds, device)
                          for batch, bundle in zip(BATCHES, bundles, strict=True)]))
    elif args.command == "run-mma":
        print(json.dumps(run_mma(args.kit, args.rounds)))
    elif args.command == "run-bert24":
        print(json.dumps(run_bert24(args.kit, args.rounds)))
    else:
        return run(args.kit, args.out, args.rounds, set(args.parts.split(",")), device, args.only, args.budget)
    return 0


if __name__ == "__main__":
    sys.exit(main())
