"""Dispatch pre-filter: TIR is built only where it could win, and the table says which entries it decided."""

from __future__ import annotations

import time

import pytest
import torch

from sparsefx.backends.tvm.dispatch import prefilter
from sparsefx.backends.tvm.dispatch import table as dispatch
from sparsefx.backends.tvm.kernels import registry as own_kernels
from sparsefx.backends.tvm.measure import host
from sparsefx.backends.tvm.pipeline import build_module
from sparsefx.cost.kernel import conv2d_kernel, matmul_kernel
from sparsefx.cost.timing import choose, time_in_turn
from sparsefx.target import resolve_target

pytestmark = pytest.mark.usefixtures("private_cache")


def _conv(channels: int):
    """A dilated 3x3 conv: no own kernel runs it, so TIR's default schedule is the other candidate."""
    return conv2d_kernel((1, channels, 8, 8), (1, channels, 8, 8), 1, (3, 3), (1, 1), (2, 2), (2, 2), 0)


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


def _counting_timer(built: list[int], torch_ms=None) -> host.HostTimer:
    """The host timer, its builds counted; with `torch_ms(kernel)`, PyTorch's time is that instead of measured."""
    target = resolve_target("cpu")

    def counting_build(mod, tvm_target):
        built.append(sum(1 for gv in mod.functions if gv.name_hint.startswith("k")))
        return build_module(mod, tvm_target, target)

    timer = host.HostTimer(target, counting_build, history=dispatch.DispatchTable("test").entries.values())
    if torch_ms is not None:
        measure = timer.time_rivals

        def rigged(kernels, wanted, ahead=()):
            times = measure(kernels, wanted, ahead)
            for kernel, t in zip(kernels, times):
                t.update({impl: torch_ms(kernel) for impl in t if impl.startswith("torch")})
            return times

        timer.time_rivals = rigged
    return timer


def test_table_builds_calibration_and_plausible_tir_wins_only() -> None:
    kernels = [_conv(c) for c in (64, 72, 80, 88, 96)]
    slowest = kernels[-1]
    # PyTorch is absurdly fast on all but one workload (100+ GFLOP/s, yet not so fast that the time is
    # all call-out), which it runs absurdly slowly
    built: list[int] = []
    timer = _counting_timer(built, lambda k: 1e6 if k is slowest else prefilter.TINY_MS)
    table = dispatch.DispatchTable("test")
    decisions = table.decide(kernels, timer)
    assert built == [prefilter.CALIBRATE]  # the two slowest on PyTorch set the ceiling; the rest are ruled out
    by = {k.key: decisions[k.key]["decided_by"] for k in kernels}
    assert list(by.values()).count("prefilter") == len(kernels) - prefilter.CALIBRATE
    assert by[slowest.key] == "measured" and decisions[slowest.key]["impl"] == "tir"
    skipped = [d for d in decisions.values() if d["decided_by"] == "prefilter"]
    assert all(d["impl"] == "torch" and d["tir_ms"] is None and d["tir_ceiling_gflops"] > 0 for d in skipped)
    # the cached table answers a second compile without building anything
    assert dispatch.DispatchTable("test").decide(kernels, _counting_timer(built)) == decisions
    assert built == [prefilter.CALIBRATE]


@pytest.mark.parametrize("kind, kernel", [
    ("blocked_depthwise", conv2d_kernel((1, 32, 16, 16), (1, 32, 16, 16), 32, (3, 3), (1, 1), (1, 1), (1, 1), 0)),
    ("blocked", conv2d_kernel((1, 32, 16, 16), (1, 24, 16, 16), 1, (1, 1), (1, 1), (0, 0), (1, 1), 0)),
    ("direct", conv2d_kernel((1, 8, 16, 16), (1, 24, 8, 8), 1, (3, 3), (2, 2), (1, 1), (1, 1), 0)),
])
def test_own_kernel_convs_build_only_sparsefx_kernel_not_the_default_tir(monkeypatch, kind, kernel) -> None:
    ran: list[str] = []

    def rigged_time_in_turn(rivals, rounds=None, budget_s=None, between=None, stateless=(), before=None):  # every rival runs; own wins
        for name, runs in rivals.items():
            runs[0]()
            ran.append(name)
        return {name: 0.01 if name == kind else 1e6 for name in rivals}

    monkeypatch.setattr(host, "time_in_turn", rigged_time_in_turn)
    built: list[int] = []
    decision = dispatch.DispatchTable("test").decide([kernel], _counting_timer(built))[kernel.key]
    assert built == [] and decision["decided_by"] == kind and decision["tir_ms"] is None
    assert decision["impl"] == kind and kind in ran and "torch" in ran


def test_time_in_turn_times_each_rival_every_round() -> None:
    counts = [0, 0, 0]

    def rival(i: int) -> None:
        counts[i] += 1
        time.sleep(0.002 if i == 0 else 0.004)

    order = []
    times = time_in_turn({"a": [lambda: rival(0)], "b": [lambda: rival(1), lambda: rival(2)]}, rounds=(4, 4),
                         between=lambda: order.append(list(counts)))
    # every run once to warm up, then `between` once, then four rounds, b's two weight copies taken in turn
    assert set(times) == {"a", "b"} and 2.0 <= times["a"] < times["b"] and times["b"] >= 4.0 and counts == [5, 3, 3]
    assert order == [[1, 1, 1]]


def test_pytorch_is_charged_its_call_overhead_against_tir() -> None:
    overhead = host.call_overhead_ms()
    assert 0 <= overhead < 1.0  # microseconds, not a kernel's worth
    overheads = host.HostTimer(resolve_target("cpu")).overheads()
    assert overheads == {"torch": overhead, "torch_prepacked": overhead}
    assert choose({"torch": 0.050, "tir": 0.050 + overhead / 2}, overheads) == "tir"  # PyTorch faster alone
    assert choose({"torch": 0.050, "tir": 0.050 + overhead + 0.01}, overheads) == "torch"


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


def test_a_stateless_rival_is_warmed_by_its_first_run_only() -> None:
    counts = [0, 0]
    runs = [lambda i=i: counts.__setitem__(i, counts[i] + 1) for i in range(2)]
    seen = []
    time_in_turn({"s": runs}, rounds=(2, 2), between=lambda: seen.append(list(counts)), stateless={"s"})
    assert seen == [[1, 0]] and counts == [2, 1]  # copy 1 is first run in the timed rounds


def test_time_in_turn_counts_the_statistic_asked_for() -> None:
    def timed(statistic):  # noqa: ANN001, ANN202
        pauses = iter([0.0, 0.001, 0.008, 0.001, 0.001, 0.001])  # the warm-up, then five rounds
        return time_in_turn({"a": [lambda: time.sleep(next(pauses))]}, rounds=(5, 5), statistic=statistic)["a"]

    assert timed(min) < 4.0 <= 8.0 <= timed(max)


def test_own_kernels_are_built_only_where_pytorch_does_not_beat_their_ceiling(monkeypatch) -> None:
    monkeypatch.setattr(host.own_kernels, "ALTERNATIVES", {})  # winograd alone (alternatives: below)
    # each kind ran at 10 GFLOP/s at best so far; PyTorch takes 0.1 ms on both convs below
    history = [{"gflop": 1.0, f"{kind}_ms": 100.0, "torch_ms": 1.0} for kind in ("winograd", "blocked_depthwise")
               for _ in range(4)]
    timer = host.HostTimer(resolve_target("cpu"), history=history)
    built = []
    monkeypatch.setattr(host, "build_kernels", lambda pairs, target: {s.name: built.append(s.name) for _, s in pairs})
    monkeypatch.setattr(timer, "time_one", lambda kernel, allowed, mine: {"torch": 0.1, **({mine[0]: 0.2} if mine else {})})
    dense = conv2d_kernel((1, 64, 56, 56), (1, 64, 56, 56), 1, (3, 3), (1, 1), (1, 1), (1, 1), 16)  # 2300 GFLOP/s on PyTorch
    depthwise = conv2d_kernel((1, 96, 56, 56), (1, 96, 56, 56), 96, (3, 3), (1, 1), (1, 1), (1, 1), 16)
    times = timer.time_rivals([dense, depthwise], [None, None])
    assert "winograd" not in times[0] and timer.own_ruled_out[dense.key][0] == "winograd"
    assert "blocked_depthwise" in times[1] and len(built) == 1  # memory-bound: never ruled out by GFLOP/s


@pytest.mark.parametrize("torch_best_ms, own_ms, asked", [
    (0.5, 0.02, ["pytorch", {"winograd"}]),  # PyTorch's ceiling the higher: timed first, the two apart
    (0.5, 0.09, ["pytorch", {"winograd"}, None]),  # near a tie: timed again in turn
    (2.0, 0.02, [{"winograd"}]),  # the own kernel's the higher, and it beats PyTorch's: PyTorch left out
    (2.0, 0.12, [{"winograd"}, "pytorch", None])])
def test_the_side_with_the_lower_ceiling_is_timed_first_and_the_other_only_where_it_may_win(
        monkeypatch, torch_best_ms, own_ms, asked) -> None:
    monkeypatch.setattr(host.own_kernels, "ALTERNATIVES", {})  # winograd alone (alternatives: below)
    # the winograd kernel's ceiling 1000 GFLOP/s, PyTorch's 2000 or 500; the conv is 0.058 GFLOP, PyTorch 0.1 ms on it
    history = [{"gflop": 1.0, "winograd_ms": 1.0, "torch_ms": torch_best_ms}] * 4
    timer = host.HostTimer(resolve_target("cpu"), history=history)
    seen = []
    monkeypatch.setattr(host, "build_kernels", lambda pairs, target: {s.name: None for _, s in pairs})

    def time_one(kernel, allowed, mine):  # noqa: ANN001, ANN202
        seen.append(allowed if mine else "pytorch")
        return {name: ms for name, ms in {"torch": 0.1, "winograd": own_ms}.items()
                if (mine or name == "torch") and (allowed is None or name in allowed)}

    monkeypatch.setattr(timer, "time_one", time_one)
    conv = conv2d_kernel((1, 64, 28, 28), (1, 64, 28, 28), 1, (3, 3), (1, 1), (1, 1), (1, 1), 16)
    times = timer.time_rivals([conv], [None])
    assert seen == asked
    assert times[0] == ({"winograd": own_ms} if len(asked) == 1 else {"torch": 0.1, "winograd": own_ms})
    assert (conv.key in timer.torch_ruled_out) == (len(asked) == 1)
    assert len(timer.history) == 5 and timer.history[-1]["winograd_ms"] == own_ms  # its ceiling's measurements


def test_float32_convs_run_on_a_rewritten_input_and_pytorch_s_on_released_memory(monkeypatch) -> None:
    timed = {"torch": 1.0, "torch_prepacked": 1.1, "direct": 1.1}
    asked, released = {}, []

    def fake_time_in_turn(rivals, before=None, **_):
        asked.clear()
        asked.update({name: (hook, rivals[name][0].args[0]) for name, hook in (before or {}).items()})
        return {name: timed[name] for name in rivals}

    monkeypatch.setattr(host, "time_in_turn", fake_time_in_turn)
    monkeypatch.setattr(host, "release_freed_memory", lambda: released.append(1))
    timer = host.HostTimer(resolve_target("cpu"))
    conv = conv2d_kernel((1, 16, 8, 8), (1, 16, 8, 8), 1, (3, 3), (1, 1), (1, 1), (1, 1), 0)
    mine = ("direct", lambda *args: None, host.own_kernels.own_kernel(conv)[1])
    assert timer.time_one(conv, None, mine) == timed  # nothing charged on top of the timing
    assert set(asked) == set(timed)
    for name, (hook, x) in asked.items():
        x = x if isinstance(x, torch.Tensor) else torch.from_dlpack(x)
        kept, count = x.clone(), len(released)
        with torch.inference_mode():  # as `time_one` runs them
            hook()
        assert torch.equal(x, kept)  # written, unchanged
        assert len(released) - count == (name != "direct")  # only PyTorch's runs release memory
    timer.time_one(matmul_kernel(1, 128, 384, 768, 16), None, None)
    assert asked == {}  # a matmul: timed as it comes


def test_a_release_before_each_run_is_not_timed() -> None:
    calls = []
    times = time_in_turn({"a": [lambda: calls.append("run")]}, rounds=(3, 3),
                         before={"a": lambda: (calls.append("release"), time.sleep(0.05))})
    assert calls == ["run"] + ["release", "run"] * 3  # the warm-up run, then a release before each timed run
    assert times["a"] < 40  # ms: the release's sleep is outside the timing
    host.release_freed_memory()  # callable here, glibc or not


def test_a_matrix_vector_product_is_timed_after_cold_traffic_before_every_run(monkeypatch) -> None:
    asked = {}

    def fake_time_in_turn(rivals, before=None, between=None, **_):
        asked.update(rivals=set(rivals), before=before, between=between)
        return {name: 1.0 for name in rivals}

    monkeypatch.setattr(host, "time_in_turn", fake_time_in_turn)
    timer = host.HostTimer(resolve_target("cpu"))
    gemv = matmul_kernel(1, 1, 256, 512, 16)  # a classifier at batch 1
    mine = ("linear", lambda *args: None, host.own_kernels.own_kernel(gemv)[1])
    timer.time_one(gemv, None, mine)
    assert {"torch", "linear"} <= asked["rivals"] and set(asked["before"]) == asked["rivals"]
    cold = asked["before"]["linear"]
    assert cold.func is asked["between"].func and cold.args == asked["between"].args  # the traffic that evicts the weights
    timer.time_one(matmul_kernel(1, 128, 256, 512, 16), None, None)
    assert asked["before"] is None  # rows that reuse each weight: timed as they come


def test_pytorch_s_ceiling_for_a_conv_is_its_best_on_the_conv_s_family(monkeypatch) -> None:
    monkeypatch.setattr(host.own_kernels, "ALTERNATIVES", {})  # winograd alone (alternatives: below)
    # PyTorch's best over all convs 2000 GFLOP/s, the winograd kernel's 2500: the own kernel is timed first;
    # on the conv's family (the same window and maps, 48 channels) PyTorch ran at 200 GFLOP/s
    conv = conv2d_kernel((1, 64, 28, 28), (1, 64, 28, 28), 1, (3, 3), (1, 1), (1, 1), (1, 1), 16)
    sibling = conv2d_kernel((1, 48, 28, 28), (1, 48, 28, 28), 1, (3, 3), (1, 1), (1, 1), (1, 1), 16)
    strided = conv2d_kernel((1, 64, 56, 56), (1, 64, 28, 28), 1, (3, 3), (2, 2), (1, 1), (1, 1), 16)
    assert prefilter.family(conv) == prefilter.family(sibling) != prefilter.family(strided)
    history = [{"gflop": 1.0, "winograd_ms": 0.4, "torch_ms": 0.5}] * 4
    family_entry = {"gflop": prefilter.gflop(sibling), "torch_ms": prefilter.gflop(sibling) / 200 * 1e3,
                    "family": prefilter.family(sibling)}
    assert prefilter.family_ceilings([*history, family_entry]) == {prefilter.family(conv): pytest.approx(200)}
    monkeypatch.setattr(host, "build_kernels", lambda pairs, target: {s.name: None for _, s in pairs})
    for extra, torch_timed in (([], True), ([family_entry], False)):
        timer = host.HostTimer(resolve_target("cpu"), history=[*history, *extra])
        seen = []

        def time_one(kernel, allowed, mine, seen=seen):  # noqa: ANN001, ANN202
            seen.append(allowed if mine else "pytorch")
            return {"winograd": 0.12} if allowed == {"winograd"} else {"torch": 0.5, "winograd": 0.12}

        monkeypatch.setattr(timer, "time_one", time_one)
        timer.time_rivals([conv], [None])  # the own kernel at 482 GFLOP/s: past 1.25 x 200, short of 1.25 x 2000
        assert ("pytorch" in seen) == torch_timed
        assert (conv.key in timer.torch_ruled_out) != torch_timed
    assert timer.torch_ruled_out[conv.key] == pytest.approx(200)
    assert timer.history[-1]["family"] == prefilter.family(conv)  # recorded for the next convs of its family


def test_a_kernel_asked_ahead_is_built_with_the_call_and_never_again(monkeypatch) -> None:
    timer = host.HostTimer(resolve_target("cpu"))
    batches = []
    monkeypatch.setattr(host, "build_kernels",
                        lambda pairs, target: batches.append([s.name for _, s in pairs]) or {s.name: None for _, s in pairs})
    monkeypatch.setattr(timer, "time_one", lambda kernel, allowed, mine: {
        name: ms for name, ms in {"torch": 0.1, **({mine[0]: 0.05} if mine else {})}.items() if not allowed or name in allowed})
    monkeypatch.setattr(timer, "add_default_tir", lambda *_: None)
    conv = conv2d_kernel((1, 64, 28, 28), (1, 256, 28, 28), 1, (1, 1), (1, 1), (0, 0), (1, 1), 16)
    with_residual = conv.with_epilogue("relu", True)
    timer.time([conv], ahead=[with_residual])
    assert len(batches) == 1 and len(batches[0]) == 2 and batches[0][1].endswith("_relu_res")
    assert timer.time([with_residual], [["blocked"]]) == [{"blocked": 0.05}]
    timer.time([conv])
    assert len(batches) == 1  # both were built by the first call


@pytest.mark.parametrize("blocked_ms, timed", [(1.0, True), (100.0, False)])
def test_blocked_is_timed_beside_winograd_where_its_ceiling_may_win(monkeypatch, blocked_ms, timed) -> None:
    # the blocked kernel's ceiling 1000 or 10 GFLOP/s; winograd runs the 0.014 GFLOP conv in 0.1 ms (144 GFLOP/s)
    history = [{"gflop": 1.0, "blocked_ms": blocked_ms, "torch_ms": 10.0}] * 4
    timer = host.HostTimer(resolve_target("cpu"), history=history)
    seen = []
    monkeypatch.setattr(host, "build_kernels", lambda pairs, target: {s.name: None for _, s in pairs})

    def time_one(kernel, allowed, mine):  # noqa: ANN001, ANN202
        seen.append(allowed if mine else "pytorch")
        return {name: ms for name, ms in {"torch": 0.5, "winograd": 0.1, "blocked": 0.08}.items()
                if (allowed is None and name in ("torch", mine and mine[0])) or (allowed and name in allowed)}

    monkeypatch.setattr(timer, "time_one", time_one)
    conv = conv2d_kernel((1, 64, 14, 14), (1, 64, 14, 14), 1, (3, 3), (1, 1), (1, 1), (1, 1), 16)  # 16 tiles
    assert [kind for kind, _ in own_kernels.own_kernels(conv)] == ["winograd", "blocked"]
    larger = conv2d_kernel((1, 64, 28, 28), (1, 64, 28, 28), 1, (3, 3), (1, 1), (1, 1), (1, 1), 16)  # 49: not contested
    assert [kind for kind, _ in own_kernels.own_kernels(larger)] == ["winograd"]
    times = timer.time_rivals([conv], [None])
    assert ({"blocked"} in seen) == timed
    assert choose(times[0], {}) == ("blocked" if timed else "winograd")
    assert timer.own_kernel(conv, {"blocked"})[0] == "blocked"  # asked for by name: the kind after the first
