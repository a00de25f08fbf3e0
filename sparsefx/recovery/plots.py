"""PNG plots of pruning results: the accuracy / sparsity / latency trade-off and per-class drops."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

from sparsefx.recovery.evaluate import Evaluation  # noqa: E402


def pareto_front(points: Sequence[dict]) -> list[dict]:
    """Points no other point beats on both latency (lower) and accuracy (higher), fastest first."""
    front, best = [], -1.0
    for p in sorted(points, key=lambda p: (p["latency_ms"], -p["accuracy"])):
        if p["accuracy"] > best:
            front.append(p)
            best = p["accuracy"]
    return front


def plot_tradeoff(points: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """Two panels: accuracy vs fraction of weights kept, and accuracy vs measured latency with
    the Pareto front. Each point needs accuracy, density, latency_ms and label."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    labels = sorted({p["label"] for p in points})
    colors = {label: plt.cm.tab10(i % 10) for i, label in enumerate(labels)}
    for label in labels:
        mine = [p for p in points if p["label"] == label]
        kw = {"color": colors[label], "label": label, "s": 28}
        left.scatter([p["density"] for p in mine], [100 * p["accuracy"] for p in mine], **kw)
        right.scatter([p["latency_ms"] for p in mine], [100 * p["accuracy"] for p in mine], **kw)
    front = pareto_front(points)
    right.step([p["latency_ms"] for p in front], [100 * p["accuracy"] for p in front], where="post",
               color="black", lw=1, label="Pareto front")
    left.set_xscale("log")
    left.set(xlabel="fraction of weights kept (log)", ylabel="test accuracy (%)")
    right.set(xlabel="eager CPU latency, median (ms)", ylabel="test accuracy (%)")
    right.legend(fontsize=7, loc="lower right")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_class_drops(evaluation: Evaluation, path: str | Path, title: str = "") -> Path:
    """Horizontal bars of each class's accuracy drop against the reference, largest on top."""
    drops = evaluation.drops()
    fig, ax = plt.subplots(figsize=(6, 0.35 * max(len(drops), 4) + 1))
    values = [100 * c.drop for c in reversed(drops)]
    ax.barh([c.name for c in reversed(drops)], values, color=["tab:red" if v > 0 else "tab:green" for v in values])
    ax.axvline(0, color="black", lw=0.8)
    ax.set(xlabel="accuracy drop vs reference (points)", title=title)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
