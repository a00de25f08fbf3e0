"""How long a first plan and a first compile take: `sparsefx plan MODEL --speedup S` and `sparsefx
compile MODEL` on empty caches (cold), then again (warm), and each with `--no-cache` on the warm
caches (planned or compiled afresh, not reused).

Each run is the CLI in its own process, as a user starts it, with `SPARSEFX_CACHE` pointing at a
fresh directory for each cold run and the same directory for the warm ones after it; the wall time
includes starting Python and importing what the command imports. The goals (issue 21), for ResNet-50: planning at 2x
under 60 s cold and 5 s warm, compiling under 60 s cold and 5 s warm.

    python benchmarks/plan_time.py                         # ResNet-50, 2x, all cores
    python benchmarks/plan_time.py --model torchvision:resnet18 --threads 1
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, RunRecord

GOALS_S = {"cold": 60.0, "warm": 5.0}


def run_cli(args: list[str], threads: int | None, cache: Path) -> dict:
    command = [sys.executable, "-m", "sparsefx.cli", *args] + (["--threads", str(threads)] if threads else [])
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, "SPARSEFX_CACHE": str(cache)},
                          capture_output=True, text=True)
    row = {"seconds": round(time.perf_counter() - started, 1), "returncode": done.returncode}
    # the call itself, as its summary line (compile) or its status line (plan) says
    inside = re.search(r"compile ([0-9.]+) s", done.stdout) or re.search(r"planned in ([0-9.]+) s", done.stderr)
    if inside:
        row["call_s"] = float(inside.group(1))
    if done.returncode:
        row["error"] = (done.stderr.strip().splitlines() or ["?"])[-1]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="torchvision:resnet50")
    parser.add_argument("--speedup", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=None, help="default: all cores, as the CLI plans")
    parser.add_argument("--warm-runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    record = RunRecord(sys.argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="sfx-plan-time-") as tmp:
        commands = {"plan": ["plan", args.model, "--speedup", str(args.speedup), "--out", f"{tmp}/plan.json"],
                    "compile": ["compile", args.model, "--out", f"{tmp}/model.sfx"]}
        for command, cli_args in commands.items():
            cache = Path(tmp) / f"cache-{command}"
            rows += [{"command": command, "run": "cold", **run_cli(cli_args, args.threads, cache)}]
            rows += [{"command": command, "run": "warm", **run_cli(cli_args, args.threads, cache)}
                     for _ in range(args.warm_runs)]
        # the same model planned and compiled afresh from warm tables: what a changed model (new weights) costs
        for command in commands:
            rows += [{"command": f"{command} --no-cache", "run": "warm",
                      **run_cli(commands[command] + ["--no-cache"], args.threads, Path(tmp) / f"cache-{command}")}
                     for _ in range(args.warm_runs)]
    for row in rows:
        row["goal_s"] = GOALS_S[row["run"]]
        row["met"] = row["returncode"] == 0 and row["seconds"] <= row["goal_s"]
    record.write(args.out / "plan_time.json", rows)
    lines = [f"# First plan and compile: `sparsefx plan {args.model} --speedup {args.speedup:g}`, "
             f"`sparsefx compile {args.model}`", "", record.markdown_line(),
             "", f"Threads: {args.threads or 'all cores'}. Cold: empty `SPARSEFX_CACHE` (one per command); warm: the "
             "same cache again. Wall time of the CLI process (Python start and imports included).", "",
             "A warm `plan` or `compile` is answered from what the cold one kept for the same command "
             "(`sparsefx.cli.recipe`: the plan, on unchanged cost tables, or the compiled artifact; without importing "
             "PyTorch, so no `in the call`); `--no-cache` plans or compiles the same model afresh from the warm measurement tables, "
             "as a model with changed weights would be (a plan afresh may take other moves than the cold one and "
             "measure their kernels).", "",
             "`in the call`: the seconds `sparsefx.plan` / `sparsefx.compile` took as the CLI reports them, without "
             "starting Python, importing torch, torchvision and TVM, loading the model or writing the plan or artifact; "
             "the goal is judged on the whole process.", "",
             "| command | run | seconds | in the call | goal (s) | met | error |", "|---|---|---:|---:|---:|---|---|"]
    lines += [f"| {r['command']} | {r['run']} | {r['seconds']:.1f} | {r.get('call_s', '-')} | {r['goal_s']:g} | "
              f"{'yes' if r['met'] else 'no'} | {r.get('error', '')} |" for r in rows]
    (args.out / "plan_time.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
