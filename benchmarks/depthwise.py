"""The depthwise TIR kernel (`backends/tvm/depthwise.py`) against PyTorch's, per layer and end to end.

Per layer: each depthwise conv of the model as the dispatch timed it (fastest ms on the TIR kernel and
on PyTorch's plain or prepacked conv, from the compiled model's manifest). End to end: the model
compiled with the measured dispatch, and compiled again with every depthwise decision sent back to
PyTorch, timed in alternating rounds, dense and 50% of channels pruned. Writes depthwise.{json,md}.

    .venv/bin/python benchmarks/depthwise.py --threads 1
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from common import RunRecord

import sparsefx
from sparsefx.backends.eager import measure_latencies
from sparsefx.backends.tvm import pipeline
from sparsefx.capture.models import load_model


def _compile(model: torch.nn.Module, inputs: tuple, use_kernel: bool) -> object:
    dispatch = pipeline.dispatch
    if not use_kernel:  # the same measured decisions, with depthwise convs back on PyTorch
        pipeline.dispatch = lambda decisions: dispatch(
            {k: {**d, "impl": "torch"} if d["impl"] == "depthwise" else d for k, d in decisions.items()})
    try:
        return sparsefx.compile(model, inputs, verbose=False, threads=torch.get_num_threads())
    finally:
        pipeline.dispatch = dispatch


def bench(name: str, batch: int, repeat: int) -> dict:
    model, inputs = load_model(f"torchvision:{name}", batch_size=batch)
    row: dict = {"model": name, "batch": batch, "layers": [], "latency_ms": {}}
    timed = {}
    for label, source in (("dense", model), ("pruned", sparsefx.prune(model, inputs, ratio=0.5))):
        compiled = _compile(source, inputs, use_kernel=True)
        row["layers"] += [{"variant": label, "workload": key, "tir_kernel_ms": d["depthwise_ms"],
                           "torch_ms": d["torch_ms"], "impl": d["impl"]}
                          for key, d in compiled.manifest["dispatch"].items() if "depthwise_ms" in d]
        timed[f"{label} with kernel"] = compiled
        timed[f"{label} on torch"] = _compile(source, inputs, use_kernel=False)
    row["latency_ms"] = measure_latencies(timed, inputs, repeat=repeat)
    return row


def markdown(rows: list[dict], threads: int) -> str:
    lines = [f"# Depthwise TIR kernel vs PyTorch ({threads} thread(s); median ms, alternating rounds)", "",
             "| model | batch | variant | depthwise on PyTorch | with the kernel where it won | speedup | "
             "layers on the kernel | layer speedups (torch ms / kernel ms) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lat = r["latency_ms"]
        for variant in ("dense", "pruned"):
            layers = [x for x in r["layers"] if x["variant"] == variant]
            won = sum(x["impl"] == "depthwise" for x in layers)
            ratios = sorted(x["torch_ms"] / x["tir_kernel_ms"] for x in layers)
            spread = f"{ratios[0]:.2f}-{ratios[-1]:.2f}x" if ratios else "-"
            lines.append(f"| {r['model']} | {r['batch']} | {variant} | {lat[f'{variant} on torch']:.2f} | "
                         f"{lat[f'{variant} with kernel']:.2f} | "
                         f"{lat[f'{variant} on torch'] / lat[f'{variant} with kernel']:.2f}x | {won}/{len(layers)} | "
                         f"{spread} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mobilenet_v2")
    parser.add_argument("--batches", default="1")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["TVM_NUM_THREADS"] = str(args.threads)
    record = RunRecord(sys.argv)
    rows = []
    for name in args.models.split(","):
        for batch in map(int, args.batches.split(",")):
            print(f"[depthwise] {name} batch {batch}", file=sys.stderr, flush=True)
            rows.append(bench(name, batch, args.repeat))
    threads = args.threads or torch.get_num_threads()
    args.out.mkdir(parents=True, exist_ok=True)
    record.write_report(args.out / "depthwise.json", {"threads": threads, "rows": rows})
    (args.out / "depthwise.md").write_text(markdown(rows, threads))
    print(markdown(rows, threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
