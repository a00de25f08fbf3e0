"""MetaSchedule tuning with one persistent database per target.

Records live in `cache_dir()/tuning/<arch>-<cores>/` and are keyed by the TIR workload,
so a second compile of the same model, or a pruned model sharing layer shapes with one
already tuned, tunes only the workloads the database has not seen.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import tvm
from tvm import relax
from tvm.s_tir import meta_schedule as ms

from sparsefx.cache import cache_dir
from sparsefx.errors import one_line
from sparsefx.target import Target

logger = logging.getLogger("sparsefx.cache")


def database_dir(target: Target) -> Path:
    path = cache_dir() / "tuning" / f"{target.kind}-{target.arch}-{target.cores}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def open_database(work_dir: Path) -> ms.database.JSONDatabase:
    """The tuning database in `work_dir`; one TVM cannot parse (truncated by a killed tuning run)
    is moved aside to `*.corrupt` with one warning, and its workloads are tuned again."""
    try:
        return ms.database.JSONDatabase(work_dir=str(work_dir))
    except RuntimeError as error:  # what TVM raises on a malformed record
        logger.warning("tuning database %s cannot be read (%s): moved aside to *.corrupt, its workloads will be "
                       "tuned again", work_dir, one_line(error))
        for file in work_dir.glob("database_*.json"):
            file.replace(file.with_name(file.name + ".corrupt"))
        return ms.database.JSONDatabase(work_dir=str(work_dir))


def tune_module(mod: tvm.IRModule, target: Target, tvm_target: tvm.target.Target, trials: int,
                log: Callable[[str], None]) -> tuple[tvm.transform.Pass, dict]:
    """Tune the TIR workloads of `mod` that the database lacks, `trials` measurements each at
    most; returns the pass that applies the database and what was done."""
    started = time.perf_counter()
    work_dir = database_dir(target)
    database = open_database(work_dir)
    fused = tvm.transform.Sequential([  # the same TIR the lowering pipeline will produce
        relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
        relax.transform.FuseOps(), relax.transform.FuseTIR()])
    with tvm_target:
        tasks = ms.relax_integration.extract_tasks(fused(mod), tvm_target)
    new = [t for t in tasks if not database.has_workload(t.dispatched[0])]
    log(f"tuning: {len(tasks)} TIR workloads, {len(tasks) - len(new)} already in {work_dir}")
    if new:
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(new, str(work_dir))
        log(f"tuning {len(new)} new workloads with up to {trials} trials each (MetaSchedule)")
        ms.tune.tune_tasks(tasks=contexts, task_weights=weights, work_dir=str(work_dir),
                           max_trials_global=trials * len(new), max_trials_per_task=trials,
                           num_trials_per_iter=min(64, trials), database=database)
    info = {"trials_per_task": trials, "tasks": len(tasks), "tuned_tasks": len(new),
            "seconds": round(time.perf_counter() - started, 2), "database": str(work_dir)}
    with tvm_target:
        return relax.transform.MetaScheduleApplyDatabase(str(work_dir)), info
