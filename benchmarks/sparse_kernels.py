"""Sparse TIR kernels against dense: latency vs density and block shape, break-even marked.

Layers: BERT-base linears (768→768, 768→3072, 3072→768) at 1 and 128 tokens, ResNet-50
1×1 convs at batch 1 and 8 (CONV_BATCH_NOTE says why not 128). For each: torch eager dense, dense TVM (`sparsefx.compile`, measured
torch/TIR dispatch on), and every sparse kernel (BSR blocks, N:M) from 50% to 98% sparsity.
All timings are the best of several runs (on a shared CPU the minimum is what the code can
do). Break-even: the highest density (kept fraction) at which a kernel is still at least as
fast as the faster dense baseline. Writes results/sparse_kernels.{json,md,png}.

    nice -n 10 flock /tmp/sparsefx-bench.lock .venv/bin/python benchmarks/sparse_kernels.py
    ... benchmarks/sparse_kernels.py --convs-only --batch 8 --out /tmp/convs   # a subset, elsewhere
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import tvm  # noqa: E402
from common import RunRecord  # noqa: E402
from torch import nn  # noqa: E402

import sparsefx  # noqa: E402
from sparsefx.backends.tvm.dispatch.torch_kernels import best_time
from sparsefx.backends.tvm.sparse.kernels import KernelSpec  # noqa: E402
from sparsefx.backends.tvm.sparse.latency import kernel_spec, time_kernels  # noqa: E402
from sparsefx.sparse.masks import Sparsity  # noqa: E402
from sparsefx.target import resolve_target  # noqa: E402

DENSITIES = (0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.02)
BLOCKS = ((1, 4), (1, 16), (4, 4), (16, 1), (32, 1))
NM = ((2, 4), (1, 4))
# (label, rows = out features, cols = in features, batch, conv input h×w or None)
LAYERS = [
    ("linear 768x768", 768, 768, 1, None), ("linear 768x3072", 3072, 768, 1, None),
    ("linear 3072x768", 768, 3072, 1, None), ("linear 768x768", 768, 768, 128, None),
    ("linear 768x3072", 3072, 768, 128, None), ("linear 3072x768", 768, 3072, 128, None),
    ("r50 conv1x1 256->64 @56", 64, 256, 1, 56), ("r50 conv1x1 512->128 @28", 128, 512, 1, 28),
    ("r50 conv1x1 1024->256 @14", 256, 1024, 1, 14), ("r50 conv1x1 512->2048 @7", 2048, 512, 1, 7),
]
LAYERS += [(label, rows, cols, 8, hw) for label, rows, cols, _, hw in LAYERS[6:]]
CONV_BATCH_NOTE = ("ResNet-50 convs at batch 8, not 128: at 128 one 56×56 layer is 6.6 GMAC (torch eager dense "
                   "772 ms, 5 s of wall time to time one sparse kernel), about 4 minutes per layer for its 37 "
                   "kernels on this 2-core machine.")


def _best(run: object, repeat: int = 30) -> float:
    return best_time(run, repeat)


def _dense_layer(rows: int, cols: int, batch: int, hw: int | None) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if hw is None:
        return nn.Linear(cols, rows).eval(), torch.randn(batch, cols)
    return nn.Conv2d(cols, rows, 1).eval(), torch.randn(batch, cols, hw, hw)


def _dense_times(rows: int, cols: int, batch: int, hw: int | None) -> tuple[float, float]:
    layer, x = _dense_layer(rows, cols, batch, hw)
    with torch.no_grad():
        eager = _best(lambda: layer(x))
    compiled = sparsefx.compile(layer, (x,), verbose=False)
    args = [tvm.runtime.tensor(x.numpy())]
    timer = compiled.vm.time_evaluator("main", compiled.device, number=max(1, int(2 / max(eager, 0.01))), repeat=10)
    return eager, float(np.min(timer(*args).results)) * 1e3


def _specs(rows: int, cols: int, batch: int, hw: int | None) -> list[tuple[str, float, KernelSpec]]:
    width = batch if hw is None else batch * hw * hw
    found = []
    for block in BLOCKS:
        for density in DENSITIES:
            found.append((f"bsr {block[0]}x{block[1]}", density,
                          kernel_spec(Sparsity(density, "block", block=block), rows, cols, width)))
    for n, m in NM:
        found.append((f"{n}:{m}", n / m, kernel_spec(Sparsity(n / m, "nm", m=m), rows, cols, width)))
    if hw is not None:  # a conv's kernel: (batch, cols, h·w) in, (batch, rows, h·w) out
        found = [(k, d, KernelSpec(s.fmt, s.rows, s.cols, s.block, s.nnz, batch, hw * hw)) for k, d, s in found]
    return found


def bench(layers: list[tuple]) -> list[dict]:
    target = resolve_target("cpu").to_tvm()
    rows_out = []
    for label, rows, cols, batch, hw in layers:
        eager, tvm_dense = _dense_times(rows, cols, batch, hw)
        specs = _specs(rows, cols, batch, hw)
        times = time_kernels([s for _, _, s in specs], target, repeat=20)
        best_dense = min(eager, tvm_dense)
        row = {"layer": label, "rows": rows, "cols": cols, "batch": batch, "eager_ms": eager,
               "tvm_dense_ms": tvm_dense, "kernels": {}}
        for (kind, density, _), ms in zip(specs, times, strict=True):
            row["kernels"].setdefault(kind, {})[str(density)] = ms
        row["break_even"] = {kind: max((float(d) for d, ms in by.items() if ms <= best_dense), default=None)
                             for kind, by in row["kernels"].items() if kind.startswith("bsr")}
        rows_out.append(row)
        print(f"{label} batch {batch}: eager {eager:.3f} ms, TVM dense {tvm_dense:.3f} ms, "
              f"break-even {row['break_even']}", file=sys.stderr, flush=True)
    return rows_out


def markdown(rows: list[dict]) -> str:
    head = ["layer", "batch", "eager ms", "TVM dense ms", "kernel", *[f"{1 - d:.0%}" for d in DENSITIES],
            "N:M", "break-even density"]
    lines = ["Latency in ms by sparsity (fraction of weights removed); **bold**: faster than the faster dense "
             "baseline. Break-even: highest kept fraction still at least as fast as dense.", "", CONV_BATCH_NOTE, "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        best = min(row["eager_ms"], row["tvm_dense_ms"])
        for kind, by in row["kernels"].items():
            if not kind.startswith("bsr"):
                continue
            cells = [f"**{by[str(d)]:.3f}**" if by[str(d)] <= best else f"{by[str(d)]:.3f}" for d in DENSITIES]
            nm = " / ".join(f"{k} {next(iter(v.values())):.3f}" for k, v in row["kernels"].items() if ":" in k)
            even = row["break_even"][kind]
            lines.append(f"| {row['layer']} | {row['batch']} | {row['eager_ms']:.3f} | {row['tvm_dense_ms']:.3f} | "
                         f"{kind} | {' | '.join(cells)} | {nm if kind == 'bsr 1x4' else ''} | "
                         f"{'-' if even is None else f'{even:.2f}'} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    cols = 4
    fig, axes = plt.subplots(-(-len(rows) // cols), cols, figsize=(4.2 * cols, 3.4 * -(-len(rows) // cols)),
                             squeeze=False)
    for ax, row in zip(axes.flat, rows, strict=False):
        for kind, by in row["kernels"].items():
            if kind.startswith("bsr"):
                ax.plot([100 * (1 - float(d)) for d in by], list(by.values()), marker="o", ms=3, label=kind)
        ax.axhline(row["eager_ms"], color="k", ls="--", lw=1, label="torch eager dense")
        ax.axhline(row["tvm_dense_ms"], color="gray", ls=":", lw=1, label="TVM dense")
        even = [e for e in row["break_even"].values() if e is not None]
        if even:
            ax.axvline(100 * (1 - max(even)), color="r", lw=1, label="break-even (best block)")
        ax.set_yscale("log")
        ax.set_title(f"{row['layer']}, batch {row['batch']}", fontsize=9)
        ax.set_xlabel("sparsity %")
        ax.set_ylabel("ms")
    for ax in axes.flat[len(rows):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--quick", action="store_true", help="only the 768x3072 linear at batch 1")
    parser.add_argument("--convs-only", action="store_true", help="only the ResNet-50 1x1 convs")
    parser.add_argument("--batch", type=int, help="only the layers at this batch")
    args = parser.parse_args()
    torch.set_num_threads(resolve_target("cpu").cores)
    record = RunRecord(sys.argv)
    layers = [LAYERS[1]] if args.quick else LAYERS
    layers = [la for la in layers if (la[4] is not None or not args.convs_only) and args.batch in (None, la[3])]
    rows = bench(layers)
    args.out.mkdir(parents=True, exist_ok=True)
    record.write_report(args.out / "sparse_kernels.json", {"target": str(resolve_target("cpu")), "rows": rows})
    (args.out / "sparse_kernels.md").write_text(markdown(rows))
    plot(rows, args.out / "sparse_kernels.png")
    print(markdown(rows))


if __name__ == "__main__":
    main()
