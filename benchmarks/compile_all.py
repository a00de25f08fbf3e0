"""Does every torchvision classifier compile with TVM for the CPU, dense and pruned, and match eager?

Per model (batch 1, 224x224, 299x299 for Inception-v3): the dense model and the model pruned at
ratio 0.5 (0.3 when 0.5 fails) are compiled for the host CPU with measured dispatch and compared
with torch eager (max |diff| / max |eager|; ok at <= 1e-4). Weight matrices torchvision starts at
zero (ViT heads) get small random values first, so no comparison is 0 against 0. Each model runs in its own process
(a native crash or a memory blow-up costs one row, not the run), smallest models first, and the
JSON is rewritten after each, so a rerun resumes where the last one stopped.

    nice -n 10 python benchmarks/compile_all.py                     # all 80 (hours on 2 cores)
    python benchmarks/compile_all.py --models resnet18,swin_t --retry-failed
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

TOLERANCE = 1e-4
RATIOS = (0.5, 0.3)


def all_models() -> list[str]:
    """Every torchvision classifier, fewest parameters first (weights metadata, no download)."""
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    return sorted(names, key=lambda n: torchvision.models.get_model_weights(n).DEFAULT.meta["num_params"])


def compile_one(source: object, inputs: tuple) -> dict:
    """Compile, run and compare one model; any failure becomes the row's reason."""
    import torch

    import sparsefx
    from sparsefx.errors import one_line

    row: dict = {}
    try:
        started = time.perf_counter()
        compiled = sparsefx.compile(source, inputs, target="cpu", verbose=False)
        row["compile_s"] = round(time.perf_counter() - started, 1)
        row["route"] = compiled.manifest["import_route"]
        dispatch = compiled.manifest["dispatch"].values()
        row["torch_kernels"] = f"{sum(d['impl'] == 'torch' for d in dispatch)}/{len(dispatch)}"
        with torch.no_grad():
            expected, actual = source(*inputs), compiled(*inputs)
        expected = torch.utils._pytree.tree_leaves(expected)[0]
        actual = actual if isinstance(actual, torch.Tensor) else actual[0]
        row["max_rel_err"] = float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12))
        row["ok"] = row["max_rel_err"] <= TOLERANCE
        if not row["ok"]:
            row["reason"] = f"max relative error {row['max_rel_err']:.1e} > {TOLERANCE:.0e}"
    except Exception as error:  # a row, not the end of the run
        row.update(ok=False, reason=one_line(error))
    gc.collect()
    return row


def run_model(name: str) -> dict:
    import sparsefx
    from sparsefx.capture.models import load_model
    from sparsefx.errors import one_line

    model, inputs = load_model(f"torchvision:{name}")
    row: dict = {"model": name, "input": list(inputs[0].shape)}
    if _make_comparable(model, inputs):
        row["weights"] = "linear biases zeroed: torchvision's init left the output independent of the input"
    row["dense"] = compile_one(model, inputs)
    for ratio in RATIOS:
        try:
            pruned = sparsefx.prune(model, inputs, ratio=ratio)
        except Exception as error:
            row["pruned"] = {"ok": False, "ratio": ratio, "reason": f"prune: {one_line(error)}"}
            continue
        row["pruned"] = {"ratio": ratio, **compile_one(pruned, inputs)}
        break
    return row


def _make_comparable(model: object, inputs: tuple) -> bool:
    """Weights under which the comparison with eager means something. torchvision starts some heads
    at zero (ViT: every output 0), which get small random values; and GoogLeNet's initialisation
    (truncated normal, std 0.01) lets the features all but vanish, so its output is its classifier's
    bias whatever the input (two random inputs: outputs within 6e-14 of each other, at 0.03) and any
    build matched it exactly. Where the output does not depend on the input, the linear layers' biases
    are zeroed: the output is then the features times the weights, which a wrong kernel changes. True
    when that was needed."""
    import torch
    from torch import nn

    def output(xs: tuple) -> torch.Tensor:
        with torch.no_grad():
            return torch.utils._pytree.tree_leaves(model(*xs))[0]

    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2 and not param.any():
                param.normal_(0, 0.02)
    first, second = output(inputs), output(tuple(torch.randn_like(x) for x in inputs))
    if (first - second).abs().max() > 1e-3 * first.abs().max():
        return False
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.zero_()
    return True


def run_isolated(name: str, timeout_s: int) -> dict:
    """One model in a child process; a crash or timeout is recorded as the model's failure."""
    started = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        failure = {"ok": False, "reason": f"timed out after {timeout_s} s"}
        return {"model": name, "dense": failure, "pruned": failure}
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines:
        row = json.loads(lines[-1])
    else:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
        failure = {"ok": False, "reason": f"process died (exit {done.returncode}): {tail}"}
        row = {"model": name, "dense": failure, "pruned": failure}
    row["wall_s"] = round(time.perf_counter() - started, 1)
    return row


def markdown(rows: list[dict], total: int) -> str:
    ok = {kind: sum(r[kind].get("ok", False) for r in rows) for kind in ("dense", "pruned")}
    lines = ["# Compile all torchvision classifiers with TVM (CPU, batch 1, measured dispatch)", "",
             f"{len(rows)}/{total} models run; compiled and within {TOLERANCE:.0e} of eager: "
             f"dense {ok['dense']}/{len(rows)}, pruned {ok['pruned']}/{len(rows)}.", "",
             "| model | input | route | dense s | dense max rel err | pruned ratio | pruned s | pruned max rel err | "
             "failure |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d, p = r["dense"], r["pruned"]
        reasons = "; ".join(f"{k}: {r[k]['reason']}" for k in ("dense", "pruned") if r[k].get("reason"))
        lines.append(f"| {r['model']} | {'x'.join(map(str, r.get('input', [])[2:]))} | "
                     f"{d.get('route', p.get('route', '-'))} | {d.get('compile_s', '-')} | {_err(d)} | "
                     f"{p.get('ratio', '-')} | {p.get('compile_s', '-')} | {_err(p)} | {reasons.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def _err(result: dict) -> str:
    return f"{result['max_rel_err']:.1e}" if "max_rel_err" in result else "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None, help="comma-separated names (default: all 80)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per model, dense and pruned")
    parser.add_argument("--retry-failed", action="store_true", help="run again the models that failed")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child process: one model, JSON row on stdout
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_model(args.one)), flush=True)
        return 0
    names = args.models.split(",") if args.models else all_models()
    path = args.out / "compile_all.json"
    done = {r["model"]: r for r in json.loads(path.read_text())} if path.exists() else {}
    args.out.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        previous = done.get(name)
        if previous and (not args.retry_failed or (previous["dense"]["ok"] and previous["pruned"]["ok"])):
            continue
        print(f"[compile_all] {i + 1}/{len(names)} {name}", file=sys.stderr, flush=True)
        done[name] = run_isolated(name, args.timeout)
        print(f"[compile_all] {name}: dense {done[name]['dense'].get('reason', 'ok')}, "
              f"pruned {done[name]['pruned'].get('reason', 'ok')}", file=sys.stderr, flush=True)
        rows = [done[n] for n in all_models() if n in done]
        path.write_text(json.dumps(rows, indent=1) + "\n")
        (args.out / "compile_all.md").write_text(markdown(rows, len(all_models())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
