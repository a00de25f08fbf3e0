"""On-disk caches survive faults: a truncated, empty or wrong-version table (a compile killed
mid-write, a full disk, an older sparsefx) costs one warning and a re-measure, never a crash, and
processes saving into one table at once keep each other's entries."""

from __future__ import annotations

import errno
import json
import logging
import multiprocessing
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from sparsefx import target as targets
from sparsefx.backends.tvm import tuning
from sparsefx.backends.tvm.dispatch.table import DispatchTable
from sparsefx.backends.tvm.measure.host import HostTimer
from sparsefx.backends.tvm.pipeline import build_module
from sparsefx.backends.tvm.sparse import latency
from sparsefx.cache import Table
from sparsefx.cost.kernel import matmul_kernel
from sparsefx.planning.pricing import cost_model
from sparsefx.sparse.masks import Sparsity

pytestmark = pytest.mark.usefixtures("private_cache")

SPOILS = ("truncated", "empty", "wrong version")


def spoil(path: Path, how: str) -> None:
    text = path.read_text()
    if how == "truncated":  # what a process killed mid-write or a full disk leaves
        path.write_text(text[: len(text) // 2])
    elif how == "empty":
        path.write_text("")
    else:  # a table another sparsefx wrote: the entries are there, but measured differently
        data = json.loads(text)
        path.write_text(json.dumps({**data, "version": f"older than {data['version']}"}))


def cache_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "sparsefx.cache" and r.levelno == logging.WARNING]


def assert_recovered(caplog: pytest.LogCaptureFixture, table: Table, keys: set[str]) -> None:
    """One warning naming the file, and the file a valid table with the re-measured entries."""
    warnings = cache_warnings(caplog)
    assert len(warnings) == 1, warnings
    assert str(table.path) in warnings[0] and "re-measured" in warnings[0]
    data = json.loads(table.path.read_text())
    assert data["version"] == table.version and set(data["entries"]) == keys


# --- dispatch: the real decision, its TIR build counted ---------------------------------------
MATMUL = matmul_kernel(1, 4, 16, 8, 0)  # (4, 16) @ (16, 8)


def decide_matmul() -> tuple[DispatchTable, int]:
    """Decide MATMUL through a fresh DispatchTable; returns the table and the number of TIR builds."""
    built: list[int] = []
    target = targets.resolve_target("cpu")

    def counting_build(mod, tvm_target):
        built.append(1)
        return build_module(mod, tvm_target, target)

    table = DispatchTable("test")
    decision = table.decide([MATMUL], HostTimer(target, counting_build, table.entries.values()))[MATMUL.key]
    assert decision["impl"] in ("tir", "torch")
    return table, len(built)


@pytest.mark.parametrize("how", SPOILS)
def test_a_spoiled_dispatch_table_warns_once_and_decides_again(how, caplog) -> None:
    table, builds = decide_matmul()
    assert builds == 1 and decide_matmul()[1] == 0  # measured once, then answered from disk
    spoil(table.table.path, how)
    again, builds = decide_matmul()
    assert builds == 1  # the TIR kernel was built and timed again
    assert_recovered(caplog, again.table, {MATMUL.key})


# --- cost model: real (tiny) kernels, a table emptied by the fault fills again ------------------
@pytest.mark.parametrize("how", SPOILS)
def test_a_spoiled_cost_table_warns_once_and_measures_again(how, caplog) -> None:
    cost = cost_model("cpu")
    kernel = matmul_kernel(1, 8, 16, 16, cost.lanes)
    cost.measured(kernel)
    cost.save()
    spoil(cost.path, how)
    again = cost_model("cpu")
    assert again.table == {}  # nothing of the spoiled file is used
    assert again.measured(kernel) > 0 and set(again.table) == {kernel.key}
    again.save()
    assert_recovered(caplog, again.tables[0], {kernel.key})


# --- peaks: the real measurement, counted ---------------------------------------------------
@pytest.mark.parametrize("how", SPOILS)
def test_a_spoiled_peaks_table_warns_once_and_measures_again(how, caplog, monkeypatch) -> None:
    measured: list[tuple[float, float]] = []

    def counting_measure() -> tuple[float, float]:
        measured.append(real_measure())
        return measured[-1]

    real_measure = targets.measure_cpu_peaks
    monkeypatch.setattr(targets, "measure_cpu_peaks", counting_measure)
    first = targets.with_measured_peaks(targets.host_cpu())
    assert (first.peak_gflops, first.bandwidth_gbs) == measured[0]
    assert targets.with_measured_peaks(targets.host_cpu()) == first and len(measured) == 1  # from disk
    table = targets.peaks_table()
    keys = set(table.entries)
    spoil(table.path, how)
    again = targets.with_measured_peaks(targets.host_cpu())
    assert len(measured) == 2 and (again.peak_gflops, again.bandwidth_gbs) == measured[1]
    assert_recovered(caplog, table, keys)


def test_a_full_disk_costs_one_warning_and_the_run_goes_on(caplog, monkeypatch) -> None:
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tempfile, "mkstemp", full_disk)
    target = targets.with_measured_peaks(targets.host_cpu())
    assert target.peak_gflops and target.bandwidth_gbs
    warnings = cache_warnings(caplog)
    assert len(warnings) == 1 and "No space left" in warnings[0] and not targets.peaks_table().path.exists()


# --- sparse latency: the kernel timing stubbed, counted -------------------------------------
@pytest.mark.parametrize("how", SPOILS)
def test_a_spoiled_sparse_latency_table_warns_once_and_measures_again(how, caplog, monkeypatch) -> None:
    timed: list[str] = []

    def counting_time(specs, target):
        timed.extend(s.name for s in specs)
        return [0.5] * len(specs)

    monkeypatch.setattr(latency, "time_kernels", counting_time)
    spec = Sparsity(0.25, "block", block=(4, 1))
    latency.measure_sparse_latency(spec, 16, 16, 1)
    latency.measure_sparse_latency(spec, 16, 16, 1)
    assert len(timed) == 1  # the second answer came from disk
    table = latency.latency_table(targets.resolve_target("cpu"))
    spoil(table.path, how)
    latency.measure_sparse_latency(spec, 16, 16, 1)
    assert timed == [timed[0]] * 2
    assert_recovered(caplog, table, {timed[0]})


def test_the_sparse_latency_table_keeps_a_real_measurement() -> None:
    spec = Sparsity(0.5, "block", block=(4, 1))
    ms = latency.measure_sparse_latency(spec, 16, 16, 1)
    table = latency.latency_table(targets.resolve_target("cpu"))
    assert ms > 0 and list(table.entries.values()) == [ms] and latency.measure_sparse_latency(spec, 16, 16, 1) == ms


# --- concurrent writers --------------------------------------------------------------------
TABLES: dict[str, Callable[[], Table]] = {
    "dispatch": lambda: DispatchTable("test").table,
    "cost model": lambda: cost_model("cpu").tables[0],
    "peaks": targets.peaks_table,
    "sparse latency": lambda: latency.latency_table(targets.resolve_target("cpu")),
}
SAVES = 40


def save_many(path: Path, version: int | str, writer: str) -> None:
    """One process measuring into a table: each new entry read-modified-saved, as the caches do."""
    for i in range(SAVES):
        table = Table(path, version)
        table.entries[f"{writer}-{i}"] = [i, writer]
        table.save()


@pytest.mark.parametrize("cache", TABLES)
def test_processes_saving_into_one_table_at_once_keep_all_entries(cache, caplog) -> None:
    table = TABLES[cache]()
    fork = multiprocessing.get_context("fork")  # the children write files only; no threads of theirs
    writers = [fork.Process(target=save_many, args=(table.path, table.version, name)) for name in ("a", "b")]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=120)
    assert [w.exitcode for w in writers] == [0, 0]
    data = json.loads(table.path.read_text())
    assert data["version"] == table.version
    assert set(data["entries"]) == {f"{w}-{i}" for w in "ab" for i in range(SAVES)}
    assert Table(table.path, table.version).entries == data["entries"] and not cache_warnings(caplog)
    assert not list(table.path.parent.glob("*.tmp"))  # every temporary file was renamed


# --- the tuning database (TVM's format) ------------------------------------------------------
def test_a_corrupt_tuning_database_is_moved_aside_and_started_fresh(tmp_path, caplog) -> None:
    (tmp_path / "database_workload.json").write_text('{"truncated')
    database = tuning.open_database(tmp_path)
    assert len(database) == 0
    warnings = cache_warnings(caplog)
    assert len(warnings) == 1 and str(tmp_path) in warnings[0]
    assert (tmp_path / "database_workload.json.corrupt").read_text() == '{"truncated'
