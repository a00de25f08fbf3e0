"""Cost model: predicted versus measured latency, per layer and end to end, on this CPU.

For each model and channel ratio (uniform removal, so channel counts fall between the
cost model's grid points and its interpolation is what gets tested):
- per layer: every convolution/matmul kernel of the pruned model, predicted from the
  tables (interpolated on the dense model's grid) versus timed afresh at its exact shape;
- end to end: the planner's predicted latency versus the pruned model compiled with
  `sparsefx.compile` (TVM, measured dispatch) and timed: its fastest of `--repeat` runs, as
  the kernel tables hold fastest runs (the median is recorded too: on a CPU shared with
  other jobs the median measures the neighbours as much as the model). A model's ratios
  take turns, in blocks of back-to-back runs.

    python benchmarks/costmodel.py                      # ResNet-18/50, MobileNetV2, BERT-base
    python benchmarks/costmodel.py --models resnet18 --ratios 0.5 --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import RunRecord

MODELS = ("resnet18", "resnet50", "mobilenet_v2", "hf:bert-base")
RATIOS = (0.0, 0.3, 0.5, 0.7)


def _spec(name: str) -> str:
    return name if ":" in name else f"torchvision:{name}"


def run_model(name: str, ratios: list[float], target: object, repeat: int) -> tuple[list[dict], list[dict]]:
    import sparsefx
    from sparsefx.capture.models import load_model
    from sparsefx.cost.latency import priced_kernels
    from sparsefx.cost.model import MEASURED
    from sparsefx.planning.planner import Planner
    from sparsefx.planning.pricing import cost_model

    model, inputs = load_model(_spec(name))
    cost = cost_model(target)
    planner = Planner(model, inputs, cost=cost)
    search = planner.search
    layers, ends, compiled = [], [], {}
    for ratio in ratios:
        removed = planner.uniform(ratio)
        predicted = planner.evaluate(removed)
        for node in planner.gm.graph.nodes:
            shape = lambda x, r=removed: planner.shrink.shape(x, r)
            kernels = priced_kernels(node, planner.gm, shape, cost.lanes, search.fusion)
            for kernel, ref in zip(kernels, search.refs[node]):  # the planner's dense kernels: the grid
                if kernel.op not in MEASURED:
                    continue
                measured = cost.time_now(kernel)
                layers.append({"model": name, "ratio": ratio, "node": node.name, "kernel": kernel.key,
                               "predicted_ms": cost.latency(kernel, ref), "measured_ms": measured})
        pruned = sparsefx.prune(model, inputs, ratio=ratio) if ratio else model
        compiled[ratio] = sparsefx.compile(pruned, inputs, target=target, verbose=False)
        ends.append({"model": name, "ratio": ratio, "predicted_ms": predicted,
                     "macs_ratio": sparsefx.count_macs(pruned, inputs) / sparsefx.count_macs(model, inputs)})
    times = _run_times(compiled, inputs, repeat)
    for end in ends:
        end["measured_ms"] = float(np.min(times[end["ratio"]]))  # see the module doc
        end["measured_median_ms"] = float(np.median(times[end["ratio"]]))
        print(f"{name} ratio {end['ratio']}: predicted {end['predicted_ms']:.3f} ms, measured {end['measured_ms']:.3f} ms "
              f"({100 * (end['predicted_ms'] / end['measured_ms'] - 1):+.1f}%)", file=sys.stderr, flush=True)
    cost.save()
    return layers, ends


def _run_times(compiled: dict, inputs: tuple, repeat: int, rounds: int = 3) -> dict:
    """ms per run of each compiled model: `rounds` blocks of consecutive runs per model, the
    models taking turns. A shared CPU has slow spells of a minute or more, so each model runs
    at several times; within a block its first two runs re-warm the caches the other models
    took and are not counted (a deployed model runs back to back)."""
    times: dict = {key: [] for key in compiled}
    with torch.inference_mode():
        for _ in range(rounds):
            for key, model in compiled.items():
                for i in range(2 + max(1, repeat // rounds)):
                    start = time.perf_counter()
                    model(*inputs)
                    if i >= 2:
                        times[key].append((time.perf_counter() - start) * 1e3)
    return times


def _errors(rows: list[dict]) -> np.ndarray:
    return np.array([abs(r["predicted_ms"] / r["measured_ms"] - 1) for r in rows])


def write(out: Path, layers: list[dict], ends: list[dict], target: object, record: RunRecord,
          name: str = "costmodel") -> dict:
    out.mkdir(parents=True, exist_ok=True)
    layer_err, end_err = _errors(layers), _errors(ends)
    summary = {
        "target": str(target), "layers": len(layers),
        "per_layer_median_abs_error": float(np.median(layer_err)), "per_layer_p90_abs_error": float(np.percentile(layer_err, 90)),
        "end_to_end_median_abs_error": float(np.median(end_err)), "end_to_end_p90_abs_error": float(np.percentile(end_err, 90)),
        "goals": {"per_layer_median_within_10pct": bool(np.median(layer_err) <= 0.10),
                  "end_to_end_within_15pct": bool(np.max(end_err) <= 0.15)},
    }
    record.write_report(out / f"{name}.json", {"summary": summary, "end_to_end": ends, "layers": layers})
    lines = [f"# Cost model: predicted vs measured latency ({target})", "", record.markdown_line(), "",
             f"Per layer ({len(layers)} conv/matmul kernels): median |error| {100 * summary['per_layer_median_abs_error']:.1f}%, "
             f"90th percentile {100 * summary['per_layer_p90_abs_error']:.1f}% (goal: median within 10%).",
             f"End to end: median |error| {100 * summary['end_to_end_median_abs_error']:.1f}%, "
             f"90th percentile {100 * summary['end_to_end_p90_abs_error']:.1f}%, worst {100 * end_err.max():.1f}%; "
             f"{int((end_err <= 0.15).sum())}/{len(end_err)} within 15% (goal: all within 15%).", "",
             "| model | ratio | MACs kept | predicted ms | measured ms (TVM, fastest) | median ms | error | per-layer median error |",
             "|---|---|---|---|---|---|---|---|"]
    for e in ends:
        mine = [r for r in layers if r["model"] == e["model"] and r["ratio"] == e["ratio"]]
        lines.append(f"| {e['model']} | {e['ratio']} | {e['macs_ratio']:.2f} | {e['predicted_ms']:.3f} | "
                     f"{e['measured_ms']:.3f} | {e['measured_median_ms']:.3f} | {100 * (e['predicted_ms'] / e['measured_ms'] - 1):+.1f}% | "
                     f"{100 * float(np.median(_errors(mine))):.1f}% |")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    _plot(out / f"{name}.png", layers, ends)
    return summary


def _plot(path: Path, layers: list[dict], ends: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for ax, rows, title in ((axes[0], layers, "per layer (conv/matmul kernels)"), (axes[1], ends, "end to end")):
        for model in dict.fromkeys(r["model"] for r in rows):
            mine = [r for r in rows if r["model"] == model]
            ax.scatter([r["measured_ms"] for r in mine], [r["predicted_ms"] for r in mine], s=12, label=model, alpha=0.7)
        lo = min(min(r["measured_ms"], r["predicted_ms"]) for r in rows)
        hi = max(max(r["measured_ms"], r["predicted_ms"]) for r in rows)
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        ax.fill_between([lo, hi], [lo * 0.9, hi * 0.9], [lo * 1.1, hi * 1.1], color="grey", alpha=0.15, label="±10%")
        ax.set(xscale="log", yscale="log", xlabel="measured ms", ylabel="predicted ms", title=title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--ratios", default=",".join(map(str, RATIOS)))
    parser.add_argument("--threads", type=int, default=None, help="CPU cores to use (default: all)")
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--precision", default="fp32", help="what convs and matmuls compute in: fp32 or bf16 "
                        "(the kernels the compiler runs in it are priced and compiled)")
    parser.add_argument("--name", default="costmodel", help="results file stem")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    from sparsefx.target import check_precision, resolve_target, with_precision, with_threads

    target = with_threads(resolve_target("cpu"), args.threads)
    if args.precision != "fp32":
        check_precision(args.precision, target)
        target = with_precision(target, args.precision)
    torch.set_num_threads(target.cores)
    record = RunRecord(sys.argv)
    layers, ends = [], []
    for name in args.models.split(","):
        more_layers, more_ends = run_model(name, [float(r) for r in args.ratios.split(",")], target, args.repeat)
        layers += more_layers
        ends += more_ends
    summary = write(args.out, layers, ends, target, record, args.name)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
