"""TVM on a GPU host that has only the TVM runtime: runtime-only bundles and the 2:4 kernels vs PyTorch eager.

The GPU host has no TVM compiler, so the benchmark has two halves:

    .venv/bin/python benchmarks/gpu_backend.py build --arch sm_90 --kit gpu_kit     # here, with TVM
    python3 benchmarks/gpu_backend.py run --kit gpu_kit --out results               # on the GPU host

`build` compiles each model of MODELS (dense, or 50% of channels pruned) for CUDA and exports
runtime-only bundles (`CompiledModel.export_bundle`) that share one lib/ and wheels/ (`run`
copies them back in), with the eager fp32 output computed here on the CPU for run.py's seeded input,
and the model's architecture pickled with its weights on the meta device (eager timing on the GPU
needs the layer shapes, not the values). It also builds the 2:4 `mma.sp` GEMMs
(`backends/tvm/sparse_mma.py`) as a runtime library with their cubins.

`run` needs PyTorch with CUDA on the host and nothing of TVM's but what the kit ships. Per model:
`run.py` in an isolated Python (`-I -S`: the standard library and the bundle only) must reproduce
the reference output within 1e-4 relative; then the bundle and PyTorch eager (fp32, TF32 off, and
PyTorch's default with TF32 convolutions) are timed in one process, median of alternating rounds
of wall time per call including launches. The 2:4 GEMMs are checked against the same product in
fp32 and timed against dense fp16 `torch.addmm` (cuBLAS) by CUDA events. Writes
gpu_backend.{json,md}.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
# (model spec, batch, variant): what fits the 64 MiB a device call carries beside the shared runtime
MODELS = (("torchvision:mobilenet_v2", 1, "dense"), ("torchvision:mobilenet_v2", 1, "pruned"),
          ("default", 64, "dense"), ("default", 64, "pruned"))
MMA_SIZES = ((4096, 4096, 4096), (3072, 768, 128), (768, 3072, 128), (3072, 768, 4096), (768, 3072, 4096))  # BERT MLP


# ------------------------------------------------------------------ build (here, with TVM) -----------------

def build(arch: str, kit: Path) -> None:
    import sparsefx
    from sparsefx.capture.models import load_model

    if kit.exists():
        shutil.rmtree(kit)
    (kit / "models").mkdir(parents=True)
    for spec, batch, variant in MODELS:
        model, inputs = load_model(spec, batch_size=batch)
        if variant == "pruned":
            model = sparsefx.prune(model, inputs, ratio=0.5)
        compiled = sparsefx.compile(model, inputs, target=f"cuda:{arch}", verbose=False)
        name = spec.split(":")[-1]
        bundle = compiled.export_bundle(kit / "models" / f"{name}-b{batch}-{variant}")
        # run.py's own random inputs (seeded), so no input file has to travel
        x = np.random.default_rng(0).standard_normal(inputs[0].shape).astype(np.float32)
        with torch.no_grad():
            np.save(bundle / "want.npy", model(torch.from_numpy(x)).numpy())
        torch.save(model.to("meta"), bundle / "arch.pt")
        for shared in ("lib", "wheels"):  # one copy in the kit; `run` puts it back in each bundle
            if not (kit / shared).exists():
                shutil.copytree(bundle / shared, kit / shared)
            shutil.rmtree(bundle / shared)
        print(f"built {bundle.name}", flush=True)
    _build_mma(arch, kit / "mma")


def _build_mma(arch: str, out: Path) -> None:
    import tvm

    from sparsefx.backends.tvm.bundle import precompile_cuda
    from sparsefx.backends.tvm.sparse import mma as sparse_mma

    specs = [sparse_mma.MmaSpec(*size, "float16") for size in MMA_SIZES]
    lib = sparse_mma.build(specs, tvm.target.Target({"kind": "cuda", "arch": arch}))
    out.mkdir(parents=True)
    lib.export_library(str(out / "mma.so"))
    kernels = precompile_cuda(lib.mod, arch, out / "kernels")
    (out / "manifest.json").write_text(json.dumps({
        "arch": arch, "instruction": sparse_mma.instruction(), "cuda_kernels": kernels,
        "specs": [{"name": s.name, "rows": s.rows, "cols": s.cols, "tokens": s.tokens} for s in specs]}, indent=1))


# ------------------------------------------------------------------ run (GPU host, PyTorch only) -----------

def _bundle_module(bundle: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(f"bundle_{bundle.name.replace('-', '_')}", bundle / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _wall_ms(call: object, seconds: float = 0.3) -> float:
    """Mean wall time of one call (launches included) over a ~`seconds` stretch, synchronised at both ends."""
    call()
    torch.cuda.synchronize()
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for _ in range(10):
            call()
        count += 10
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / count * 1e3


def _eager(arch_file: Path) -> torch.nn.Module:
    _bare_sparsefx()
    model = torch.load(arch_file, weights_only=False).to_empty(device="cuda").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.fill_(1.0)
            elif name.endswith("running_mean"):
                b.zero_()
    return model


def run_one(bundle: Path, rounds: int) -> dict:
    """Isolated correctness check, then TVM bundle vs eager timings, for one bundle."""
    done = subprocess.run([sys.executable, "-I", "-S", str(bundle / "run.py"), "--out", str(bundle / "got.npy")],
                          capture_output=True, text=True)
    row: dict = {"model": bundle.name, "isolated_run": done.returncode == 0}
    if done.returncode:
        row["error"] = done.stderr.strip().splitlines()[-1:]
        return row
    got, want = np.load(bundle / "got.npy"), np.load(bundle / "want.npy")
    row["max_rel_err"] = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))
    manifest = json.loads((bundle / "manifest.json").read_text())
    shipped = [f for f in bundle.rglob("*") if f.is_file() and "site" not in f.relative_to(bundle).parts
               and f.name not in ("want.npy", "got.npy", "arch.pt")]
    row["bundle_mib"] = round(sum(f.stat().st_size for f in shipped) / 2**20, 1)
    row["arch"] = manifest["target"]["arch"]

    model = _bundle_module(bundle).Model()
    x = model.random_inputs()[0]
    args = [model._to_device(x)]
    tvm_call = lambda: model.vm["main"](*args)
    eager = _eager(bundle / "arch.pt")
    xt = torch.from_numpy(x).cuda()
    def eager_call(tf32: bool) -> object:
        def call() -> None:
            torch.backends.cudnn.allow_tf32 = tf32
            with torch.no_grad():
                eager(xt)
        return call
    timed = {"tvm": tvm_call, "eager_fp32": eager_call(False), "eager_tf32": eager_call(True)}
    samples: dict[str, list[float]] = {k: [] for k in timed}
    for _ in range(rounds):  # alternating rounds: drift in clocks hits every contender alike
        for label, call in timed.items():
            samples[label].append(_wall_ms(call))
    row["latency_ms"] = {k: statistics.median(v) for k, v in samples.items()}
    row["fastest_ms"] = {k: min(v) for k, v in samples.items()}
    return row


def _bare_sparsefx() -> None:
    """Make `sparsefx.<module>` importable without sparsefx/__init__.py, which imports TVM: the pickled
    architectures name sparsefx classes, and the 2:4 packing lives in sparsefx.formats."""
    if "sparsefx" not in sys.modules:
        package = types.ModuleType("sparsefx")
        package.__path__ = [str(ROOT / "sparsefx")]
        sys.modules["sparsefx"] = package


def run_mma(mma: Path, bundle: Path, repeat: int) -> list[dict]:
    """The 2:4 kernels, on the TVM runtime and wheels that `bundle` ships (its run.py loads them)."""
    runtime = _bundle_module(bundle)
    runtime.unpack_wheels()
    import tvm_ffi

    runtime.load_runtime(json.loads((bundle / "manifest.json").read_text())["bundle"]["runtime_libs"])
    manifest = json.loads((mma / "manifest.json").read_text())
    runtime.serve_precompiled_kernels(tvm_ffi, mma / "kernels", manifest["cuda_kernels"])
    module = tvm_ffi.load_module(str(mma / "mma.so"))
    _bare_sparsefx()
    import sparsefx.sparse.formats as formats

    return [_mma_row(module[spec["name"]], spec, formats, tvm_ffi, repeat) for spec in manifest["specs"]]


def _mma_row(kernel: object, spec: dict, formats: types.ModuleType, tvm_ffi: object, repeat: int) -> dict:
    m, k, n = spec["rows"], spec["cols"], spec["tokens"]
    torch.manual_seed(0)
    nm = formats.NM.from_dense(torch.randn(m, k), 2, 4)
    values, meta = formats.mma24_pack(nm)
    weight = nm.to_dense().half().cuda()
    x = torch.randn(n, k).half().cuda()
    bias = torch.randn(m).cuda()
    v, e = torch.from_numpy(values).cuda(), torch.from_numpy(meta).cuda()
    out = torch.empty(n, m, dtype=torch.float16, device="cuda")
    tensors = [tvm_ffi.from_dlpack(t) for t in (x, v, e, bias, out)]
    call = lambda: kernel(*tensors)
    call()
    torch.cuda.synchronize()
    want = x.float() @ weight.float().T + bias
    error = float((out.float() - want).abs().max() / want.abs().max())
    bias16 = bias.half()
    sparse_ms, dense_ms = _event_ms(call, repeat), _event_ms(lambda: torch.addmm(bias16, x, weight.T), repeat)
    flops = 2 * m * k * n
    return {"name": spec["name"], "rows": m, "cols": k, "tokens": n, "max_rel_err": error,
            "correct": error < 1e-2, "sparse_ms": sparse_ms, "dense_ms": dense_ms,
            "speedup": dense_ms / sparse_ms, "dense_tflops": flops / dense_ms / 1e9,
            "sparse_equiv_tflops": flops / sparse_ms / 1e9}


def _event_ms(call: object, repeat: int) -> float:
    for _ in range(3):
        call()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            call()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 10)
    return min(times)


def _child(*args: str) -> tuple[object, str]:
    """Run a subcommand of this script in its own process: (its last stdout line as JSON, or None; stderr)."""
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    print(done.stderr[-2000:], file=sys.stderr)
    error = done.stderr.strip().splitlines()[-1:]
    return (json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None), error


def run(kit: Path, out: Path, rounds: int) -> int:
    bundles = sorted((kit / "models").iterdir())
    models = []
    for bundle in bundles:  # one process each: each bundle registers its own cubins
        for shared in ("lib", "wheels"):
            if not (bundle / shared).exists():
                shutil.copytree(kit / shared, bundle / shared)
        row, error = _child("run-one", str(bundle), "--rounds", str(rounds))
        models.append(row or {"model": bundle.name, "error": error})
        print(json.dumps(models[-1]), flush=True)
    mma, error = _child("run-mma", str(kit / "mma"), str(bundles[0]))
    mma = mma or [{"error": error}]
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "python": sys.version.split()[0], "models": models, "mma24": mma,
              "instruction": json.loads((kit / "mma" / "manifest.json").read_text())["instruction"]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_backend.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "gpu_backend.md").write_text(markdown(report))
    print(markdown(report))
    ok = all(m.get("max_rel_err", 1) < 1e-4 for m in models) and all(r.get("correct") for r in mma)
    return 0 if ok else 2


def markdown(report: dict) -> str:
    lines = [f"# TVM CUDA runtime-only bundles on {report['device']} (fp32; Python {report['python']}, "
             f"PyTorch {report['torch']} for eager)", "",
             "Bundles checked in an isolated Python (`-I -S`: standard library plus the bundle). Wall ms per call, "
             "median of alternating rounds, launches included.", "",
             "| model | isolated run | max rel err | bundle MiB | TVM ms | eager fp32 ms | eager TF32 ms | "
             "TVM vs eager fp32 |", "|---|---|---|---|---|---|---|---|"]
    for m in report["models"]:
        if "latency_ms" not in m:
            lines.append(f"| {m['model']} | failed: {m.get('error')} |" + " |" * 6)
            continue
        lat = m["latency_ms"]
        lines.append(f"| {m['model']} | yes | {m['max_rel_err']:.1e} | {m['bundle_mib']} | {lat['tvm']:.3f} | "
                     f"{lat['eager_fp32']:.3f} | {lat['eager_tf32']:.3f} | {lat['eager_fp32'] / lat['tvm']:.2f}x |")
    lines += ["", f"## 2:4 sparse tensor cores (`{report['instruction']}`, TIR) vs dense fp16 cuBLAS", "",
              "| rows x cols | tokens | max rel err | dense ms | 2:4 ms | speedup | dense TFLOP/s |",
              "|---|---|---|---|---|---|---|"]
    for r in report["mma24"]:
        if "error" in r:
            lines.append(f"| failed: {r['error']} |" + " |" * 6)
            continue
        lines.append(f"| {r['rows']}x{r['cols']} | {r['tokens']} | {r['max_rel_err']:.1e}"
                     f"{'' if r['correct'] else ' WRONG'} | {r['dense_ms']:.4f} | {r['sparse_ms']:.4f} | "
                     f"{r['speedup']:.2f}x | {r['dense_tflops']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="compile the kit (needs TVM)")
    b.add_argument("--arch", default="sm_90")
    b.add_argument("--kit", type=Path, default=ROOT / "gpu_kit")
    r = sub.add_parser("run", help="check and time the kit on this host's GPU (needs PyTorch with CUDA)")
    r.add_argument("--kit", type=Path, default=ROOT / "gpu_kit")
    r.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    r.add_argument("--rounds", type=int, default=7)
    one = sub.add_parser("run-one")
    one.add_argument("bundle", type=Path)
    one.add_argument("--rounds", type=int, default=7)
    mma = sub.add_parser("run-mma")
    mma.add_argument("mma", type=Path)
    mma.add_argument("bundle", type=Path, help="a bundle of the kit: its runtime libraries and wheels are used")
    mma.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    if args.command == "build":
        build(args.arch, args.kit)
        return 0
    if args.command in ("run", "run-one", "run-mma") and not torch.cuda.is_available():
        print("gpu_backend: no CUDA GPU visible to PyTorch; run this half on the GPU host", file=sys.stderr)
        return 1
    if args.command == "run-one":
        print(json.dumps(run_one(args.bundle, args.rounds)))
        return 0
    if args.command == "run-mma":
        print(json.dumps(run_mma(args.mma, args.bundle, args.repeat)))
        return 0
    return run(args.kit, args.out, args.rounds)


if __name__ == "__main__":
    sys.exit(main())
