"""Fashion-MNIST calibration: train small models, prune them with every schedule and granularity,
recover with distillation, and report accuracy (overall, worst class, corrupted), size, MACs and
measured eager CPU latency (dense measured in the same run).

    python benchmarks/fashion_mnist.py [--quick] [--out results/fashion_mnist]

Writes results.json, results.md and PNG plots under --out. Needs `dataset-fashion-mnist` (apt).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import sparsefx
from sparsefx import Gradual, GradualPruner, Iterative, OneShot, Sparsity, finetune
from sparsefx.backends.eager import measure_latency
from sparsefx.recovery.data import fashion_mnist
from sparsefx.recovery.evaluate import evaluate
from sparsefx.recovery.plots import plot_class_drops, plot_tradeoff
from sparsefx.recovery.zoo import ZOO
from sparsefx.sparse.masks import allocate, maskable_layers, remove_masks, weight_density

LATENCY_BATCH = 256  # batched inference: at batch 1 these tiny models measure Python overhead, not compute


def lenet300_plans(model: torch.nn.Module, kept: float) -> dict[str, dict[str, Sparsity]]:
    """Per-layer plans for a total kept fraction, from `masks.allocate`'s ERK rule: the 784-input
    first layer (mostly redundant pixels) takes most of the sparsity, the 10-way output layer the
    least. At 2% kept, measured better: the output layer pinned at 40% and power 1.7, which
    moves budget from the first layer (1.2%) to the 300->100 one (7%); N:M picks each M (≤ 128)."""
    options = {0.05: {"power": 1.0}, 0.02: {"power": 1.7, "fixed": {"fc3": 0.4}}}[kept]
    return {"unstructured": allocate(model, kept, "unstructured", **options),
            "block1x4": allocate(model, kept, "block", (1, 4), **options),
            "nm": allocate(model, kept, "nm", **options)}


def schedules(steps_per_epoch: int, epochs: int, gradual_steps: int) -> dict[str, object]:
    """Equal fine-tuning budgets: one-shot prunes at step 0; iterative in 3 rounds over the first
    half; gradual (cubic) over the first half, so every schedule gets a recovery tail."""
    total = steps_per_epoch * epochs
    return {"one-shot": OneShot(),
            "iterative": Iterative(steps=3, every=max(1, total // 6)),
            "gradual": Gradual(steps=gradual_steps, every=max(1, total // (2 * gradual_steps)))}


def recipes(cfg: dict, steps_per_epoch: int, level: str, method: str,
            quick: bool) -> list[tuple[str, object, int, float]]:
    """(name, schedule, epochs, distillation alpha) for one level: every schedule on the same budget,
    plus, where the config asks, a longer gradual run (at 2% kept the sparse model needs the
    epochs). At such a level the short schedules run only for `long["short"]` methods: they
    show the schedules' order, which the other granularities repeat at the 5% level."""
    epochs, alpha, long = cfg["finetune_epochs"], cfg.get("alpha", 0.5), cfg.get("long")
    at_long = long is not None and level in long["levels"]
    runs = [(name, schedule, epochs, alpha)
            for name, schedule in schedules(steps_per_epoch, epochs, cfg["gradual_steps"]).items()
            if not (quick and name == "iterative") and (not at_long or method in long["short"])]
    if at_long:
        schedule = schedules(steps_per_epoch, long["epochs"], long["gradual_steps"])["gradual"]
        runs.append((f"gradual {long['epochs']}ep", schedule, long["epochs"], alpha))
    return runs


def channel_ratio_for(model: torch.nn.Module, x: torch.Tensor, macs_fraction: float) -> float:
    """Smallest channel ratio (in steps of 0.025) whose pruned model has at most that share of MACs."""
    dense = sparsefx.count_macs(model, x)
    for step in range(1, 40):
        ratio = step * 0.025
        if sparsefx.count_macs(sparsefx.prune(model, x, ratio=ratio), x) <= macs_fraction * dense:
            return ratio
    raise RuntimeError(f"no channel ratio reaches {macs_fraction:.0%} of the MACs")


def effective_macs(model: torch.nn.Module, x: torch.Tensor) -> int:
    """MACs per image if zero weights were skipped: each layer's MACs times its weight density."""
    total = 0
    for node in sparsefx.trace(model, x).graph.nodes:
        macs = node.meta.get("sfx_macs", 0)
        if node.op == "call_module" and hasattr(mod := model.get_submodule(node.target), "weight"):
            macs *= float((mod.weight != 0).float().mean())
        total += macs
    return round(total / len(x))


def weights(model: torch.nn.Module) -> int:
    return sum(model.get_submodule(name).weight.numel() for name in maskable_layers(model))


def latency(model: torch.nn.Module, xb: torch.Tensor) -> float:
    return measure_latency(model, (xb,), warmup=3, repeat=15, min_time_s=0.3)["median_ms"]


def measure(model: torch.nn.Module, dense: torch.nn.Module | None, data, x1: torch.Tensor,
            xb: torch.Tensor) -> tuple[dict, sparsefx.Evaluation]:
    result = evaluate(model, data.test, reference=dense, class_names=data.class_names)
    reference = dense if dense is not None else model
    # Dense is timed again next to every pruned model: the CPU is shared, so a speedup is only
    # meaningful between measurements taken moments apart.
    record = {"accuracy": result.accuracy, "params": sparsefx.count_params(model),
              "density": weight_density(model) * weights(model) / weights(reference),
              "macs": sparsefx.count_macs(model, x1), "effective_macs": effective_macs(model, x1),
              "latency_ms": latency(model, xb), "dense_latency_ms": latency(reference, xb)}
    for kind in ("noise", "blur", "contrast"):
        corrupted = result.corrupted(kind)
        record[f"{kind}_accuracy"] = corrupted.accuracy
        record[f"{kind}_dense_accuracy"] = corrupted.reference_accuracy
    worst = result.worst_drop
    if worst is not None:
        record["worst_class"], record["worst_class_drop"] = worst.name, worst.drop
    return record, result


def run_model(name: str, cfg: dict, data, out: Path, quick: bool) -> list[dict]:
    torch.manual_seed(0)
    x1, xb = data.test.dataset.tensors[0][:1], data.test.dataset.tensors[0][:LATENCY_BATCH]
    dense = ZOO[name]()
    started = time.perf_counter()
    history = finetune(dense, data.train, epochs=cfg["train_epochs"], lr=cfg["train_lr"], progress=False)
    dense_record, _ = measure(dense, None, data, x1, xb)
    dense_record |= {"model": name, "method": "dense", "schedule": "-", "level": "dense",
                     "train_s": round(history.seconds, 1)}
    print(f"[{name}] dense {100 * dense_record['accuracy']:.2f}% in {time.perf_counter() - started:.0f}s", flush=True)
    records, worst_eval = [dense_record], None
    for level, method, target in cfg["runs"](dense, x1):
        for sched_name, schedule, epochs, alpha in recipes(cfg, len(data.train), level, method, quick):
            model = copy.deepcopy(dense)
            if method == "channel":
                pruner = GradualPruner(model, schedule, channels=target, example_inputs=x1)
            else:
                pruner = GradualPruner(model, schedule, masks=target)
            history = finetune(model, data.train, epochs=epochs, lr=cfg["finetune_lr"], distill_from=dense,
                               alpha=alpha, pruner=pruner, progress=False)
            model = remove_masks(history.model)
            record, result = measure(model, dense, data, x1, xb)
            record |= {"model": name, "method": method, "schedule": sched_name, "level": level,
                       "finetune_epochs": epochs, "alpha": alpha, "finetune_s": round(history.seconds, 1)}
            records.append(record)
            if worst_eval is None or record["density"] <= worst_eval[0]:
                worst_eval = (record["density"], result, f"{name} {method} {sched_name} {level}")
            print(f"[{name}] {method:12s} {sched_name:12s} {level:>9s}: {100 * record['accuracy']:.2f}% "
                  f"kept {record['density']:.3f} macs {record['macs'] / dense_record['macs']:.2f} "
                  f"latency x{record['dense_latency_ms'] / record['latency_ms']:.2f} ({history.seconds:.0f}s)",
                  flush=True)
    points = [{**r, "label": f"{r['method']} {r['schedule']}".replace(" -", "")} for r in records]
    plot_tradeoff(points, out / f"{name}_tradeoff.png", title=f"{name} on Fashion-MNIST")
    if worst_eval is not None:
        plot_class_drops(worst_eval[1], out / f"{name}_class_drops.png", title=f"per-class drop: {worst_eval[2]}")
    return records


def configs(quick: bool) -> dict[str, dict]:
    def lenet300_runs(dense, x):
        levels = [0.05] if quick else [0.05, 0.02]
        methods = ["block1x4"] if quick else ["unstructured", "block1x4", "nm"]
        return [(f"{kept:.0%} kept", m, lenet300_plans(dense, kept)[m]) for kept in levels for m in methods]

    def channel_runs(fractions):
        def runs(dense, x):
            return [(f"{f:.0%} MACs", "channel", channel_ratio_for(dense, x, f)) for f in fractions]
        return runs

    scale = 0.5 if quick else 1.0
    # LeNet-300-100 fine-tunes at twice the others' rate and leans on the labels more than on the
    # teacher (alpha 0.2): both measured better at 2% and 5% kept; the dense teacher's soft
    # targets on the training set carry its overfitting (94% train vs 89% test accuracy).
    return {
        "lenet300": {"train_epochs": max(2, round(10 * scale)), "train_lr": 1e-3, "finetune_epochs": max(2, round(8 * scale)),
                     "finetune_lr": 4e-3, "alpha": 0.2, "gradual_steps": 20, "runs": lenet300_runs,
                     "long": {"levels": ["2% kept"], "epochs": 30, "gradual_steps": 60, "short": ("block1x4",)}},
        "lenet5": {"train_epochs": max(2, round(8 * scale)), "train_lr": 1e-3, "finetune_epochs": max(1, round(4 * scale)),
                   "finetune_lr": 2e-3, "gradual_steps": 10, "runs": channel_runs([0.5] if quick else [0.5, 0.35])},
        "resnet": {"train_epochs": max(1, round(5 * scale)), "train_lr": 2e-3, "finetune_epochs": max(1, round(3 * scale)),
                   "finetune_lr": 1e-3, "gradual_steps": 10, "runs": channel_runs([0.5] if quick else [0.5, 0.3])},
    }


def markdown(records: list[dict]) -> str:
    dense = {r["model"]: r for r in records if r["method"] == "dense"}
    lines = ["| model | method | schedule | level | accuracy % | Δ points | worst class (Δ) | noise / blur / contrast % "
             "| kept weights | params | MACs (eff.) | latency ms (b=256) | speedup vs dense |",
             "|---|---|---|---|---:|---:|---|---|---:|---:|---:|---:|---:|"]
    for r in records:
        d = dense[r["model"]]
        worst = f"{r['worst_class']} ({-100 * r['worst_class_drop']:+.1f})" if "worst_class" in r else ""
        corrupted = " / ".join(f"{100 * r[f'{k}_accuracy']:.1f}" for k in ("noise", "blur", "contrast"))
        lines.append(f"| {r['model']} | {r['method']} | {r['schedule']} | {r['level']} | {100 * r['accuracy']:.2f} "
                     f"| {100 * (r['accuracy'] - d['accuracy']):+.2f} | {worst} | {corrupted} | {r['density']:.3f} "
                     f"| {r['params']} | {r['macs'] / d['macs']:.2f} (eff. {r['effective_macs'] / d['macs']:.2f}) "
                     f"| {r['latency_ms']:.2f} | {r['dense_latency_ms'] / r['latency_ms']:.2f}x |")
    return "\n".join(lines)


def goals(records: list[dict]) -> str:
    """Each goal: the best run that qualifies, and its gap to the dense model."""
    dense = {r["model"]: r for r in records if r["method"] == "dense"}

    def best(model: str, ok) -> str:
        runs = [r for r in records if r["model"] == model and r["method"] != "dense" and ok(r)]
        if not runs:
            return "not run"
        r = max(runs, key=lambda r: r["accuracy"])
        drop = 100 * (dense[model]["accuracy"] - r["accuracy"])
        verdict = "MET" if drop <= 1.0 else f"MISSED by {drop - 1.0:.2f} points"
        return (f"{verdict}: {r['method']} {r['schedule']} {r['level']}, {100 * r['accuracy']:.2f}% vs dense "
                f"{100 * dense[model]['accuracy']:.2f}% (drop {drop:.2f}), kept {r['density']:.3f}, "
                f"MACs {r['macs'] / dense[model]['macs']:.2f}, speedup {r['dense_latency_ms'] / r['latency_ms']:.2f}x")

    structured = lambda limit: lambda r: r["method"] in ("block1x4", "nm") and r["density"] <= limit * 1.05
    half_macs = lambda r: r["method"] == "channel" and r["macs"] <= 0.5 * dense[r["model"]]["macs"]
    lines = [f"- LeNet-300-100, ≤5% weights kept (block/N:M): {best('lenet300', structured(0.05))}",
             f"- LeNet-300-100, ≤2% weights kept (any pattern): "
             f"{best('lenet300', lambda r: r['density'] <= 0.02 * 1.05)}",
             f"- LeNet-300-100, ≤2% weights kept, block/N:M only: {best('lenet300', structured(0.02))}",
             f"- LeNet-5, ≤50% MACs by channel removal: {best('lenet5', half_macs)}",
             f"- small ResNet, ≤50% MACs by channel removal: {best('resnet', half_macs)}"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fashion_mnist"))
    parser.add_argument("--quick", action="store_true", help="a reduced run (subset, fewer epochs and levels)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one keeps a shared CPU fair)")
    parser.add_argument("--models", default="lenet300,lenet5,resnet")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    data = fashion_mnist(batch_size=128, train_limit=12000 if args.quick else None)
    started, records = time.perf_counter(), []
    cfgs = configs(args.quick)
    for name in args.models.split(","):
        records += run_model(name, cfgs[name], data, args.out, args.quick)
        (args.out / "results.json").write_text(json.dumps(records, indent=1))
    report = (f"# Fashion-MNIST pruning and recovery{' (--quick)' if args.quick else ''}\n\n"
              f"torch {torch.__version__}, {args.threads} thread(s), {time.perf_counter() - started:.0f}s in all; "
              f"latency: eager CPU median at batch {LATENCY_BATCH}; corrupted sets: noise σ=0.5, blur σ=1 px, "
              f"30% contrast.\n\n## Goals\n\n{goals(records)}\n\n## All runs\n\n{markdown(records)}\n")
    (args.out / "results.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
