"""Dispatch pre-filter: TIR is built only where it could win, and the table says which entries it decided."""

from __future__ import annotations

import time

import pytest

from sparsefx.backends.tvm.compiler import build_module
from sparsefx.backends.tvm.dispatch import prefilter
from sparsefx.backends.tvm.dispatch import table as dispatch
from sparsefx.target import resolve_target

pytestmark = pytest.mark.usefixtures("private_cache")


def _conv(channels: int) -> dispatch.Workload:
    """A dilated 3x3 conv: no own kernel runs it, so TIR's default schedule is the other candidate."""
    return dispatch.Workload("conv2d", ((1, channels, 8, 8), (channels, channels, 3, 3), (1, channels, 8, 8)),
                             (1, 1, 2, 2, 2, 2, 1))


def test_filter_needs_calibration_then_skips_only_far_faster_torch() -> None:
    fast = prefilter.Candidate("fast", "conv2d", gflop=1.0, torch_ms=1.0)  # 1000 GFLOP/s
    slow = prefilter.Candidate("slow", "conv2d", gflop=1.0, torch_ms=500.0)  # 2 GFLOP/s
    assert prefilter.calibration([fast, slow], []) == [slow, fast]  # no ceiling yet: slowest first
    measured = [{"op_class": "conv2d", "gflop": 1.0, "tir_ms": 200.0, "torch_ms": 1.0}] * 2  # TIR reaches 5 GFLOP/s
    ceilings = prefilter.tir_ceilings(measured)
    assert ceilings == {"conv2d": (5.0, 2)} and prefilter.calibration([fast], measured) == []
    assert prefilter.skip(fast, ceilings) == 5.0 and prefilter.skip(slow, ceilings) is None
    other_class = prefilter.Candidate("dw", "conv2d_grouped", gflop=1.0, torch_ms=1.0)
    assert prefilter.skip(other_class, ceilings) is None  # a ceiling only speaks for its own class


def test_workloads_pytorch_runs_in_a_few_microseconds_are_always_built_and_set_no_ceiling() -> None:
    tiny = prefilter.Candidate("se", "conv2d", gflop=1e-6, torch_ms=prefilter.TINY_MS / 10)  # 0.2 GFLOP/s
    big = prefilter.Candidate("big", "conv2d", gflop=1.0, torch_ms=500.0)
    assert prefilter.calibration([tiny, big], []) == [big]  # the tiny one says nothing about throughput
    measured = [{"op_class": "conv2d", "gflop": 1e-6, "tir_ms": 0.1, "torch_ms": tiny.torch_ms}] * 2  # 0.01 GFLOP/s
    assert prefilter.tir_ceilings(measured) == {}
    ceilings = {"conv2d": (0.01, 2)}  # a ceiling far below the tiny one's PyTorch GFLOP/s
    assert prefilter.skip(tiny, ceilings) is None and prefilter.skip(big, ceilings) == 0.01


def test_table_builds_calibration_and_plausible_tir_wins_only(monkeypatch) -> None:
    workloads = [_conv(c) for c in (64, 72, 80, 88, 96)]
    slowest = workloads[-1]
    # PyTorch is absurdly fast on all but one workload (100+ GFLOP/s, yet not so fast that the time is
    # all call-out), which it runs absurdly slowly
    monkeypatch.setattr(dispatch, "_torch_time", lambda w: (1e6 if w is slowest else prefilter.TINY_MS, False))
    built: list[int] = []
    target = resolve_target("cpu")

    def counting_build(mod, tvm_target):
        built.append(sum(1 for gv in mod.functions if gv.name_hint.startswith("op")))
        return build_module(mod, tvm_target, target)

    table = dispatch.DispatchTable("test")
    decisions = table.decide(workloads, target.to_tvm(), counting_build)
    assert built == [prefilter.CALIBRATE]  # the two slowest on PyTorch set the ceiling; the rest are ruled out
    by = {w.key: decisions[w.key]["decided_by"] for w in workloads}
    assert list(by.values()).count("prefilter") == len(workloads) - prefilter.CALIBRATE
    assert by[slowest.key] == "measured" and decisions[slowest.key]["impl"] == "tir"
    skipped = [d for d in decisions.values() if d["decided_by"] == "prefilter"]
    assert all(d["impl"] == "torch" and d["tir_ms"] is None and d["tir_ceiling_gflops"] > 0 for d in skipped)
    # the cached table answers a second compile without building anything
    assert dispatch.DispatchTable("test").decide(workloads, target.to_tvm(), counting_build) == decisions
    assert built == [prefilter.CALIBRATE]


@pytest.mark.parametrize("kind, workload", [
    ("depthwise", dispatch.Workload("conv2d", ((1, 32, 16, 16), (32, 1, 3, 3), (1, 32, 16, 16)), (1, 1, 1, 1, 1, 1, 32))),
    ("pointwise", dispatch.Workload("conv2d", ((1, 32, 16, 16), (24, 32, 1, 1), (1, 24, 16, 16)), (1, 1, 0, 0, 1, 1, 1))),
    ("direct", dispatch.Workload("conv2d", ((1, 8, 16, 16), (24, 8, 3, 3), (1, 24, 8, 8)), (2, 2, 1, 1, 1, 1, 1))),
])
def test_own_kernel_convs_build_only_sparsefx_kernel_not_the_default_tir(monkeypatch, kind, workload) -> None:
    monkeypatch.setattr(dispatch, "_torch_time", lambda w: (1e6, False))  # PyTorch loses: TIR would be built
    ran: list[int] = []

    def rigged_duel(runs, flush):  # both rivals run; the own kernel wins
        ran.extend(run() is not None for run in runs)
        return [0.01, 1e6]

    monkeypatch.setattr(dispatch, "duel", rigged_duel)
    built: list[int] = []
    target = resolve_target("cpu")

    def counting_build(mod, tvm_target):
        built.append(len(mod.functions))
        return build_module(mod, tvm_target, target)

    decision = dispatch.DispatchTable("test").decide([workload], target.to_tvm(), counting_build)[workload.key]
    assert built == [] and decision["decided_by"] == kind and decision["tir_ms"] is None
    assert decision["impl"] == kind and len(ran) == 2


def test_duel_times_each_rival_every_round() -> None:
    counts = [0, 0]

    def rival(i: int) -> None:
        counts[i] += 1
        time.sleep(0.002 * (1 + i))

    times = dispatch.duel([lambda: rival(0), lambda: rival(1)], rounds=4)
    assert len(times) == 2 and 2.0 <= times[0] < times[1] and times[1] >= 4.0 and counts == [5, 5]  # a warm-up run, then the rounds


def test_pytorch_is_charged_its_call_overhead_against_tir() -> None:
    overhead = dispatch.call_overhead_ms()
    assert 0 <= overhead < 1.0  # microseconds, not a kernel's worth
    close = prefilter.Candidate("k", "conv", 1e-3, torch_ms=0.050)
    assert dispatch.DispatchTable._entry(close, 0.050 + overhead / 2)["impl"] == "tir"  # PyTorch faster alone
    assert dispatch.DispatchTable._entry(close, 0.050 + overhead + 0.01)["impl"] == "torch"


def _se_conv_prim_func(cin: int, cout: int):
    import tvm
    from tvm import relax

    bb = relax.BlockBuilder()
    x, w = relax.Var("x", relax.TensorType((1, cin, 1, 1), "float32")), relax.Var("w", relax.TensorType((cout, cin, 1, 1), "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.nn.conv2d(x, w)))
        bb.emit_func_output(out)
    mod = relax.transform.LegalizeOps()(bb.get())
    return next(f for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc))


def test_dlight_gemv_only_schedules_reduction_heavy_kernels() -> None:
    # DLight's GEMV rule on an SE block's expanding conv (48 -> 1152 at 1x1) kept LLVM busy for minutes
    from sparsefx.backends.tvm.schedule import ReductionHeavyGEMV

    target = resolve_target("cpu").to_tvm()
    assert ReductionHeavyGEMV().apply(_se_conv_prim_func(48, 1152), target, False) is None
    assert ReductionHeavyGEMV().apply(_se_conv_prim_func(1152, 48), target, False) is not None
