"""Cost model: staircase rounding, interpolation between measured points, roofline, latency facts."""

import json

import pytest
import torch
from torch import nn

import sparsefx
from sparsefx.capture.models import load_model
from sparsefx.cli.main import main
from sparsefx.cost.latency import analyze_fusion, annotate_latency, dense_kernels
from sparsefx.cost.model import CostModel, _grid, conv2d_kernel, matmul_kernel
from sparsefx.planning.plan import Plan
from sparsefx.target import resolve_target


def _fake_cost(monkeypatch, tmp_path):
    """A CPU cost model whose 'measurements' are a known function of the shape."""
    cost = CostModel(resolve_target("cpu"), path=tmp_path / "table.json")
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
    grid = _grid(256, cost.lanes)
    assert all(dims[3] in grid for dims in calls)


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
    assert total == pytest.approx(sum(n.meta["sfx_latency_ms"] for n in gm.graph.nodes))
    assert gm.graph.find_nodes(op="call_module", target="conv")[0].meta["sfx_latency_ms"] > 0


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
    priced = CostModel("cuda:sm_90")
    total = annotate_latency(gm, priced)
    assert total > 0 and gm.graph.find_nodes(op="call_module", target="act2")[0].meta["sfx_latency_ms"] == 0


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


def test_timed_weights_are_distinct_copies_spanning_the_cold_region():
    from sparsefx.cost.model import COLD_BYTES, weight_copies

    copies = weight_copies((64, 64, 3, 3))
    assert len(copies) >= 2 and len({c.data_ptr() for c in copies}) == len(copies)
    assert all(c.shape == (64, 64, 3, 3) for c in copies) and not torch.equal(copies[0], copies[1])
    big = weight_copies((COLD_BYTES // 4 // 2 + 1,))  # two do not fit in the pool: fresh tensors
    assert len(big) == 2


def test_output_write_is_charged_up_to_the_l2(monkeypatch, tmp_path):
    from sparsefx.cost.model import l2_bytes

    cost = CostModel(resolve_target("cpu"), path=tmp_path / "table.json")
    monkeypatch.setattr(cost, "_calibration", lambda entry: [10.0])  # 10 GB/s cold writes
    small = conv2d_kernel((1, 8, 8, 8), (1, 8, 8, 8), 1, (3, 3), (1, 1), (1, 1), (1, 1), cost.lanes)
    assert cost.output_ms(small) == pytest.approx(4 * 8 * 8 * 8 / 10e9 * 1e3)
    huge = matmul_kernel(1, 4096, 64, 4096, cost.lanes)
    assert cost.output_ms(huge) == pytest.approx(l2_bytes() / 10e9 * 1e3)


def test_depthwise_1x1_and_dense_convs_are_also_timed_on_sparsefx_kernels(monkeypatch, tmp_path):
    from sparsefx.cost import model as costmodel

    cost = CostModel(resolve_target("cpu"), path=tmp_path / "table.json")
    monkeypatch.setattr(cost, "_calibration", lambda entry: {"cold_write": [1e9]}.get(entry, [1e-6, 1e3]))
    monkeypatch.setattr(costmodel, "time_kernel", lambda kernel: 1e3)  # PyTorch absurdly slow
    depthwise = conv2d_kernel((1, 32, 16, 16), (1, 32, 16, 16), 32, (3, 3), (1, 1), (1, 1), (1, 1), cost.lanes)
    kind, spec = costmodel.own_kernel_spec(depthwise.with_epilogue("relu6", False))
    assert kind == "depthwise" and spec.activation == "relu6"
    assert costmodel.own_kernel_spec(depthwise.with_epilogue("relu", True)) is None  # a residual stays PyTorch's
    pointwise = conv2d_kernel((1, 32, 16, 16), (1, 24, 16, 16), 1, (1, 1), (1, 1), (0, 0), (1, 1), cost.lanes)
    kind, spec = costmodel.own_kernel_spec(pointwise.with_epilogue("relu", True))  # fuses the residual
    assert kind == "pointwise" and spec.residual and spec.activation == "relu"
    dense = conv2d_kernel((1, 32, 16, 16), (1, 32, 16, 16), 1, (3, 3), (1, 1), (1, 1), (1, 1), cost.lanes)
    kind, spec = costmodel.own_kernel_spec(dense.with_epilogue("relu", True))
    assert kind == "direct" and spec.residual and spec.kernel == 3
    dilated = conv2d_kernel((1, 32, 16, 16), (1, 32, 16, 16), 1, (3, 3), (1, 1), (2, 2), (2, 2), cost.lanes)
    assert costmodel.own_kernel_spec(dilated) is None
    for kernel in (depthwise, pointwise.with_epilogue("relu", True), dense):
        assert 0 < cost.time_now(kernel) < 1e3
    assert cost.time_now(dilated) >= 1e3


def test_cli_optimize_replans_until_measured_and_writes_everything(tmp_path, capsys):
    out = tmp_path / "opt"
    assert main(["optimize", "default", "--speedup", "1.3", "--rounds", "2", "--repeat", "4", "--threads", "1",
                 "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["model.pt", "model.sfx", "plan.json", "report.json"]
    report = json.loads((out / "report.json").read_text())
    rounds = report["measured_planning"]["rounds"]
    assert 1 <= len(rounds) <= 2 and all(r["dense_ms"] > 0 and r["planned_ms"] > 0 for r in rounds)
    assert Plan.load(out / "plan.json").measured == report["measured_planning"]
    assert "measured on this host" in capsys.readouterr().out


def test_a_plan_warns_when_the_machine_no_longer_runs_at_the_speed_its_tables_say(tmp_path):
    model, inputs = load_model("default", input_shape=(1, 3, 32, 32))
    path = tmp_path / "table.json"
    cost = CostModel("cpu", path=path)
    probes = cost.drift()  # a new table takes its probes into it: nothing has moved yet
    assert len(probes) == 2 and all(then == now > 0 for _, then, now in probes) and len(cost.table) == 2
    cost.save()
    stale = CostModel("cpu", path=path)
    for key in stale.table:
        stale.table[key] /= 3  # as if measured when the machine ran three times faster
    with pytest.warns(UserWarning, match="re-measure"):
        sparsefx.plan(model, inputs, speedup=1.1, cost=stale, verbose=False)
