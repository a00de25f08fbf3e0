"""Does every torchvision classifier compile with TVM for the CPU, dense and pruned, and match eager?

Per model (batch 1, 224x224, 299x299 for Inception-v3): the dense model and the model pruned at
ratio 0.5 (0.3 when 0.5 fails) are compiled for the host CPU with measured dispatch and compared
with torch eager by sparsefx.capture.compare: relative L2 error ||tvm - eager|| / ||eager||, ok at
<= 1e-4. Random weights first get batch-norm statistics from random inputs (without that
torchvision's EfficientNets output 1e-14 and GoogLeNet its classifier's bias whatever the input),
and each reference is checked to be O(1) and to depend on the input before it is compared: a
vacuous reference is the row's failure, never a pass. Each model runs in its own process (a native
crash or a memory blow-up costs one row, not the run), smallest models first, and the JSON is
rewritten after each, so a rerun resumes where the last one stopped (rows measured another way are
run again). A build outside the mark is also compared, with eager float32, against the model run in
float64 (`against_float64`): a compiled error within `ROUNDING` times eager's own is float32 rounding.

    nice -n 10 python benchmarks/compile_all.py                     # all 80 (hours on 2 cores)
    python benchmarks/compile_all.py --models resnet18,swin_t --retry-failed
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from common import RunRecord, read_rows

import sparsefx
from sparsefx.capture.compare import (
    TOLERANCE,
    calibrate_norm_statistics,
    check_reference,
    first_tensor,
    output_error,
)
from sparsefx.capture.models import load_model
from sparsefx.errors import one_line

RATIOS = (0.5, 0.3)
ROUNDING = 1.5  # a compiled output this close to float64, relative to eager float32's error, is as accurate
MEASURE = "relative L2 (sparsefx.capture.compare)"  # rows measured otherwise are run again


def all_models() -> list[str]:
    """Every torchvision classifier, fewest parameters first (weights metadata, no download)."""
    names = torchvision.models.list_models(module=torchvision.models)
    return sorted(names, key=lambda n: torchvision.models.get_model_weights(n).DEFAULT.meta["num_params"])


def compile_one(source: torch.nn.Module, inputs: tuple) -> dict:
    """Compile, run and compare one model; any failure, a vacuous reference included, becomes the row's reason."""
    row: dict = {}
    try:
        expected = check_reference(source, inputs)  # before compiling: a vacuous reference fails the row
        started = time.perf_counter()
        compiled = sparsefx.compile(source, inputs, target="cpu", verbose=False)
        row["compile_s"] = round(time.perf_counter() - started, 1)
        row["route"] = compiled.manifest["import_route"]
        dispatch = compiled.manifest["dispatch"].values()
        row["torch_kernels"] = f"{sum(d['impl'] == 'torch' for d in dispatch)}/{len(dispatch)}"
        with torch.no_grad():
            error = output_error(expected, first_tensor(compiled(*inputs)))
        row.update(rel_l2_err=error.relative_l2, cosine=error.cosine, reference_rms=error.reference_rms, ok=error.ok())
        if not row["ok"]:
            row["reason"] = f"{error} > {TOLERANCE:.0e}"
            row["float64"] = against_float64(source, inputs, expected, first_tensor(compiled(*inputs)))
            row["reason"] += (f"; against float64 eager: eager float32 {row['float64']['eager']:.1e}, "
                              f"compiled {row['float64']['compiled']:.1e}")
    except Exception as error:  # a row, not the end of the run
        row.update(ok=False, reason=one_line(error))
    gc.collect()
    return row


def against_float64(source: torch.nn.Module, inputs: tuple, eager: torch.Tensor, compiled: torch.Tensor) -> dict:
    """Relative L2 errors of eager float32 and of the compiled output against the model run in float64:
    where the two are alike, the compiled model is as accurate as eager and the difference between them
    is float32 rounding (ResNet-152: 3.2e-4 and 3.6e-4; ResNet-50: 1.6e-5 and 1.8e-5)."""
    with torch.no_grad():
        exact = first_tensor(copy.deepcopy(source).double()(*(x.double() for x in inputs)))
    return {"eager": output_error(exact, eager).relative_l2, "compiled": output_error(exact, compiled).relative_l2}


def run_model(name: str) -> dict:
    model, inputs = load_model(f"torchvision:{name}")
    row: dict = {"model": name, "input": list(inputs[0].shape), "measure": MEASURE,
                 "norms_calibrated": calibrate_norm_statistics(model, inputs)}
    row["dense"] = compile_one(model, inputs)
    for ratio in RATIOS:
        try:
            pruned = sparsefx.prune(model, inputs, ratio=ratio)
        except Exception as error:
            row["pruned"] = {"ok": False, "ratio": ratio, "reason": f"prune: {one_line(error)}"}
            continue
        # statistics again: the dense model's no longer fit the pruned layers' inputs, and pruned EfficientNet-B0's
        # output reduced to the norms' constant offsets (another input moved it by 4e-4 of its norm)
        calibrate_norm_statistics(pruned, inputs)
        row["pruned"] = {"ratio": ratio, **compile_one(pruned, inputs)}
        break
    return row


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) a live process has used, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_isolated(name: str, timeout_s: int) -> dict:
    """One model in a child process; a crash or timeout is recorded as the model's failure. The limit
    is on the child's CPU seconds, not wall time: a run paused (SIGSTOP) while a timing benchmark
    runs is not cut short (efficientnet_v2_m once 'timed out' after 93 minutes stopped)."""
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen([sys.executable, __file__, "--one", name], stdout=out, stderr=err, text=True)
        while child.poll() is None:
            with contextlib.suppress(OSError):  # the child may exit between poll and the read
                if cpu_seconds(child.pid) > timeout_s:
                    child.kill()
                    child.wait()
                    failure = {"ok": False, "reason": f"took over {timeout_s} s of CPU time"}
                    return {"model": name, "dense": failure, "pruned": failure}
            time.sleep(2)
        out.seek(0)
        err.seek(0)
        done = subprocess.CompletedProcess(child.args, child.returncode, out.read(), err.read())
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines:
        row = json.loads(lines[-1])
    else:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
        failure = {"ok": False, "reason": f"process died (exit {done.returncode}): {tail}"}
        row = {"model": name, "dense": failure, "pruned": failure}
    row["wall_s"] = round(time.perf_counter() - started, 1)
    return row


def markdown(rows: list[dict], total: int, record: RunRecord) -> str:
    ok = {kind: sum(r[kind].get("ok", False) for r in rows) for kind in ("dense", "pruned")}
    lines = ["# Compile all torchvision classifiers with TVM (CPU, batch 1, measured dispatch)", "",
             record.markdown_line(), "",
             f"{len(rows)}/{total} models run; compiled and within {TOLERANCE:.0e} of eager (relative L2 error "
             "||tvm - eager|| / ||eager||, batch-norm statistics calibrated on random inputs, references checked "
             f"to be O(1) and input-dependent): dense {ok['dense']}/{len(rows)}, pruned {ok['pruned']}/{len(rows)}.", "",
             *_rounding_line(rows),
             "| model | input | route | dense s | dense rel L2 err | pruned ratio | pruned s | pruned rel L2 err | "
             "failure |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d, p = r["dense"], r["pruned"]
        reasons = "; ".join(f"{k}: {r[k]['reason']}" for k in ("dense", "pruned") if r[k].get("reason"))
        lines.append(f"| {r['model']} | {'x'.join(map(str, r.get('input', [])[2:]))} | "
                     f"{d.get('route', p.get('route', '-'))} | {d.get('compile_s', '-')} | {_err(d)} | "
                     f"{p.get('ratio', '-')} | {p.get('compile_s', '-')} | {_err(p)} | {reasons.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def _rounding_line(rows: list[dict]) -> list[str]:
    outside = [r[kind] for r in rows for kind in ("dense", "pruned") if not r[kind].get("ok") and "float64" in r[kind]]
    if not outside:
        return []
    rounding = sum(x["float64"]["compiled"] <= ROUNDING * x["float64"]["eager"] for x in outside)
    return [f"Outside {TOLERANCE:.0e}: {len(outside)} builds. Against the model run in float64, {rounding} of them are "
            f"within {ROUNDING}x of eager float32's own error (float32 rounding, growing with depth), "
            f"{len(outside) - rounding} are not.", ""]


def _err(result: dict) -> str:
    return f"{result['rel_l2_err']:.1e}" if "rel_l2_err" in result else "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None, help="comma-separated names (default: all 80)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--timeout", type=int, default=7200,
                        help="CPU seconds per model, dense and pruned (an hour on both cores)")
    parser.add_argument("--retry-failed", action="store_true", help="run again the models that failed")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child process: one model, JSON row on stdout
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_model(args.one)), flush=True)
        return 0
    names = args.models.split(",") if args.models else all_models()
    path = args.out / "compile_all.json"
    record = RunRecord(sys.argv)
    done = {r["model"]: r for r in read_rows(path) if r.get("measure") == MEASURE} if path.exists() else {}
    args.out.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        previous = done.get(name)
        if previous and (not args.retry_failed or (previous["dense"]["ok"] and previous["pruned"]["ok"])):
            continue
        print(f"[compile_all] {i + 1}/{len(names)} {name}", file=sys.stderr, flush=True)
        done[name] = run_isolated(name, args.timeout)
        done[name]["measured"] = {key: record.meta()[key] for key in ("date", "commit", "dirty")}  # rows resume across runs
        print(f"[compile_all] {name}: dense {done[name]['dense'].get('reason', 'ok')}, "
              f"pruned {done[name]['pruned'].get('reason', 'ok')}", file=sys.stderr, flush=True)
        rows = [done[n] for n in all_models() if n in done]
        record.write(path, rows)
        (args.out / "compile_all.md").write_text(markdown(rows, len(all_models()), record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
