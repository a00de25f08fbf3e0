"""Threads and precision of a compiled model: checked on input, recorded in the artifact, honoured by
load, set for PyTorch and TVM alike while the model runs and put back after."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch
from torch import nn

from sparsefx.backends.tvm import compile, load
from sparsefx.backends.tvm.parallel import share_openmp_pool
from sparsefx.backends.tvm.threads import ALLOWED_CPUS, running_with, tir_threads
from sparsefx.cache import cache_dir
from sparsefx.capture.compare import check_reference, output_error
from sparsefx.cli.main import main
from sparsefx.target import TargetError, check_precision, host_cpu, resolve_target, with_threads

pytestmark = pytest.mark.usefixtures("private_cache")
CORES = host_cpu().cores


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def _small() -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    return Small().eval(), (torch.randn(1, 3, 16, 16),)


def _threads_seen_during_call(compiled: object, inputs: tuple) -> set[tuple[int, int]]:
    """(PyTorch threads, TIR kernel threads) at every call the VM makes while the model runs."""
    seen = set()

    def instrument(_func: object, _symbol: str, before: bool, _ret: object, *_args: object) -> int:
        if before:
            seen.add((torch.get_num_threads(), tir_threads()))
        return 0

    compiled.vm.set_instrument(instrument)
    compiled(*inputs)
    return seen


@pytest.mark.parametrize("threads", [0, -1, CORES + 1, 1.5, True, "2"])
def test_bad_thread_counts_are_one_line_errors(threads: object) -> None:
    model, inputs = _small()
    with pytest.raises(TargetError, match="threads") as error:
        compile(model, inputs, threads=threads, verbose=False)
    assert "\n" not in str(error.value)


def test_precisions_are_checked_against_the_cpu() -> None:
    cpu = host_cpu()
    with pytest.raises(TargetError, match="unknown precision 'fp64'"):
        check_precision("fp64", cpu)
    with pytest.raises(TargetError, match="AVX512-BF16 or AMX"):
        check_precision("bf16", cpu, flags=frozenset({"avx512f", "avx2"}))
    assert check_precision("bf16", cpu, flags=frozenset({"avx512f", "amx_bf16"})) == "bf16"
    assert check_precision("fp32", cpu, flags=frozenset()) == "fp32"
    model, inputs = _small()
    for name in ("fp16", "int8"):
        with pytest.raises(TargetError) as error:
            compile(model, inputs, precision=name, verbose=False)
        assert "\n" not in str(error.value)


def test_running_with_sets_both_pools_and_puts_torchs_back() -> None:
    environment = dict(os.environ)
    torch_before = torch.get_num_threads()
    with running_with(1):
        assert (torch.get_num_threads(), tir_threads()) == (1, 1)
    # on PyTorch's pool TIR follows PyTorch's count; TVM's own pool stays at 1: only TVM uses it
    assert (torch.get_num_threads(), tir_threads()) == (torch_before, torch_before if share_openmp_pool() else 1)
    if CORES > 1:  # the pool holds a worker per core, not TVM's default of half the cores on x86
        with running_with(CORES):
            assert (torch.get_num_threads(), tir_threads()) == (CORES, CORES)
    assert torch.get_num_threads() == torch_before
    assert dict(os.environ) == environment  # TVM_NUM_THREADS was set only while the pool started


def test_a_new_thread_keeps_every_core_and_its_pool_a_worker_per_core(monkeypatch) -> None:
    """TVM's pool, started with its own defaults in a thread, pins that thread to core 0 on x86 (and
    with it every PyTorch thread started later) and holds half the cores' workers."""
    # a user's TVM_NUM_THREADS wins over the one-worker-per-core start; the test wants the default start
    monkeypatch.delenv("TVM_NUM_THREADS", raising=False)
    seen = {}

    def run() -> None:
        with running_with(1):
            seen["affinity"] = os.sched_getaffinity(0)
        with running_with(CORES):
            seen["workers"] = tir_threads()
        seen["after"] = os.sched_getaffinity(0)

    thread = threading.Thread(target=run)  # TVM's pool is per thread: this one starts a fresh one
    thread.start()
    thread.join()
    assert seen == {"affinity": set(ALLOWED_CPUS), "workers": CORES, "after": set(ALLOWED_CPUS)}


def test_artifact_records_threads_and_load_honours_them(tmp_path) -> None:
    model, inputs = _small()
    expected = check_reference(model, inputs)
    environment = dict(os.environ)
    compiled = compile(model, inputs, threads=1, dispatch=False, verbose=False)
    assert compiled.manifest["threads"] == 1 and compiled.manifest["precision"] == "fp32"
    assert compiled.manifest["target"]["cores"] == 1  # its tables are those of one core
    torch.set_num_threads(CORES)
    assert _threads_seen_during_call(compiled, inputs) == {(1, 1)}
    assert torch.get_num_threads() == CORES  # put back after the call
    assert dict(os.environ) == environment  # compiling and running set no environment variable

    path = compiled.export(tmp_path / "model.sfx")
    loaded = load(path)
    assert loaded.threads == 1
    assert _threads_seen_during_call(loaded, inputs) == {(1, 1)}
    with torch.no_grad():
        error = output_error(expected, loaded(*inputs))
    assert error.ok(), error
    if CORES > 1:
        assert _threads_seen_during_call(load(path, threads=CORES), inputs) == {(CORES, CORES)}
    with pytest.raises(TargetError, match="threads"):
        load(path, threads=0)


def test_default_is_every_core_and_dispatch_tables_are_per_thread_count() -> None:
    model, inputs = _small()
    every = compile(model, inputs, verbose=False)
    assert every.manifest["threads"] == CORES == every.threads
    one = compile(model, inputs, threads=1, verbose=False)
    assert one.manifest["dispatch"]
    tables = sorted(p.name for p in (cache_dir() / "dispatch").glob("*.json"))
    arch = host_cpu().arch
    assert f"{arch}-1-t1.json" in tables and f"{arch}-{CORES}-t{CORES}.json" in tables, tables


def test_tvm_run_after_import_leaves_the_thread_on_every_core() -> None:
    """A TIR kernel run outside any compiled model (as planners time them) once pinned the thread."""
    code = ("import os, numpy, tvm, sparsefx.backends.tvm\n"
            "before = os.sched_getaffinity(0)\n"
            "tvm.get_global_func('runtime.NumThreads')()\n"  # what any TIR kernel's first run does
            "print(before == os.sched_getaffinity(0), len(before))")
    env = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", str(CORES)]


@pytest.mark.parametrize("threads", ["0", "-1", str(CORES + 1)])
def test_cli_refuses_bad_thread_counts_in_one_line(threads: str, tmp_path, capsys) -> None:
    assert main(["compile", "default", "--threads", threads, "--out", str(tmp_path / "m.sfx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sparsefx: error: threads") and "\n" not in err


def test_cli_compile_records_threads(tmp_path, capsys) -> None:
    assert main(["compile", "default", "--threads", "1", "--no-dispatch", "--out", str(tmp_path / "m.sfx")]) == 0
    assert "1 thread(s)" in capsys.readouterr().out
    assert load(tmp_path / "m.sfx").manifest["threads"] == 1


def test_with_threads_changes_nothing_process_wide(monkeypatch) -> None:
    """A target for fewer cores is a value: timers and compiled models set the pools per call."""
    monkeypatch.delenv("TVM_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    target = with_threads(resolve_target("cpu"), 1)
    assert target.cores == 1
    assert "TVM_NUM_THREADS" not in os.environ and torch.get_num_threads() == before
