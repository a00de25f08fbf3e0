"""Depthwise TIR kernel: equals PyTorch's conv (with bias and activation), and the pass swaps it in."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsefx.backends.tvm.kernels import depthwise

from .own_kernels_helper import assert_kernels_match_torch, dispatched, with_random_bn_stats

SPECS = [  # (batch, channels, height, width, kernel, stride, padding, activation)
    (1, 8, 16, 16, 3, 1, 1, "relu6"), (2, 5, 15, 13, 3, 2, 1, "relu"), (1, 4, 7, 7, 5, 1, 2, "silu"),
    (1, 3, 14, 14, 5, 2, 2, "none"), (1, 6, 9, 11, 3, 1, 0, "none"), (1, 2, 6, 6, 3, 2, 1, "relu6"),
    # stride 2 over even widths of 32 and more: columns split by shuffles (`phase_planes`), last step shifted back
    (1, 3, 9, 40, 3, 2, 1, "silu"), (2, 2, 7, 64, 5, 2, 2, "none"),
]


pytestmark = pytest.mark.usefixtures("private_cache")


def test_kernel_matches_torch_conv_with_bias_and_activation() -> None:
    assert_kernels_match_torch("depthwise", [depthwise.DepthwiseSpec(*s) for s in SPECS], lambda s: s.channels)

def test_supported_takes_only_plain_depthwise_convs() -> None:
    shapes = ((1, 8, 16, 16), (8, 1, 3, 3), (1, 8, 16, 16))
    assert depthwise.supported((1, 1, 1, 1, 1, 1, 8), shapes)
    assert not depthwise.supported((1, 1, 1, 1, 2, 2, 8), shapes)  # dilated
    assert not depthwise.supported((1, 1, 1, 1, 1, 1, 4), ((1, 8, 16, 16), (8, 2, 3, 3), (1, 8, 16, 16)))  # grouped
    assert not depthwise.supported((3, 3, 1, 1, 1, 1, 8), ((1, 8, 16, 16), (8, 1, 3, 3), (1, 8, 6, 6)))  # stride 3


class _Block(nn.Module):
    """Depthwise conv + BN + ReLU6 (BN folds into a bias), then a pointwise conv."""

    def __init__(self) -> None:
        super().__init__()
        self.dw, self.bn = nn.Conv2d(12, 12, 3, 2, 1, groups=12, bias=False), nn.BatchNorm2d(12)
        self.pw = nn.Conv2d(12, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(F.relu6(self.bn(self.dw(x))))


def test_pass_swaps_in_the_kernel_with_its_epilogue_and_matches_eager() -> None:
    model = with_random_bn_stats(_Block())
    inputs = (torch.randn(1, 12, 15, 15),)
    text, got = dispatched(model, inputs, lambda w: "depthwise" if w.conv_attrs[-1] > 1 else "tir")
    assert "depthwise_c12_15x15_k3s2p1_b1_relu6" in text and "R.clip" not in text  # bias and ReLU6 fused in
    with torch.no_grad():
        np.testing.assert_allclose(got, model(*inputs).numpy(), rtol=1e-4, atol=1e-5)
