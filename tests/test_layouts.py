"""The latency pass's layout conversions (`cost.layouts`) against what the compiled model runs."""

import re

import pytest
import torch
from torch import nn

import sparsefx
from sparsefx.backends.tvm.fusion import blocked_layout
from sparsefx.backends.tvm.kernels.blocked_layout import FROM_BLOCKED, TO_BLOCKED
from sparsefx.cost.kernel import LAYOUT_IN, LAYOUT_OUT
from sparsefx.cost.latency import analyze_fusion, dense_kernels
from sparsefx.cost.layouts import Conversions
from sparsefx.planning.planner import Planner
from sparsefx.planning.pricing import FLOAT32_RULES, cost_model
from sparsefx.recovery.zoo import SmallResNet


class Inverted(nn.Module):
    """MobileNetV2's shape: a 1x1 expansion, a depthwise 3x3 and a 1x1 projection, with a residual."""

    def __init__(self, width: int = 24, expanded: int = 96) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU6())
        self.expand = nn.Sequential(nn.Conv2d(width, expanded, 1, bias=False), nn.BatchNorm2d(expanded), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(expanded, expanded, 3, 1, 1, groups=expanded, bias=False),
                                nn.BatchNorm2d(expanded), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(expanded, width, 1, bias=False), nn.BatchNorm2d(width))
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.project(self.dw(self.expand(x)))
        return self.head(x.mean(dim=(2, 3)))


class Flat(nn.Module):
    """A conv whose map a classifier reads flattened (NCHW), past a max-pool."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(32 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.stem(x), 1))


def _predicted(model: nn.Module, inputs: tuple) -> list[tuple[str, tuple]]:
    gm = sparsefx.trace(model, inputs)
    conversions = Conversions(gm, analyze_fusion(gm, dense_kernels(gm, 16), FLOAT32_RULES))
    shape = lambda n: n.meta.get("sfx_shape")
    return sorted((k.op, shape(n)) for n in gm.graph.nodes for k in conversions(n, shape, 16, blocked_layout))


def _compiled(model: nn.Module, inputs: tuple) -> list[tuple[str, tuple]]:
    """The conversions the compiled model calls, after checking it computes what the model does."""
    ops = {TO_BLOCKED: LAYOUT_IN, FROM_BLOCKED: LAYOUT_OUT}
    compiled = sparsefx.compile(model, inputs, threads=1, verbose=False)
    with torch.no_grad():
        expected = model(*inputs)
    assert expected.abs().max() > 1e-2 and torch.allclose(compiled(*inputs), expected, rtol=1e-4, atol=1e-4)
    found = []
    for call in compiled.profile(*inputs, repeat=1):
        match = re.fullmatch(rf"({TO_BLOCKED}|{FROM_BLOCKED})_(\d+)x(\d+)x(\d+)x(\d+)", call["name"])
        if match:
            found.append((ops[match.group(1)], tuple(int(v) for v in match.groups()[1:])))
    return sorted(found)


@pytest.mark.parametrize("make, ratio, side, converts", [
    (SmallResNet, 0.0, 28, False), (SmallResNet, 0.5, 28, True), (Inverted, 0.0, 32, False),
    (Inverted, 0.8, 32, True), (Flat, 0.0, 8, True)])
def test_the_conversions_priced_are_the_ones_the_compiled_model_runs(make, ratio, side, converts):
    torch.manual_seed(0)
    model = make().eval()
    inputs = (torch.randn(2, model.stem[0].in_channels, side, side),)
    if ratio:
        model = sparsefx.prune(model, inputs, ratio=ratio)
    predicted = _predicted(model, inputs)
    assert predicted == _compiled(model, inputs)
    # a dense ResNet or MobileNetV2 runs in the layout from its stem to its pooling head; channels pruned
    # under a block of 16 into a 3x3 conv, or under half a block into a 1x1, leave it (SmallResNet: 16 -> 8
    # puts the first stage on the NCHW kernel), and a flatten reads NCHW
    assert bool(predicted) == converts


def test_a_plan_prices_the_conversions_a_reader_changing_layout_brings(monkeypatch, tmp_path):
    """Pruning a conv's input under 16 channels moves it off the layout: its writer's conversion is
    priced, and the search's running total stays the sum a fresh evaluation gives."""
    torch.manual_seed(0)
    model, inputs = SmallResNet().eval(), (torch.randn(2, 1, 28, 28),)
    cost = cost_model("cpu", path=tmp_path / "table.json")
    monkeypatch.setattr(cost, "measured", lambda kernel: kernel.flops / 1e9)
    monkeypatch.setattr(cost, "_calibration", lambda op: [0.0, 10.0])
    planner = Planner(model, inputs, cost=cost)
    search = planner.search
    stem_group = next(g for g in planner.groups if any("stem" in layer for layer in g.layers))
    for units in (2, 4, 8):  # 16 -> 14, 12, 8 channels: all off the layout after the stem
        search.commit(stem_group.id, units)
        assert search.total == pytest.approx(planner.evaluate(search.removed))
    stem = next(n for n in planner.gm.graph.nodes if n.name == "stem_0")
    assert [k.op for k, _ in search.pairs(stem, search.removed)][-1] == LAYOUT_OUT
    assert [k.op for k, _ in search.pairs(stem, {})] == ["conv2d"]
