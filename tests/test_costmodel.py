"""Cost model: staircase rounding, interpolation between measured points, roofline, latency facts."""

import json
import os
import subprocess
import sys
import time
import warnings

import pytest
import torch
from torch import nn

import sparsefx
from sparsefx.backends.tvm.kernels.registry import own_kernel, own_kernels
from sparsefx.backends.tvm.measure.host import HostTimer
from sparsefx.capture.compare import TOLERANCE, check_reference, output_error
from sparsefx.capture.models import load_model
from sparsefx.cli.main import main
from sparsefx.cost import timing
from sparsefx.cost.fusion import EPILOGUE_RULES
from sparsefx.cost.kernel import Kernel, conv2d_kernel, matmul_kernel
from sparsefx.cost.latency import analyze_fusion, annotate_latency, dense_kernels
from sparsefx.cost.model import GUESS_MARGIN, PROBE_PREFIX, CostModel, grid
from sparsefx.cost.timing import PROBES
from sparsefx.planning import planner as planner_module
from sparsefx.planning.plan import Plan
from sparsefx.planning.pricing import RULES, cost_model
from sparsefx.target import resolve_target


def _fake_cost(monkeypatch, tmp_path):
    """A CPU cost model whose 'measurements' are a known function of the shape."""
    cost = cost_model("cpu", path=tmp_path / "table.json")
    calls = []

    def measured(kernel):
        calls.append(kernel.dims)
        return kernel.flops / 1e9

    monkeypatch.setattr(cost, "measured", measured)
    monkeypatch.setattr(cost, "dispatch_overhead", lambda: 0.0)
    return cost, calls


def test_channel_counts_round_up_to_the_vector_width(monkeypatch, tmp_path):
    cost, _ = _fake_cost(monkeypatch, tmp_path)
    ref = matmul_kernel(1, 128, 768, 3072, cost.lanes)
    # 3000 and 3008 output features sit on one step: the staircase makes them cost the same
    a = cost.latency(matmul_kernel(1, 128, 768, 3000, cost.lanes), ref)
    b = cost.latency(matmul_kernel(1, 128, 768, 3008, cost.lanes), ref)
    assert a == b


def test_interpolation_is_exact_for_a_linear_cost_and_only_measures_grid_points(monkeypatch, tmp_path):
    cost, calls = _fake_cost(monkeypatch, tmp_path)
    ref = conv2d_kernel((1, 256, 14, 14), (1, 256, 14, 14), 1, (3, 3), (1, 1), (1, 1), (1, 1), cost.lanes)
    kernel = conv2d_kernel((1, 256, 14, 14), (1, 176, 14, 14), 1, (3, 3), (1, 1), (1, 1), (1, 1), cost.lanes)
    assert cost.latency(kernel, ref) == pytest.approx(kernel.flops / 1e9)
    points = grid(256, cost.lanes)
    assert all(dims[3] in points for dims in calls)


def test_a_layer_of_few_channels_pruned_below_the_vector_lanes_is_priced_smaller(monkeypatch, tmp_path):
    # a 16-channel layer pruned to 4 ran in about a third of its time: not the 16-channel time
    cost, calls = _fake_cost(monkeypatch, tmp_path)
    ref = conv2d_kernel((64, 16, 14, 14), (64, 16, 14, 14), 1, (3, 3), (1, 1), (1, 1), (1, 1), cost.lanes)
    kernel = conv2d_kernel((64, 4, 14, 14), (64, 4, 14, 14), 1, (3, 3), (1, 1), (1, 1), (1, 1), cost.lanes)
    assert cost.latency(kernel, ref) == pytest.approx(kernel.flops / 1e9)
    assert cost.latency(kernel, ref) < cost.latency(ref) / 8


def test_cuda_targets_use_the_roofline_and_never_measure():
    cost = CostModel("cuda:sm_90")
    small = matmul_kernel(1, 64, 768, 768, cost.lanes)
    large = matmul_kernel(1, 4096, 768, 3072, cost.lanes)
    assert 0 < cost.latency(small) < cost.latency(large)
    assert set(cost.sources) == {"roofline"}


class ConvBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()
        self.six = nn.ReLU6()

    def forward(self, x):
        return self.six(self.act(self.bn(self.conv(x)))) * 2


def test_latency_pass_fuses_the_conv_epilogue_and_annotates_every_node():
    model, inputs = ConvBlock().eval(), (torch.randn(1, 8, 32, 32),)
    gm = sparsefx.trace(model, inputs)
    total = annotate_latency(gm, CostModel("cuda:sm_90"))
    fused = {n.name for n in analyze_fusion(gm, dense_kernels(gm, 8)).fused}
    assert {"bn", "act"} <= fused  # BN folds into the conv's bias and ReLU rides in its epilogue
    assert "six" not in fused and "mul" in fused  # ReLU6 starts a TIR kernel; the multiply fuses into it
    assert all("sfx_latency_ms" in n.meta for n in gm.graph.nodes)
    priced = {n.name: n.meta["sfx_latency_ms"] for n in gm.graph.nodes if n.meta["sfx_latency_ms"]}
    assert set(priced) == {"conv", "six"}  # two kernels run: conv+BN+ReLU, then ReLU6 and the multiply
    conv = conv2d_kernel((1, 8, 32, 32), (1, 16, 32, 32), 1, (3, 3), (1, 1), (1, 1), (1, 1), 8)
    assert priced["conv"] == pytest.approx(CostModel("cuda:sm_90").latency(conv))  # the conv priced from its shapes
    assert total == pytest.approx(priced["conv"] + priced["six"])


class ResidualBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.expand, self.bn2, self.act2 = nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6()

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)) + x)
        return self.act2(self.bn2(self.expand(y))) + 1


def test_fusion_records_each_convs_epilogue_as_the_compiled_model_runs_it():
    model, inputs = ResidualBlock().eval(), (torch.randn(1, 8, 16, 16),)
    gm = sparsefx.trace(model, inputs)
    fusion = analyze_fusion(gm, dense_kernels(gm, 8))
    epilogues = {n.name: e for n, e in fusion.epilogues.items()}
    assert epilogues == {"conv": ("relu", True), "expand": ("relu6", False)}
    assert "add_1" not in {n.name for n in fusion.fused}  # nothing after the activation rides in the conv
    total = annotate_latency(gm, CostModel("cuda:sm_90"))
    priced = {n.name: n.meta["sfx_latency_ms"] for n in gm.graph.nodes if n.meta["sfx_latency_ms"]}
    assert set(priced) == {"conv", "expand", "add_1"}  # BN, ReLU, the residual and ReLU6 ride in the convs
    assert total == pytest.approx(sum(priced.values()))


def test_cli_plan_then_apply(tmp_path, capsys):
    plan_file, out = tmp_path / "plan.json", tmp_path / "small"
    assert main(["plan", "default", "--macs-ratio", "0.6", "--out", str(plan_file)]) == 0
    assert "importance retained" in capsys.readouterr().out
    assert main(["apply", "default", str(plan_file), "--out", str(out)]) == 0
    small = sparsefx.load(out)  # a sparsefx.save directory, rebuilt from the spec stored in it
    dense, inputs = load_model("default")
    assert sparsefx.count_macs(small, inputs) <= 0.6 * sparsefx.count_macs(dense, inputs)


def test_cli_apply_refuses_a_bad_edit_and_writes_nothing(tmp_path, capsys):
    plan_file, out = tmp_path / "plan.json", tmp_path / "small.pt"
    assert main(["plan", "default", "--macs-ratio", "0.6", "--out", str(plan_file)]) == 0
    data = json.loads(plan_file.read_text())
    data["entries"][0]["ratio"] = 2.0
    plan_file.write_text(json.dumps(data))
    assert main(["apply", "default", str(plan_file), "--out", str(out)]) == 2
    assert "out of range" in capsys.readouterr().err
    assert not out.exists()


def test_timed_weights_are_distinct_copies_one_per_round():
    copies = timing.weight_copies((64, 64, 3, 3))
    assert len(copies) == timing.ROUNDS[1] and len({c.data_ptr() for c in copies}) == len(copies)
    assert all(c.shape == (64, 64, 3, 3) for c in copies) and not torch.equal(copies[0], copies[1])
    big = timing.weight_copies((timing.COLD_BYTES // 4 // 2 + 1,))  # two do not fit in the pool: fresh tensors
    assert len(big) == 2


def test_cold_traffic_reads_past_the_copies_what_256_copies_spanned(monkeypatch):
    reads = []
    monkeypatch.setattr(timing, "_read", lambda start, end: reads.append((start, end)))
    shape = (16, 16, 3, 3)  # 256 copies fit in the pool
    size = 16 * 16 * 9
    timing.cold_traffic(shape)()
    start, end = reads[-1]
    assert start == timing.ROUNDS[1] * size  # the timed copies stay out of it: they must not be re-warmed
    assert end == 256 * size  # with the copies: the span 256 copies covered
    timing.cold_traffic((timing.COLD_BYTES // 4 // 8,))()  # 8 copies fill the pool: up to its end, no further
    assert reads[-1] == (8 * (timing.COLD_BYTES // 4 // 8), timing.COLD_BYTES // 4)


def test_depthwise_1x1_and_dense_convs_are_also_timed_on_sparsefx_kernels(monkeypatch, tmp_path):
    cost = CostModel("cpu", path=tmp_path / "table.json", timer=HostTimer(resolve_target("cpu")))
    monkeypatch.setattr(cost, "_calibration", lambda entry: [1e-6, 1e3])
    measure = cost.timer.time_rivals

    def torch_absurdly_slow(kernels, wanted, ahead=()):
        times = measure(kernels, wanted, ahead)
        for t in times:
            t.update({impl: ms + 1e3 for impl, ms in t.items() if impl.startswith("torch")})
        return times

    monkeypatch.setattr(cost.timer, "time_rivals", torch_absurdly_slow)
    depthwise = conv2d_kernel((1, 32, 16, 16), (1, 32, 16, 16), 32, (3, 3), (1, 1), (1, 1), (1, 1), cost.lanes)
    kind, spec = own_kernel(depthwise.with_epilogue("relu6", False))
    assert kind == "blocked_depthwise" and spec.activation == "relu6"
    assert own_kernel(depthwise.with_epilogue("relu", True)) is None  # a residual stays PyTorch's
    pointwise = conv2d_kernel((1, 32, 16, 16), (1, 24, 16, 16), 1, (1, 1), (1, 1), (0, 0), (1, 1), cost.lanes)
    kind, spec = own_kernel(pointwise.with_epilogue("relu", True))  # fuses the residual
    assert kind == "blocked" and spec.residual and spec.activation == "relu" and spec.kernel == 1
    dense = conv2d_kernel((1, 32, 16, 16), (1, 32, 16, 16), 1, (3, 3), (1, 1), (1, 1), (1, 1), cost.lanes)
    kind, spec = own_kernel(dense.with_epilogue("relu", True))
    assert kind == "winograd" and spec.residual  # an unstrided 3x3 (test_winograd)
    dilated = conv2d_kernel((1, 32, 16, 16), (1, 32, 16, 16), 1, (3, 3), (1, 1), (2, 2), (2, 2), cost.lanes)
    assert own_kernel(dilated) is None
    for kernel in (depthwise, pointwise.with_epilogue("relu", True), dense):
        assert 0 < cost.time_now(kernel) < 1e3
    picked = cost.implementations([depthwise, pointwise, dense])
    assert picked[:2] == ["blocked_depthwise", "blocked"]
    # 16 tiles: contested, `blocked` timed beside `winograd` and the faster taken (`registry.ALTERNATIVES`)
    assert [kind for kind, _ in own_kernels(dense)] == ["winograd", "blocked"] and picked[2] in ("winograd", "blocked")
    # no own kernel runs a dilated conv: with PyTorch that slow the dispatch builds TVM's default schedule,
    # and the cost model prices what the dispatch picks
    assert cost.implementations([dilated]) == ["tir"] and 0 < cost.time_now(dilated) < 1e3


@pytest.mark.slow
def test_cli_optimize_replans_until_measured_and_writes_everything(tmp_path, capsys):
    # three convs from a file spec, not the default ResNet: planning times every candidate kernel
    spec = f"{tmp_path / 'convs.py'}:build"
    (tmp_path / "convs.py").write_text(
        "from torch import nn\n\ndef build():\n    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), "
        "nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), "
        "nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))\n")
    out = tmp_path / "opt"
    assert main(["optimize", spec, "--input-shape", "1,3,16,16", "--speedup", "1.3", "--rounds", "2", "--repeat", "4",
                 "--threads", "1", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["model", "model.sfx", "plan.json", "report.json"]
    report = json.loads((out / "report.json").read_text())
    rounds = report["measured_planning"]["rounds"]
    assert 1 <= len(rounds) <= 2 and rounds[-1]["planned_ms"] < rounds[-1]["dense_ms"]
    dense, _ = load_model(spec, input_shape=(1, 3, 16, 16))  # the written model is the smaller one, counted afresh
    inputs = (torch.randn(1, 3, 16, 16),)
    optimized = sparsefx.load(out / "model", model=spec)  # sparsefx.save: rebuilt from the spec, never unpickled
    assert sparsefx.count_macs(optimized, inputs) < sparsefx.count_macs(dense, inputs)
    # the saved model is the one that was compiled: same output as the artifact beside it
    error = output_error(check_reference(optimized, inputs), sparsefx.load(out / "model.sfx")(*inputs))
    assert error.relative_l2 < TOLERANCE
    assert Plan.load(out / "plan.json").measured == report["measured_planning"]
    printed = capsys.readouterr().out
    assert "measured on this host" in printed and "model/ (safetensors + JSON, no pickle" in printed


@pytest.mark.slow
def test_a_plan_warns_when_the_machine_no_longer_runs_at_the_speed_its_tables_say(tmp_path):
    # two convs: the planner prices one channel group, so the test times the probes, not a network
    torch.manual_seed(0)
    # (wide enough that the compute, not the call, dominates: 1.1x is within reach of pruning it)
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1)).eval()
    inputs = (torch.randn(1, 3, 32, 32),)
    path = tmp_path / "table.json"
    cost = cost_model("cpu", path=path)
    probes = cost.drift()  # a new table takes its probes into it: nothing has moved yet
    assert len(probes) == 2 and all(then == now for _, then, now in probes) and len(cost.table) == 2
    now = {name: ms for name, _, ms in probes}
    assert set(now) == set(PROBES) and now["matmul"] != now["memory add"]  # both really timed, each its own op
    cost.save()
    stale = cost_model("cpu", path=path)
    for key in stale.table:
        stale.table[key] /= 3  # as if measured when the machine ran three times faster
    with pytest.warns(UserWarning, match="re-measure"):
        sparsefx.plan(model, inputs, speedup=1.1, cost=stale, verbose=False)


class RefusingTimer:
    """A timer that must not be asked: the drift probes time PyTorch's ops themselves."""

    device = ""
    free_epilogues: dict = {}

    def time(self, kernels, implementations=None, ahead=()):  # noqa: ANN001, ANN201
        raise AssertionError("a drift probe went through the timer")

    def overheads(self) -> dict[str, float]:
        return {}

    def calibrate(self) -> dict[str, list[float]]:
        return {}


def test_drift_probes_keep_references_of_their_own_apart_from_the_timer(tmp_path):
    cost = CostModel("cpu", path=tmp_path / "table.json", timer=RefusingTimer())
    first = cost.drift()
    assert [name for name, _, _ in first] == list(PROBES)
    assert all(then == now > 0 for _, then, now in first)  # a new table takes its references now
    assert all(key.startswith(PROBE_PREFIX) for key in cost.table)
    cost.save()
    again = CostModel("cpu", path=tmp_path / "table.json", timer=RefusingTimer())
    assert [then for _, then, _ in again.drift()] == [now for _, _, now in first]  # compared with those


class SqueezeExcite(nn.Module):
    """A depthwise conv, a squeeze-excite scale of its output, and the 1x1 projection the scale feeds."""

    def __init__(self) -> None:
        super().__init__()
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), nn.SiLU())
        self.fc1, self.fc2 = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.project = nn.Conv2d(16, 24, 1, bias=False)

    def forward(self, x):
        y = self.dw(x)
        scale = torch.sigmoid(self.fc2(torch.nn.functional.silu(self.fc1(torch.nn.functional.adaptive_avg_pool2d(y, 1)))))
        return self.project(scale * y)


@pytest.mark.parametrize("side, folds", [(16, True), (4, False)])  # the pointwise kernel needs 32+ pixels
def test_squeeze_excite_scale_folds_into_the_next_1x1_conv_where_the_backend_folds_it(side, folds):
    gm = sparsefx.trace(SqueezeExcite().eval(), (torch.randn(1, 16, side, side),))
    kernels = dense_kernels(gm, 8)
    mul = next(n for n in gm.graph.nodes if n.name == "mul")
    assert mul not in analyze_fusion(gm, kernels).fused  # without the fold the multiply is a kernel of its own
    assert (mul in analyze_fusion(gm, kernels, RULES).fused) == folds
    priced = {}
    for rules in (EPILOGUE_RULES, RULES):
        annotate_latency(gm, CostModel("cpu", measure=False, fusion=rules))
        priced[rules] = mul.meta["sfx_latency_ms"]
    assert priced[EPILOGUE_RULES] > 0 and (priced[RULES] == 0) == folds


class RecordingTimer:
    """PyTorch at 1 ms and the own 1x1 kernel at 0.5 ms, a fused residual add 0.25 ms more; records
    the kernels each call asked about."""

    device = ""
    free_epilogues = {"pointwise": ("none", "relu", "relu6")}

    def __init__(self) -> None:
        self.asked: list[list[str]] = []

    def time(self, kernels, implementations=None, ahead=()):  # noqa: ANN001, ANN201
        self.asked.append([k.key for k in kernels])
        offered = {"torch": 1.0, "pointwise": 0.5}
        return [{name: ms + 0.25 * kernel.epilogue[1] for name, ms in offered.items()
                 if implementations is None or name in implementations[i]} for i, kernel in enumerate(kernels)]

    def overheads(self) -> dict[str, float]:
        return {}

    def calibrate(self) -> dict[str, list[float]]:
        return {"elementwise": [0.002, 10.0], "reduce": [0.002, 10.0], "pool": [0.002, 10.0]}


def test_an_epilogue_the_chosen_kernel_applies_for_free_is_priced_without_timing_it_again(tmp_path):
    timer = RecordingTimer()
    cost = CostModel("cpu", path=tmp_path / "table.json", timer=timer)
    bare = conv2d_kernel((1, 32, 16, 16), (1, 24, 16, 16), 1, (1, 1), (1, 1), (0, 0), (1, 1), cost.lanes)
    relu, residual = (Kernel(bare.op, bare.dims, (*bare.attrs, 1, add), bare.steps) for add in (0, 1))
    assert relu.epilogue == ("relu", False) and residual.epilogue == ("relu", True)
    ms = cost.time_all([relu, residual])
    assert timer.asked == [[bare.key, bare.key], [residual.key]]  # decided on the bare conv; only the add timed again
    assert ms[0] == pytest.approx(0.5, abs=1e-3) and ms[1] == pytest.approx(0.75, abs=1e-3)


def test_neighbours_cores_sees_a_process_spinning_beside_it():
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        busy = timing.neighbours_cores()
    finally:
        spinner.kill()
        spinner.wait()
    assert busy is not None and busy >= 0.6


class FlopsTimer(RecordingTimer):
    """PyTorch alone, at a millisecond per GFLOP: pruning pays as the planner expects."""

    def time(self, kernels, implementations=None, ahead=()):  # noqa: ANN001, ANN201
        return [{"torch": (kernel.flops + 1e6) / 1e9} for kernel in kernels]


def test_a_plan_warns_when_other_processes_take_the_cores_it_plans_for(monkeypatch, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1)).eval()
    inputs = (torch.randn(1, 3, 16, 16),)
    for busy, warned in ((0.0, False), (float(os.cpu_count()), True)):
        monkeypatch.setattr(planner_module, "neighbours_cores", lambda busy=busy: busy)
        cost = CostModel("cpu", path=tmp_path / f"table{busy}.json", timer=FlopsTimer())  # new: no probe drift
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sparsefx.plan(model, inputs, speedup=1.1, cost=cost, verbose=False)
        assert any("other processes keep" in str(w.message) for w in caught) == warned


class CountingFlopsTimer(FlopsTimer):
    """`FlopsTimer`, counting the kernels it times: a kernel's time falls more slowly than its work."""

    def __init__(self) -> None:
        super().__init__()
        self.timed = 0

    def time(self, kernels, implementations=None, ahead=()):  # noqa: ANN001, ANN201
        self.timed += len(kernels)
        return super().time(kernels, implementations)


def test_an_estimate_measures_nothing_guesses_low_and_is_the_latency_once_measured(tmp_path):
    timer = CountingFlopsTimer()
    cost = CostModel("cpu", path=tmp_path / "table.json", timer=timer)
    conv = lambda cout: conv2d_kernel((1, 256, 14, 14), (1, cout, 14, 14), 1, (3, 3), (1, 1), (1, 1), (1, 1), 16)
    ref, half, less = conv(256), conv(128), conv(96)
    dense = cost.latency(ref)
    timed = timer.timed
    guess, exact = cost.estimate(half, ref)
    assert not exact and timer.timed == timed  # nothing measured for a guess
    assert guess == pytest.approx(GUESS_MARGIN * dense * half.flops / ref.flops)  # scaled from the nearest measured: the reference
    assert guess < cost.latency(half, ref)  # a kernel's fixed costs do not shrink: the guess is low
    assert cost.estimate(half, ref) == (cost.latency(half, ref), True)
    guess, exact = cost.estimate(less, ref)  # now scaled from the 128-channel point, nearer above it
    assert not exact and guess == pytest.approx(GUESS_MARGIN * cost.latency(half, ref) * less.flops / half.flops)


def test_a_search_on_guesses_takes_the_moves_a_fully_measured_one_takes_and_measures_less(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 96, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(96, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 32, 1)).eval()
    inputs = (torch.randn(1, 3, 16, 16),)
    plans, timed = [], []
    for guessing in (True, False):
        timer = CountingFlopsTimer()
        cost = CostModel("cpu", path=tmp_path / f"table{guessing}.json", timer=timer)
        if not guessing:  # every move measured before it is weighed
            cost.estimate = lambda kernel, reference=None, cost=cost: (cost.latency(kernel, reference), True)
        plan = sparsefx.plan(model, inputs, speedup=1.6, cost=cost, verbose=False)
        plans.append([(e.name, e.ratio) for e in plan.entries])
        timed.append(timer.timed)
    assert plans[0] == plans[1] and plans[0]
    assert timed[0] < timed[1]
