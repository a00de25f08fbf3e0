"""1x1 conv TIR kernel: equals PyTorch's conv (bias, residual, activation), and the pass swaps it in."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsefx.backends.tvm.kernels import pointwise
from sparsefx.backends.tvm.kernels import registry as own_kernels

from .own_kernels_helper import assert_kernels_match_torch, dispatched, with_random_bn_stats

SPECS = [  # (batch, cin, cout, height, width, activation, residual, scaled): channel and pixel counts off the blocks
    (1, 12, 72, 8, 8, "relu6", False), (2, 5, 3, 7, 7, "relu", True), (1, 20, 13, 9, 5, "silu", False),
    (1, 3, 8, 4, 8, "none", True), (3, 16, 17, 6, 11, "relu", False),
    (2, 40, 12, 8, 8, "none", False, True), (1, 7, 9, 6, 6, "none", True, True), (2, 33, 20, 5, 9, "relu", True, True),
]


pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.mark.parametrize("by_channel", [True, False])
def test_kernel_matches_torch_conv_with_bias_residual_and_activation(monkeypatch, by_channel) -> None:
    monkeypatch.setattr(pointwise, "INPUT_IN_CACHE", 1 << 30 if by_channel else 0)  # both loop orders
    assert_kernels_match_torch("pointwise", [pointwise.PointwiseSpec(*s) for s in SPECS])

def test_supported_takes_only_unstrided_ungrouped_1x1_convs_on_a_whole_pixel_block() -> None:
    shapes = ((1, 8, 8, 8), (16, 8, 1, 1), (1, 16, 8, 8))
    assert pointwise.supported((1, 1, 0, 0, 1, 1, 1), shapes)
    assert not pointwise.supported((2, 2, 0, 0, 1, 1, 1), shapes)  # strided
    assert not pointwise.supported((1, 1, 0, 0, 1, 1, 2), ((1, 8, 8, 8), (16, 4, 1, 1), (1, 16, 8, 8)))  # grouped
    assert not pointwise.supported((1, 1, 1, 1, 1, 1, 1), ((1, 8, 8, 8), (16, 8, 3, 3), (1, 16, 8, 8)))  # 3x3
    assert not pointwise.supported((1, 1, 0, 0, 1, 1, 1), ((1, 8, 4, 4), (16, 8, 1, 1), (1, 16, 4, 4)))  # 16 pixels


class _Bottleneck(nn.Module):
    """1x1 conv + BN (folds into a bias) + residual add + ReLU, then a bias-only 1x1 with SiLU."""

    def __init__(self) -> None:
        super().__init__()
        self.reduce, self.bn = nn.Conv2d(6, 6, 1, bias=False), nn.BatchNorm2d(6)
        self.expand = nn.Conv2d(6, 10, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.expand(F.relu(self.bn(self.reduce(x)) + x)))


def test_pass_fuses_bias_residual_and_activation_and_matches_eager() -> None:
    model = with_random_bn_stats(_Bottleneck())
    inputs = (torch.randn(2, 6, 9, 7),)
    text, got = dispatched(model, inputs, lambda w: "pointwise")
    assert "pointwise_6to6_9x7_b2_relu_res" in text and "pointwise_6to10_9x7_b2_silu" in text
    assert "R.add" not in text and "R.nn.relu" not in text and "R.nn.silu" not in text  # all fused in
    with torch.no_grad():
        np.testing.assert_allclose(got, model(*inputs).numpy(), rtol=1e-4, atol=1e-5)


class _SqueezeExcite(nn.Module):
    """MBConv's tail: squeeze-and-excitation scales the channels, then a 1x1 conv + BN projects."""

    def __init__(self, scale_first: bool) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(24, 6, 1), nn.Conv2d(6, 24, 1)
        self.project, self.bn = nn.Conv2d(24, 10, 1, bias=False), nn.BatchNorm2d(10)
        self.scale_first = scale_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.sigmoid(self.fc2(F.silu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return self.bn(self.project(s * x if self.scale_first else x * s))


@pytest.mark.parametrize("scale_first", [True, False])
def test_pass_folds_the_squeeze_excite_scale_into_the_next_1x1_conv(scale_first) -> None:
    model = with_random_bn_stats(_SqueezeExcite(scale_first))
    inputs = (torch.randn(2, 24, 8, 6),)
    text, got = dispatched(model, inputs, lambda w: own_kernels.kind_of(w.conv_attrs, w.shapes) or "tir")
    assert "pointwise_24to10_8x6_b2_none_scaled" in text and "R.multiply" not in text
    with torch.no_grad():
        np.testing.assert_allclose(got, model(*inputs).numpy(), rtol=1e-4, atol=1e-5)


class _InvertedResiduals(nn.Module):
    """MobileNetV2's `x + block(x)` where x is the previous block's projection (conv + BN, no activation):
    that projection is read by the next block's expansion and by the add."""

    def __init__(self) -> None:
        super().__init__()
        self.project0, self.bn0 = nn.Conv2d(8, 6, 1, bias=False), nn.BatchNorm2d(6)
        self.expand, self.project1 = nn.Conv2d(6, 12, 1), nn.Conv2d(12, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn0(self.project0(x))
        return x + self.project1(F.relu6(self.expand(x)))


@pytest.mark.parametrize("impl", ["pointwise", "torch"])
def test_residual_add_fuses_into_the_conv_no_one_else_reads(impl) -> None:
    """The add fuses into project1, not into project0 (whose output the expansion reads too): project0
    fused there would run twice."""
    model = with_random_bn_stats(_InvertedResiduals())
    inputs = (torch.randn(1, 8, 8, 8),)
    text, got = dispatched(model, inputs, lambda w: impl)
    calls = ["pointwise_" in line or "sparsefx.torch.conv2d" in line for line in text.splitlines()]
    assert sum(calls) == 3, text  # one call per conv
    assert "R.add" not in text and ("12to6_8x8_b1_none_res" in text if impl == "pointwise" else "residual" in text)
    with torch.no_grad():
        np.testing.assert_allclose(got, model(*inputs).numpy(), rtol=1e-4, atol=1e-5)
