"""The per-op-class pruning bound against counts written out by hand for a small model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsefx.capture.trace import trace
from sparsefx.cost.bounds import CLASSES, pruning_bound

PIXELS = 8 * 8


class Small(nn.Module):
    """1x1 conv, depthwise 3x3, ReLU, 3x3 conv, mean, linear: one node of every op class."""

    def __init__(self, hidden: int, out: int) -> None:
        super().__init__()
        self.expand = nn.Conv2d(3, hidden, 1, bias=False)
        self.depthwise = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False)
        self.conv = nn.Conv2d(hidden, out, 3, padding=1, bias=False)
        self.fc = nn.Linear(out, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.depthwise(self.expand(x)))
        return self.fc(self.conv(x).mean((2, 3)))


def _macs(hidden: int, out: int) -> dict[str, int]:
    return {"conv1x1": PIXELS * hidden * 3, "depthwise": PIXELS * hidden * 9, "conv_kxk": PIXELS * out * hidden * 9,
            "matmul": out * 4}


@pytest.mark.parametrize("method", ["fx", "export"])  # module calls, and the aten spellings
def test_bound_per_class_matches_hand_counts(method: str) -> None:
    torch.manual_seed(0)
    x = (torch.randn(1, 3, 8, 8),)
    dense = trace(Small(16, 8).eval(), x, method)
    pruned = trace(Small(8, 4).eval(), x, method)  # hidden channels halved, the 3x3 conv's outputs too
    shares = {"conv1x1": 0.1, "conv_kxk": 0.4, "matmul": 0.1, "depthwise": 0.2, "elementwise": 0.2}
    bound = pruning_bound(dense, pruned, shares=shares)
    # MACs classes by MACs; depthwise and element-wise (ReLU over hidden x pixels, mean over out) by elements
    d, p = _macs(16, 8), _macs(8, 4)
    expected = {"conv1x1": p["conv1x1"] / d["conv1x1"], "conv_kxk": p["conv_kxk"] / d["conv_kxk"],
                "matmul": p["matmul"] / d["matmul"], "depthwise": (8 * PIXELS) / (16 * PIXELS),
                "elementwise": (8 * PIXELS + 4) / (16 * PIXELS + 8)}
    assert bound.ratios == pytest.approx(expected)
    assert bound.ratios["conv_kxk"] == pytest.approx(0.25)  # both widths halved
    assert bound.macs == pytest.approx(sum(d.values()) / sum(p.values()))
    assert bound.per_class == pytest.approx(1 / sum(shares[k] * expected[k] for k in shares))


def test_roofline_shares_cover_every_class_and_bound_the_speedup() -> None:
    x = (torch.randn(1, 3, 8, 8),)
    dense, pruned = trace(Small(16, 8).eval(), x), trace(Small(8, 4).eval(), x)
    bound = pruning_bound(dense, pruned, flops_per_byte=10.0)
    assert set(bound.shares) == set(CLASSES) and sum(bound.shares.values()) == pytest.approx(1.0)
    assert 1 / max(bound.ratios.values()) <= bound.per_class <= 1 / min(bound.ratios.values())
    # a machine with less bandwidth per FLOP weighs memory-bound (channel-ratio) work more: a lower bound
    assert pruning_bound(dense, pruned, flops_per_byte=1000.0).per_class < pruning_bound(
        dense, pruned, flops_per_byte=0.01).per_class
