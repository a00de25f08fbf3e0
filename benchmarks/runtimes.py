"""sparsefx against the runtimes a user could deploy with instead, side by side in one process.

For each model, batch size and thread count, dense and pruned (`sparsefx.prune(ratio=0.5)`): PyTorch
eager, torch.compile (inductor), ONNX Runtime (CPU EP, all graph optimisations, intra-op threads
set), OpenVINO in fp32 and in its default precision, and sparsefx.compile (`backends/peers.py`).
Every runtime of one (model, batch, threads) is timed in the same alternating rounds (round-robin:
each in turn per round: WARMUP_PER_TURN untimed calls, then the median of CALLS_PER_TURN timed ones;
the median of the rounds' medians), so load from other processes hits them alike, and no runtime is
timed on the call that wakes its threads after another runtime's turn (one call a turn did: at 2
threads ONNX Runtime's and OpenVINO's pruned MobileNetV2 took 3.1 and 3.0 ms so against 1.7 and 1.5
with warm-up calls). Also: build (compile) seconds, the relative L2 error of each runtime's
output against eager fp32 of the same model (`capture.compare`; batch-norm statistics calibrated so
outputs are O(1)), and the pruned model's speedup bounds: by MACs and per op class (`cost.bounds`,
roofline shares at this CPU's measured FLOP/s per byte). A runtime that cannot build a model is a
row with its one-line error. Writes benchmarks/results/<name>.json, .md and .png; the machine's load
is recorded (RunRecord).

    python benchmarks/runtimes.py --quick                   # one small model, batch 1, 1 thread: a check
    python benchmarks/runtimes.py                           # the issue's 7 models, batch 1 and 8, 1 and all cores
    python benchmarks/runtimes.py --models resnet50 --batches 1 --threads 1,2 --rounds 15
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
import tempfile
from pathlib import Path

import matplotlib
import torch
from common import RunRecord

import sparsefx
from sparsefx.backends.eager import measure_latencies
from sparsefx.backends.peers import RUNTIMES, PeerError, Peers, available
from sparsefx.capture.compare import (
    VacuousComparisonError,
    calibrate_norm_statistics,
    check_reference,
    output_error,
)
from sparsefx.capture.models import load_model
from sparsefx.capture.trace import trace
from sparsefx.cost.bounds import pruning_bound
from sparsefx.target import host_cpu, resolve_target

matplotlib.use("Agg")  # files only: no display on servers
import matplotlib.pyplot as plt  # noqa: E402

MODELS = {"resnet18": "torchvision:resnet18", "resnet50": "torchvision:resnet50",
          "mobilenet_v2": "torchvision:mobilenet_v2", "efficientnet_b0": "torchvision:efficientnet_b0",
          "convnext_tiny": "torchvision:convnext_tiny", "vit_b_16": "torchvision:vit_b_16", "bert-base": "hf:bert-base",
          "tiny": "default"}
FULL = "resnet18,resnet50,mobilenet_v2,efficientnet_b0,convnext_tiny,vit_b_16,bert-base"
FP32_PEERS = ("onnxruntime", "openvino-fp32", "torch.compile")  # the fp32 runtimes sparsefx must match
LOG = logging.getLogger("sparsefx.bench")
WARMUP_PER_TURN, CALLS_PER_TURN = 3, 5
OP_CLASS_GOAL = ("mobilenet_v2", "efficientnet_b0")


def prepare(name: str, batch: int, ratio: float, flops_per_byte: float) -> tuple[dict, dict]:
    """The dense and pruned models with inputs, and what the pruning bounds say."""
    model, inputs = load_model(MODELS.get(name, name), batch_size=batch)
    calibrate_norm_statistics(model, inputs)  # random-init outputs would otherwise be near zero
    pruned = sparsefx.prune(model, inputs, ratio=ratio)
    calibrate_norm_statistics(pruned, inputs)
    bound = pruning_bound(trace(model, inputs, "auto"), trace(pruned, inputs, "auto"), flops_per_byte)
    facts = {"macs_bound": round(bound.macs, 3), "op_class_bound": round(bound.per_class, 3),
             "class_ratios": {k: round(v, 3) for k, v in bound.ratios.items()},
             "class_shares": {k: round(v, 3) for k, v in bound.shares.items()}}
    return {"dense": model, "pruned": pruned}, {"inputs": inputs, **facts}


def bench(name: str, batch: int, threads: int, runtimes: list[str], rounds: int, ratio: float,
          flops_per_byte: float) -> list[dict]:
    """One row per (variant, runtime): median ms over alternating rounds, build s, error vs eager."""
    models, facts = prepare(name, batch, ratio, flops_per_byte)
    inputs = facts.pop("inputs")
    base = {"model": name, "batch": batch, "threads": threads, **facts}
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)  # eager and torch.compile run on PyTorch's pool
    rows, runners = [], {}
    try:
        with tempfile.TemporaryDirectory(prefix="sparsefx-runtimes-") as workdir:
            for variant, model in models.items():
                try:
                    reference = check_reference(model, inputs)
                except VacuousComparisonError as error:
                    reference, base[f"reference_{variant}"] = None, str(error)
                peers = Peers(model, inputs, threads, Path(workdir) / variant)
                for runtime in runtimes:
                    row = {**base, "variant": variant, "runtime": runtime}
                    LOG.info(f"{name} batch {batch}, {threads} thread(s), {variant}: building {runtime}")
                    try:
                        runner = peers.build(runtime)
                    except PeerError as error:
                        rows.append({**row, "build_error": str(error)})
                        continue
                    with torch.inference_mode():
                        output = runner(*inputs)
                    row.update(compile_s=round(runner.compile_s, 2), **runner.details)
                    if reference is not None:
                        row["rel_l2_error"] = output_error(reference, output).relative_l2
                    rows.append(row)
                    runners[(variant, runtime)] = runner
            LOG.info(f"{name} batch {batch}, {threads} thread(s): timing {len(runners)} builds in {rounds} rounds")
            latency = measure_latencies({f"{v}/{r}": runner for (v, r), runner in runners.items()}, inputs,
                                        repeat=rounds * CALLS_PER_TURN, rounds=rounds, warmup=WARMUP_PER_TURN)
    finally:
        torch.set_num_threads(saved)
    for row in rows:
        key = f"{row['variant']}/{row['runtime']}"
        if key in latency:
            row["ms"] = round(latency[key], 3)
    return rows


def markdown(rows: list[dict], runtimes: list[str], record: RunRecord) -> str:
    lines = ["# sparsefx against the runtimes users deploy with", "", record.markdown_line(), "",
             f"Median ms over alternating rounds (every runtime of a row timed in turn each round: {WARMUP_PER_TURN} untimed calls, then "
             f"the median of {CALLS_PER_TURN}), dense / pruned "
             "(`sparsefx.prune(ratio=0.5)`). Bounds: the pruned model's speedup limit by MACs and per op class "
             "(1x1/kxk convs and matmuls by MACs, depthwise and element-wise work by channels; `cost/bounds.py`). "
             "`vs best fp32`: sparsefx time over the fastest of ONNX Runtime, OpenVINO fp32 and torch.compile "
             "(<= 1.00 meets the goal). `pruned speedup / bound`: sparsefx dense/pruned over the bound the goal "
             "names (>= 0.8): the op-class bound for MobileNetV2 and EfficientNet-B0, the MACs bound for the rest. "
             "OpenVINO default runs bf16 where the CPU has AMX or AVX512-BF16 (its precision is `precision` in the "
             "JSON). `bf16 vs OpenVINO`: sparsefx-bf16 over OpenVINO's default precision (goal <= 1.10).", "",
             "| model | batch | threads | " + " | ".join(runtimes) +
             " | vs best fp32 dense / pruned | bf16 vs OpenVINO dense / pruned | sparsefx pruned speedup | "
             "MACs / op-class bound | pruned speedup / bound |",
             "|---|---|---|" + "---|" * len(runtimes) + "---|---|---|---|---|"]
    for key in dict.fromkeys((r["model"], r["batch"], r["threads"]) for r in rows):
        group = [r for r in rows if (r["model"], r["batch"], r["threads"]) == key]
        cell = {(r["variant"], r["runtime"]): r.get("ms") for r in group}
        ms = lambda variant, runtime, cell=cell: cell.get((variant, runtime))  # noqa: E731
        cells = []
        for runtime in runtimes:
            dense, pruned = ms("dense", runtime), ms("pruned", runtime)
            cells.append("failed" if dense is None and pruned is None else f"{_fmt(dense)} / {_fmt(pruned)}")
        versus, half = [], []
        for variant in ("dense", "pruned"):
            peers = [ms(variant, p) for p in FP32_PEERS if ms(variant, p)]
            mine = ms(variant, "sparsefx")
            versus.append(f"{mine / min(peers):.2f}" if mine and peers else "-")
            mine, theirs = ms(variant, "sparsefx-bf16"), ms(variant, "openvino")
            half.append(f"{mine / theirs:.2f}" if mine and theirs else "-")
        first = group[0]
        speedup = ms("dense", "sparsefx") / ms("pruned", "sparsefx") if ms("dense", "sparsefx") and ms("pruned", "sparsefx") else None
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + f" | {' / '.join(versus)} | "
                     f"{' / '.join(half)} | {_fmt(speedup, 'x')} | {first['macs_bound']:.2f}x / {first['op_class_bound']:.2f}x | "
                     f"{_fmt(speedup / first[goal_bound(key[0])] if speedup else None)} |")
    lines += ["", "## Build seconds and error against eager fp32", "",
              "Build: torch.compile's first call, session / compiled-model creation (the ONNX export, shared by "
              "ONNX Runtime and OpenVINO, is `export_s` in the JSON), sparsefx.compile. Error: relative L2 of the "
              "first output against eager of the same model, worse of dense and pruned.", "",
              "| model | batch | threads | " + " | ".join(runtimes) + " |", "|---|---|---|" + "---|" * len(runtimes)]
    for key in dict.fromkeys((r["model"], r["batch"], r["threads"]) for r in rows):
        group = [r for r in rows if (r["model"], r["batch"], r["threads"]) == key]
        cells = []
        for runtime in runtimes:
            built = [r for r in group if r["runtime"] == runtime and "compile_s" in r]
            if not built:
                cells.append(next((r["build_error"][:80] for r in group if r["runtime"] == runtime), "-"))
                continue
            errors = [r["rel_l2_error"] for r in built if "rel_l2_error" in r]
            cells.append(" / ".join(f"{r['compile_s']:.1f}" for r in built) + " s" +
                         (f", {max(errors):.0e}" if errors else ""))
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def goal_bound(model: str) -> str:
    """The bound a model's pruned/dense goal is judged against (issue 21): per op class where depthwise
    convs (which prune by channels, not MACs) carry much of the time, by MACs elsewhere."""
    return "op_class_bound" if model in OP_CLASS_GOAL else "macs_bound"


def _fmt(value: float | None, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.2f}{suffix}"


def plot(rows: list[dict], runtimes: list[str], path: Path) -> None:
    """Grouped bars: one group per (model, batch, threads, variant), one bar per runtime, log ms."""
    groups = list(dict.fromkeys((r["model"], r["batch"], r["threads"], r["variant"]) for r in rows))
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(groups)), 5))
    width = 0.8 / len(runtimes)
    for i, runtime in enumerate(runtimes):
        heights = [next((r.get("ms") for r in rows if (r["model"], r["batch"], r["threads"], r["variant"]) == g
                         and r["runtime"] == runtime), None) or 0 for g in groups]
        ax.bar([x + i * width for x in range(len(groups))], heights, width, label=runtime)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(groups))])
    ax.set_xticklabels([f"{m}\nb{b} t{t} {v}" for m, b, t, v in groups], fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("median ms (log)")
    ax.legend(fontsize=8)
    ax.set_title("sparsefx against the runtimes users deploy with (lower is faster)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_threads(text: str) -> list[int]:
    cores = host_cpu().cores
    return list(dict.fromkeys(cores if t == "all" else int(t) for t in text.split(",")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=FULL, help=f"comma-separated: {', '.join(MODELS)} or model specs")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--threads", default="1,all", help="thread counts; 'all' is every core this process may use")
    parser.add_argument("--rounds", type=int, default=15, help="alternating rounds per (model, batch, threads)")
    parser.add_argument("--runtimes", default=",".join(RUNTIMES))
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--quick", action="store_true", help="one small model, batch 1, one thread, 3 rounds")
    parser.add_argument("--name", default="runtimes", help="results file stem (e.g. runtimes-16core on a lent machine)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.batches, args.threads, args.rounds = "tiny", "1", "1", 3
        args.name = f"{args.name}-quick"
    logging.basicConfig(level=logging.INFO, format="[runtimes] %(message)s", stream=sys.stderr)
    runtimes = [r for r in args.runtimes.split(",") if available(r)]
    for missing in set(args.runtimes.split(",")) - set(runtimes):
        LOG.warning(f"{missing} is not installed: skipped (pip install -e '.[dev]')")
    cpu = resolve_target("cpu", measure=True)  # peak FLOP/s and bandwidth set the roofline shares
    flops_per_byte = cpu.peak_gflops / cpu.bandwidth_gbs
    record = RunRecord(sys.argv)
    rows: list[dict] = []
    for name in args.models.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            for threads in parse_threads(args.threads):
                try:
                    rows += bench(name, batch, threads, runtimes, args.rounds, args.ratio, flops_per_byte)
                except Exception as error:  # one model's failure is a row, not the end of the run
                    rows.append({"model": name, "batch": batch, "threads": threads, "variant": "-", "runtime": "-",
                                 "build_error": f"{type(error).__name__}: {str(error)[:200]}"})
                record.write_report(args.out / f"{args.name}.json",
                                    {"flops_per_byte": round(flops_per_byte, 2), "rows": rows})
                (args.out / f"{args.name}.md").write_text(markdown([r for r in rows if r["runtime"] != "-"], runtimes, record))
                gc.collect()
    plot([r for r in rows if "ms" in r], runtimes, args.out / f"{args.name}.png")
    print((args.out / f"{args.name}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
