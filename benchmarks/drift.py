"""Do the planner's drift warnings fire when, and only when, the machine's speed changed?

Plans a small conv net `--plans` times in a row, each with a fresh cost model over one table file
(as separate `sparsefx plan` runs would), with 20 calls of a compiled ResNet-18 between plans (as a
session that plans, compiles and runs does: a probe that allocated its output each call moved 20-45%
after them), and counts the "cost tables ... re-measure" warnings; then
starts one memory-streaming process per core (a real change: another job on the machine) and plans `--busy-plans`
more times. On a quiet machine the first phase should warn never and the second every time (the
neighbours stream memory: see `_stream`). Also
records each plan's probe ratios (now / table), so a near miss shows.

    .venv/bin/python benchmarks/drift.py --threads 1
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torchvision
from common import RunRecord
from torch import nn

import sparsefx
from sparsefx.planning.pricing import cost_model
from sparsefx.target import resolve_target, with_threads


def _stream(stop: multiprocessing.Event) -> None:
    """Copy 256 MiB back and forth: a neighbour that takes the caches and memory bandwidth the
    kernels share (a CPU-bound spinner barely moves them: a timed run fits in its time slice)."""
    torch.set_num_threads(1)
    a = torch.ones(64 << 20)
    b = torch.empty_like(a)
    while not stop.is_set():
        b.copy_(a)
        a.copy_(b)


def plan_once(model: nn.Module, inputs: tuple, table: Path, threads: int) -> dict:
    cost = cost_model(with_threads(resolve_target("cpu"), threads), path=table)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sparsefx.plan(model, inputs, speedup=1.1, cost=cost, verbose=False)
    drifted = [str(w.message) for w in caught if "re-measure" in str(w.message)]
    return {"warned": bool(drifted), "probes": {name: round(now / then, 3) for name, then, now in cost.drift()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plans", type=int, default=10)
    parser.add_argument("--busy-plans", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/drift"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    record = RunRecord(sys.argv)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1)).eval()
    inputs = (torch.randn(1, 3, 32, 32),)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "table.json"
        image = torch.randn(1, 3, 224, 224)
        between = None
        for i in range(args.plans):
            rows.append({"phase": "quiet", "plan": i, **plan_once(model, inputs, table, args.threads)})
            print(rows[-1], flush=True)
            between = between or sparsefx.compile(torchvision.models.resnet18().eval(), (image,),
                                                  threads=args.threads, verbose=False)
            for _ in range(20):
                between(image)
        stop = multiprocessing.Event()
        busy = [multiprocessing.Process(target=_stream, args=(stop,)) for _ in range(multiprocessing.cpu_count())]
        for p in busy:
            p.start()
        time.sleep(1.0)
        try:
            for i in range(args.busy_plans):
                rows.append({"phase": "busy", "plan": i, **plan_once(model, inputs, table, args.threads)})
                print(rows[-1], flush=True)
        finally:
            stop.set()
            for p in busy:
                p.join()
    quiet = [r for r in rows if r["phase"] == "quiet"]
    loaded = [r for r in rows if r["phase"] == "busy"]
    summary = (f"quiet: {sum(r['warned'] for r in quiet)}/{len(quiet)} plans warned of drift; with one memory-streaming "
               f"process per core: {sum(r['warned'] for r in loaded)}/{len(loaded)}")
    record.write_report(args.out / "drift.json", {"summary": summary, "rows": rows})
    lines = [record.markdown_line(), "", summary, "", "| phase | plan | warned | probe now / table |",
             "|---|---|---|---|"]
    lines += [f"| {r['phase']} | {r['plan']} | {'yes' if r['warned'] else 'no'} | "
              + ", ".join(f"{k} {v:.3f}" for k, v in r["probes"].items()) + " |" for r in rows]
    (args.out / "drift.md").write_text("\n".join(lines) + "\n")
    print(summary)


if __name__ == "__main__":
    main()
