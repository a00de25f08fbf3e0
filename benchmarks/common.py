"""What every benchmark records beside its numbers, so a result file says where and when it was made.

`RunRecord` is started before the measurements and stamped into the JSON at the end: date, git
commit (and whether the tree had uncommitted changes), host CPU, cores and threads, library
versions, and the machine's load: the load average before and after, and the CPU time of this
process (all its threads) and of the child processes it waited for, against wall time. With one
thread on a quiet machine CPU/wall is about 1; far below 1, the run waited for the CPU (or for
worker processes it did not wait for, such as TVM's build pool).
Results files hold {"meta": ..., "rows": [...]}; a benchmark is re-run whole, never merged by hand.

Timing side by side uses sparsefx.backends.eager.measure_latencies: alternating rounds, medians.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from sparsefx import target
from sparsefx.version import library_versions as versions_of

LIBRARIES = ("sparsefx", "torch", "torchvision", "apache-tvm", "transformers", "numpy", "torch-pruning")
ROOT = Path(__file__).resolve().parent.parent


class RunRecord:
    """Started when a benchmark starts; `meta()` describes the run so far."""

    def __init__(self, argv: list[str] | None = None) -> None:
        self.argv = argv
        self.started = datetime.datetime.now(datetime.UTC)
        self.git = git_state()  # the code that runs is the code at the start (commits may land meanwhile)
        self.wall0, self.times0, self.load0 = time.perf_counter(), os.times(), os.getloadavg()

    def meta(self) -> dict:
        times = os.times()
        cpu_s = sum(getattr(times, f) - getattr(self.times0, f)
                    for f in ("user", "system", "children_user", "children_system"))
        wall_s = time.perf_counter() - self.wall0
        return {
            "date": self.started.isoformat(timespec="seconds"),
            "argv": self.argv,
            **self.git,
            "host": {"cpu": cpu_model(), "cores": os.cpu_count(), "machine": platform.machine(),
                     "python": platform.python_version()},
            "threads": {"torch": torch.get_num_threads(), "TVM_NUM_THREADS": os.environ.get("TVM_NUM_THREADS")},
            "load": {"loadavg_before": [round(x, 2) for x in self.load0],
                     "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                     "cpu_s": round(cpu_s, 1), "wall_s": round(wall_s, 1),
                     "cpu_per_wall": round(cpu_s / wall_s, 2) if wall_s else None},
            "versions": library_versions(),
        }

    def markdown_line(self) -> str:
        """One line for the top of a results table."""
        m = self.meta()
        return (f"Run {m['date']} at {m['commit'][:10]}{' (uncommitted changes)' if m['dirty'] else ''} on "
                f"{m['host']['cpu']} ({m['host']['cores']} cores), torch threads {m['threads']['torch']}, "
                f"load average {m['load']['loadavg_before'][0]} -> {m['load']['loadavg_after'][0]}, "
                f"CPU/wall {m['load']['cpu_per_wall']}.")

    def write(self, path: Path, rows: list) -> None:
        """The results JSON: this run's metadata and its rows."""
        self.write_report(path, {"rows": rows})

    def write_report(self, path: Path, report: dict) -> None:
        """A results JSON of any shape, this run's metadata first."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"meta": self.meta(), **report}, indent=1, default=str) + "\n")


def read_rows(path: Path) -> list:
    """Rows of a results file (a bare list in files written before RunRecord)."""
    data = json.loads(path.read_text())
    return data["rows"] if isinstance(data, dict) else data


def git_state() -> dict:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    return {"commit": git("rev-parse", "HEAD") or "unknown",
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no", "--", "sparsefx", "benchmarks"))}


def cpu_model() -> str:
    return target.cpu_model() or platform.processor() or "unknown"


def library_versions() -> dict:
    return versions_of(LIBRARIES)
