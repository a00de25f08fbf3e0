"""sparsefx on another machine's CPU, where only the TVM runtime ships, against PyTorch and ONNX Runtime there.

The host has PyTorch and ONNX Runtime but no TVM compiler, so the benchmark has two halves:

    .venv/bin/python benchmarks/cpu_device.py build --kit cpu_kit        # here, with TVM
    python3 benchmarks/cpu_device.py run --kit cpu_kit --out results     # on the host

`build` compiles each model of MODELS (dense, or 50% of channels pruned; batch norms calibrated as
runtimes.py does, so outputs are O(1) and depend on the input) for two x86-64 levels, since the
host's CPU is not this one: x86-64-v4 (AVX-512) and x86-64-v3 (AVX2). A runtime-only bundle has no
PyTorch kernels, so no conv may be dispatched to them: by default (`--kernels own`) every conv
sparsefx has a kernel for runs on it and the rest on TIR (`compile(dispatch="own")`); `--kernels tir` is
`compile(dispatch=False)`, TIR's default schedules throughout. Each is exported as a runtime-only
bundle (`CompiledModel.export_bundle`, no numpy wheel: the host has numpy); the TVM runtime library
and the tvm-ffi wheels (one set per Python version asked for) are kept once in the kit. Beside the
bundles: the eager fp32 output for run.py's seeded input, and the architecture on the meta device.

`run` picks per model the widest level the host's /proc/cpuinfo flags allow, checks the bundle
(run.py in an isolated Python, then in this process: relative L2 error against the reference under
1e-4, as capture/compare.py measures it), re-creates the model with random weights (default init,
batch norms calibrated) for the peers, and times side by side in one process, per thread count,
median of alternating rounds: the bundle (TVM's pool set to the thread count, workers sharing all
cores as sparsefx sets it), PyTorch eager fp32, torch.compile and ONNX Runtime, built as
runtimes.py builds them (`backends/peers.py`: inductor; CPU EP, all graph optimisations, intra-op
threads set, ONNX exported there). One child process per model, so a crash is that model's row;
a runtime that fails is an error in its row. Thread counts after the first run only while the time
budget lasts. Writes cpu_device.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
MODELS = (("torchvision:mobilenet_v2", 1, "dense"), ("torchvision:mobilenet_v2", 1, "pruned"))
# x86-64 levels, widest first: LLVM CPU name, SIMD bits, /proc/cpuinfo flags the code may use
LEVELS = {"x86-64-v4": (512, ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx2", "fma", "bmi2")),
          "x86-64-v3": (256, ("avx2", "fma", "bmi1", "bmi2", "f16c", "movbe"))}
HOST_CORES = 16  # the cores the target host has: what `num-cores` in the LLVM target says
PEERS = ("eager", "torch.compile", "onnxruntime")
SHARE_ALL_CORES = -3  # TVM's thread-pool mode with unpinned workers (backends/tvm/threads.py)
TOLERANCE = 1e-4
CALLS_PER_ROUND = 5  # a burst per runtime per round: ~10 ms at 16 cores, ~60 ms at 1


# ------------------------------------------------------------------ build (here, with TVM) -----------------

def build(kit: Path, pythons: list[str], kernels: str = "own") -> None:
    import sparsefx
    from sparsefx.capture.compare import calibrate_norm_statistics, check_reference
    from sparsefx.capture.models import load_model

    if kit.exists():
        shutil.rmtree(kit)
    (kit / "models").mkdir(parents=True)
    for spec, batch, variant in MODELS:
        model, inputs = load_model(spec, batch_size=batch)
        calibrate_norm_statistics(model, inputs)
        if variant == "pruned":
            model = sparsefx.prune(model, inputs, ratio=0.5)
            calibrate_norm_statistics(model, inputs)
        check_reference(model, inputs)  # refuses an output near zero or one that ignores the input
        folder = kit / "models" / f"{spec.split(':')[-1]}-b{batch}-{variant}"
        folder.mkdir()
        for level, (bits, _) in LEVELS.items():
            target = {"name": "cpu", "kind": "llvm", "arch": level, "cores": HOST_CORES, "vector_bits": bits}
            compiled = sparsefx.compile(model, inputs, target=target, dispatch="own" if kernels == "own" else False,
                                        verbose=False)
            bundle = compiled.export_bundle(folder / level, python=pythons[0], numpy=False)
            _keep_shared(kit, bundle, pythons[0])
            for python in pythons[1:]:  # other Pythons differ in their wheels only
                if not (kit / "wheels" / python).exists():
                    extra = compiled.export_bundle(Path(tempfile.mkdtemp()) / "b", python=python, numpy=False)
                    _keep_shared(kit, extra, python)
                    shutil.rmtree(extra.parent)
            print(f"built {folder.name}/{level}", flush=True)
        # run.py's own random inputs (seeded), so no input file has to travel
        x = np.random.default_rng(0).standard_normal(inputs[0].shape).astype(np.float32)
        with torch.no_grad():
            np.save(folder / "want.npy", model(torch.from_numpy(x)).numpy())
        torch.save(model.to("meta"), folder / "arch.pt")
        (folder / "build.json").write_text(json.dumps({"spec": spec, "batch": batch, "variant": variant,
                                                       "kernels": kernels, "host_cores": HOST_CORES}))
    size = sum(f.stat().st_size for f in kit.rglob("*") if f.is_file())
    print(f"kit {kit}: {size / 2**20:.1f} MiB", flush=True)


def _keep_shared(kit: Path, bundle: Path, python: str) -> None:
    """One copy of lib/ and of each Python's wheels/ in the kit; `run` links them back into each bundle."""
    for shared, there in (("lib", kit / "lib"), ("wheels", kit / "wheels" / python)):
        if not there.exists():
            shutil.copytree(bundle / shared, there)
        shutil.rmtree(bundle / shared)


# ------------------------------------------------------------------ run (host: torch, onnxruntime) ---------

def host_facts() -> dict:
    flags = _cpu_flags()
    return {"cpu": _cpuinfo_field("model name"), "cpus": os.cpu_count(), "usable_cores": len(_allowed_cpus()),
            "level": next((lv for lv, (_, need) in LEVELS.items() if set(need) <= flags), None),
            "amx": "amx_tile" in flags, "avx512_bf16": "avx512_bf16" in flags,
            "torch": torch.__version__, "onnxruntime": _version("onnxruntime"), "numpy": np.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}


def _cpuinfo_field(name: str) -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _cpu_flags() -> set[str]:
    return set(_cpuinfo_field("flags").split())


def _allowed_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def _version(package: str) -> str | None:
    try:
        return importlib.import_module(package).__version__
    except ImportError:
        return None


def _bare_sparsefx() -> None:
    """Make `sparsefx.<module>` importable without sparsefx/__init__.py, which imports TVM: the pickled
    architectures name sparsefx classes, and the peers and the error measure live in sparsefx."""
    if "sparsefx" not in sys.modules:
        package = types.ModuleType("sparsefx")
        package.__path__ = [str(ROOT / "sparsefx")]
        sys.modules["sparsefx"] = package


def _link_shared(kit: Path, bundle: Path) -> None:
    python = ".".join(platform.python_version_tuple()[:2])
    wheels = kit / "wheels" / python
    if not wheels.is_dir():
        raise RuntimeError(f"the kit has no tvm-ffi wheels for Python {python}; rebuild it with --python {python}")
    for name, source in (("lib", kit / "lib"), ("wheels", wheels)):
        link = bundle / name
        if link.is_symlink() or link.exists():
            link.unlink() if link.is_symlink() else shutil.rmtree(link)
        link.symlink_to(source.resolve(), target_is_directory=True)


def _bundle_module(bundle: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(f"bundle_{bundle.parent.name.replace('-', '_')}", bundle / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _peer_model(folder: Path, inputs: tuple) -> torch.nn.Module:
    """The architecture with random weights: default init, batch norms calibrated (outputs O(1), no denormals)."""
    from sparsefx.capture.compare import calibrate_norm_statistics

    model = torch.load(folder / "arch.pt", weights_only=False).to_empty(device="cpu")
    torch.manual_seed(0)
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    calibrate_norm_statistics(model, inputs)
    return model.eval()


def run_one(folder: Path, kit: Path, level: str, threads: list[int], rounds: int, until: float, log: Path) -> dict:
    """Check the bundle of `folder` for `level`, then time it against the peers at each thread count;
    the row so far is rewritten to `log` after each step, for the parent to read if this process dies."""
    _bare_sparsefx()
    from sparsefx.backends.eager import measure_latencies
    from sparsefx.backends.peers import Peers
    from sparsefx.capture.compare import output_error

    bundle = folder / level
    row: dict = {"model": folder.name, "level": level, **json.loads((folder / "build.json").read_text())}
    _link_shared(kit, bundle)
    want = torch.from_numpy(np.load(folder / "want.npy"))
    # TVM sizes its pool from it when the pool starts (unset: half the cores), in run.py's process and this one
    os.environ["TVM_NUM_THREADS"] = str(max(threads))
    done = subprocess.run([sys.executable, "-I", str(bundle / "run.py"), "--out", str(bundle / "got.npy")],
                          capture_output=True, text=True)  # -I: the bundle and the host's numpy, no sparsefx
    row["isolated_run"] = done.returncode == 0
    if done.returncode:
        lines = done.stderr.strip().splitlines()
        row["isolated_error"] = f"exit code {done.returncode}: " + next(
            (line for line in lines if "Segfault" in line or "Error" in line), (lines or [""])[-1])
    else:
        row["isolated_rel_l2"] = output_error(want, torch.from_numpy(np.load(bundle / "got.npy"))).relative_l2
    affinity = os.sched_getaffinity(0)
    module = _bundle_module(bundle)
    compiled = module.Model()
    configure = compiled.ffi.get_global_func("runtime.config_threadpool")
    configure(SHARE_ALL_CORES, max(threads), [str(c) for c in _allowed_cpus()])
    # own kernels load their input with aligned vector loads: a numpy array (16-byte aligned) passed through
    # DLPack as is crashed them; PyTorch allocates on 64-byte boundaries, as TVM does
    x = torch.from_numpy(compiled.random_inputs()[0]).clone()
    row["rel_l2"] = output_error(want, torch.from_numpy(compiled.run([x.numpy()])[0])).relative_l2
    row["correct"] = row["rel_l2"] < TOLERANCE
    log.write_text(json.dumps(row))
    if os.sched_getaffinity(0) != affinity:  # a pinned main thread would pin the peers' threads started after
        os.sched_setaffinity(0, affinity)
        row["affinity_restored"] = True
    inputs = (x,)
    vm_main, from_dlpack = compiled.vm["main"], compiled.ffi.from_dlpack
    sparsefx_call = lambda *xs: vm_main(*[from_dlpack(t) for t in xs])  # noqa: E731

    model = _peer_model(folder, inputs)
    row["runs"], onnx_path, workdir = [], None, Path(tempfile.mkdtemp(prefix="cpu-device-"))
    for count in threads:
        started = time.time()
        entry: dict = {"threads": count, "errors": {}, "build_s": {}}
        torch.set_num_threads(count)
        configure(SHARE_ALL_CORES, count, [str(c) for c in _allowed_cpus()])
        torch._dynamo.reset()  # inductor bakes the thread count into its kernels
        peers = Peers(model, inputs, count, workdir)
        peers.onnx_path = onnx_path  # one ONNX export per model
        runners = {"sparsefx": sparsefx_call}
        for name in PEERS:
            try:
                runner = peers.build(name)
                runner(*inputs)
                runners[name], entry["build_s"][name] = runner, round(runner.compile_s, 2)
            except Exception as error:  # a runtime that fails is its cell, the rest go on
                entry["errors"][name] = f"{type(error).__name__}: {str(error)[:300]}"
        onnx_path = peers.onnx_path
        entry["export_s"] = round(peers.export_s, 2)
        try:
            latency = measure_latencies(runners, inputs, repeat=rounds * CALLS_PER_ROUND, rounds=rounds)
            entry["ms"] = {k: round(v, 4) for k, v in latency.items()}
        except Exception as error:
            entry["errors"]["timing"] = f"{type(error).__name__}: {str(error)[:300]}"
        entry["seconds"] = round(time.time() - started, 1)
        row["runs"].append(entry)
        log.write_text(json.dumps(row))
        print(json.dumps(entry), file=sys.stderr, flush=True)
        if time.time() + entry["seconds"] > until:  # the next count would likely overrun the budget
            row["skipped_threads"] = threads[len(row["runs"]):]
            break
    shutil.rmtree(workdir, ignore_errors=True)
    log.write_text(json.dumps(row))
    return row


def run(kit: Path, out: Path, threads: list[int], rounds: int, budget: float, level: str | None = None,
        timeout: float = 90.0, limit: float = 145.0) -> int:
    """Each model in a child process, given its share of `budget` for thread counts after the first and
    `timeout` seconds past that share, and never past `limit` seconds from the start, before it is
    stopped (its row as far as it got is kept)."""
    started = time.time()
    out.mkdir(parents=True, exist_ok=True)
    report = {"host": host_facts(), "load_before": os.getloadavg(), "threads": threads, "rounds": rounds, "models": []}
    level = report["level"] = level or report["host"]["level"]
    folders = sorted(p for p in (kit / "models").iterdir() if p.is_dir())
    for i, folder in enumerate(folders):
        if level is None:
            report["models"].append({"model": folder.name, "error": "the CPU has neither AVX-512 nor AVX2 (flags)"})
            continue
        until = started + budget * (i + 1) / len(folders)
        log = out / f".{folder.name}.partial.json"
        log.unlink(missing_ok=True)
        command = [sys.executable, __file__, "run-one", str(folder), "--kit", str(kit), "--level", level,
                   "--threads", ",".join(map(str, threads)), "--rounds", str(rounds), "--until", str(until),
                   "--log", str(log)]
        try:
            stop = min(until + timeout, started + limit)  # a hung model must not cost the others or the report
            done = subprocess.run(command, capture_output=True, text=True, timeout=max(stop - time.time(), 1.0))
            print(done.stderr[-3000:], file=sys.stderr)
            error = None if done.returncode == 0 else done.stderr.strip().splitlines()[-3:]
        except subprocess.TimeoutExpired:
            error = f"timed out after {round(time.time() - started)} s of the run"
        row = json.loads(log.read_text()) if log.exists() else {"model": folder.name, "level": level}
        log.unlink(missing_ok=True)
        if error:
            row["error"] = error
        report["models"].append(row)
    report["load_after"] = os.getloadavg()
    report["seconds"] = round(time.time() - started, 1)
    (out / "cpu_device.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "cpu_device.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if all(m.get("correct") for m in report["models"]) else 2


def markdown(report: dict) -> str:
    host = report["host"]
    runtimes = ("sparsefx", *PEERS)
    kernels = next((m["kernels"] for m in report["models"] if "kernels" in m), None)
    lines = [f"# sparsefx runtime-only bundles on {host['cpu']} ({host['usable_cores']} cores, bundles for {report['level']})", "",
             f"{host['date']}; Python {host['python']}, PyTorch {host['torch']}, ONNX Runtime {host['onnxruntime']}; "
             f"load average {report['load_before'][0]:.2f} before, {report['load_after'][0]:.2f} after; "
             f"{report['seconds']} s.", "",
             "fp32, batch 1. Median ms over alternating rounds (every runtime timed in turn each round). sparsefx: the "
             f"bundle compiled elsewhere for the x86-64 level the host allows, no PyTorch kernels, convs on "
             f"{'sparsefx kernels where they apply' if kernels == 'own' else 'TIR default schedules'}; peers as runtimes.py "
             "builds them, on the same architecture with random weights. `vs best peer`: sparsefx ms over the fastest "
             "peer (<= 1.00: sparsefx is fastest). Error: relative L2 of the bundle against eager fp32 (same weights).", "",
             "| model | threads | " + " | ".join(runtimes) + " | vs best peer | bundle rel err | isolated run.py |",
             "|---|---|" + "---|" * len(runtimes) + "---|---|---|"]
    for m in report["models"]:
        error = f"{m['rel_l2']:.1e}" + ("" if m["correct"] else " WRONG") if "rel_l2" in m else "-"
        error += " | " + ("ok" if m.get("isolated_run") else str(m.get("isolated_error", "-"))[:60])
        if not m.get("runs"):
            lines.append(f"| {m['model']} | failed: {m.get('error')} |" + " |" * len(runtimes) + f" | {error} |")
            continue
        for entry in m["runs"]:
            ms, errors = entry.get("ms", {}), entry["errors"]
            cells = [f"{ms[r]:.3f}" if r in ms else ("failed" if r in errors else "-") for r in runtimes]
            peers = [ms[r] for r in PEERS if r in ms]
            versus = f"{ms['sparsefx'] / min(peers):.2f}" if "sparsefx" in ms and peers else "-"
            lines.append(f"| {m['model']} | {entry['threads']} | " + " | ".join(cells) + f" | {versus} | {error} |")
    failures = [f"- {m['model']}: {m['error']}" for m in report["models"] if m.get("runs") and "error" in m]
    failures += [f"- {m['model']} {k} at {e['threads']} threads: {v[:200]}" for m in report["models"]
                 for e in m.get("runs", []) for k, v in e["errors"].items()]
    failures += [f"- {m['model']}: thread counts {m['skipped_threads']} skipped (time budget)" for m in report["models"]
                 if m.get("skipped_threads")]
    if failures:
        lines += ["", "Failures and omissions:", "", *failures]
    return "\n".join(lines) + "\n"


def parse_threads(text: str) -> list[int]:
    cores = len(_allowed_cpus())
    return list(dict.fromkeys(cores if t == "all" else int(t) for t in text.split(",")))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="compile the kit (needs TVM)")
    b.add_argument("--kit", type=Path, default=ROOT / "cpu_kit")
    b.add_argument("--python", default="3.12", help="comma-separated Python versions the kit runs on")
    b.add_argument("--kernels", choices=("own", "tir"), default="own",
                   help="own: sparsefx's conv kernels where they apply; tir: compile(dispatch=False), TIR's defaults")
    r = sub.add_parser("run", help="check and time the kit on this host's CPU (needs torch, onnxruntime)")
    r.add_argument("--kit", type=Path, default=ROOT / "cpu_kit")
    r.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    r.add_argument("--threads", default="all,1", help="thread counts in order; 'all' is every usable core")
    r.add_argument("--rounds", type=int, default=15)
    r.add_argument("--budget", type=float, default=130.0, help="seconds; later thread counts are dropped past it")
    r.add_argument("--timeout", type=float, default=90.0, help="seconds a model may run past its share of the budget")
    r.add_argument("--limit", type=float, default=145.0, help="seconds from the start after which a model is stopped")
    r.add_argument("--level", choices=LEVELS, help="the bundles' x86-64 level (default: the widest the CPU has)")
    one = sub.add_parser("run-one")
    one.add_argument("folder", type=Path)
    one.add_argument("--kit", type=Path, required=True)
    one.add_argument("--level", required=True)
    one.add_argument("--threads", required=True)
    one.add_argument("--rounds", type=int, default=7)
    one.add_argument("--until", type=float, required=True)
    one.add_argument("--log", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "build":
        build(args.kit, args.python.split(","), args.kernels)
        return 0
    if args.command == "run-one":
        row = run_one(args.folder, args.kit, args.level, [int(t) for t in args.threads.split(",")], args.rounds,
                      args.until, args.log)
        print(json.dumps(row))
        return 0
    return run(args.kit, args.out, parse_threads(args.threads), args.rounds, args.budget, args.level, args.timeout,
               args.limit)


if __name__ == "__main__":
    sys.exit(main())
