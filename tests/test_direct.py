"""Dense k x k conv TIR kernel: equals PyTorch's conv (strides, padding, bias, residual, activation),
and the pass swaps it in."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsefx.backends.tvm.kernels import direct
from sparsefx.backends.tvm.kernels import registry as own_kernels

from .own_kernels_helper import assert_kernels_match_torch, dispatched, with_random_bn_stats

SPECS = [  # (batch, cin, cout, height, width, kernel, stride, padding, activation, residual)
    (1, 5, 12, 9, 9, 3, 1, 1, "relu", True), (2, 3, 7, 11, 12, 3, 2, 1, "none", False),
    (1, 3, 9, 15, 13, 7, 2, 3, "relu", False), (3, 4, 8, 8, 10, 5, 1, 2, "silu", True),
    (1, 6, 16, 10, 10, 3, 1, 0, "relu6", False), (1, 2, 3, 14, 14, 3, 2, 0, "none", True),
    (2, 9, 10, 15, 16, 1, 2, 0, "relu", True),
    # stride 2 over even widths of 32 and more: columns split by shuffles (`phase_planes`)
    (1, 3, 5, 7, 36, 3, 2, 1, "relu", False), (1, 2, 9, 6, 32, 3, 2, 0, "none", True),
    (1, 4, 6, 5, 34, 1, 2, 0, "silu", True),
    # maps with bands of output rows (`banded`): bands of unequal size, stride 2 over shuffled columns, a 7x7
    # window reaching three phase-plane rows below its band, two images
    (1, 2, 5, 17, 40, 3, 1, 1, "relu", True), (1, 3, 8, 40, 36, 3, 2, 1, "relu6", False),
    (1, 3, 8, 30, 30, 7, 2, 3, "relu", False), (2, 4, 9, 24, 20, 3, 1, 1, "silu", True),
    (1, 5, 7, 21, 23, 5, 1, 2, "none", True),
]


pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.mark.parametrize("order", ["by channel", "by position", "banded"])
def test_kernel_matches_torch_conv_with_stride_padding_bias_residual_and_activation(monkeypatch, order) -> None:
    monkeypatch.setattr(direct, "INPUT_IN_CACHE", 1 << 30 if order == "by channel" else 0)  # every loop order
    monkeypatch.setattr(direct, "WEIGHT_IN_CACHE", 1 << 30 if order == "banded" else 0)
    specs = [direct.DirectSpec(*s) for s in SPECS]
    assert sum(s.banded for s in specs) == (5 if order == "banded" else 0)
    for s in specs:
        assert direct.supported((s.stride,) * 2 + (s.padding,) * 2 + (1, 1, 1), s.arg_shapes[:2] + (s.out_shape,))
    assert_kernels_match_torch("direct", specs)

def test_supported_takes_dense_square_unit_or_2_strided_undilated_convs_but_unstrided_1x1() -> None:
    attrs, shapes = (1, 1, 1, 1, 1, 1, 1), ((1, 8, 8, 8), (16, 8, 3, 3), (1, 16, 8, 8))
    assert direct.supported(attrs, shapes)
    assert direct.supported((2, 2, 1, 1, 1, 1, 1), ((1, 8, 16, 16), (16, 8, 3, 3), (1, 16, 8, 8)))
    assert not direct.supported((1, 1, 0, 0, 1, 1, 1), ((1, 8, 8, 8), (16, 8, 1, 1), (1, 16, 8, 8)))  # 1x1
    assert direct.supported((2, 2, 0, 0, 1, 1, 1), ((1, 8, 16, 16), (16, 8, 1, 1), (1, 16, 8, 8)))  # strided 1x1
    assert not direct.supported((1, 1, 1, 1, 1, 1, 2), ((1, 8, 8, 8), (16, 4, 3, 3), (1, 16, 8, 8)))  # grouped
    assert not direct.supported((1, 1, 2, 2, 2, 2, 1), shapes)  # dilated
    assert not direct.supported((3, 3, 1, 1, 1, 1, 1), ((1, 8, 24, 24), (16, 8, 3, 3), (1, 16, 8, 8)))  # stride 3
    assert not direct.supported(attrs, ((1, 8, 3, 3), (16, 8, 3, 3), (1, 16, 3, 3)))  # 15 positions
    assert own_kernels.kind_of(attrs, shapes) == "direct"


class _Block(nn.Module):
    """A strided 3x3 conv + BN + ReLU, then a 3x3 conv + BN + residual add + ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.down, self.bn1 = nn.Conv2d(3, 6, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(6)
        self.conv, self.bn2 = nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.down(x)))
        return F.relu(self.bn2(self.conv(y)) + y)


def test_pass_fuses_bias_residual_and_activation_and_matches_eager() -> None:
    model = with_random_bn_stats(_Block())
    inputs = (torch.randn(2, 3, 17, 15),)
    text, got = dispatched(model, inputs, lambda w: "direct")
    assert "direct_3to6_17x15_k3s2p1_b2_relu" in text and "direct_6to6_9x8_k3s1p1_b2_relu_res" in text
    assert "R.add" not in text and "R.nn.relu" not in text  # all fused in
    with torch.no_grad():
        np.testing.assert_allclose(got, model(*inputs).numpy(), rtol=1e-4, atol=1e-5)


class _TwoBranches(nn.Module):
    """relu(a(x) + b(x)), `a` (first in the add) a 1x1 conv, `b` a 3x3 one."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 6, 1), nn.Conv2d(4, 6, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.a(x) + self.b(x))


def test_pass_fuses_the_add_and_activation_into_the_second_operand_when_the_first_is_not_its() -> None:
    model, inputs = _TwoBranches().eval(), (torch.randn(1, 4, 8, 8),)
    text, got = dispatched(model, inputs, lambda w: "direct" if w.shapes[1][2] == 3 else "torch")
    assert "direct_4to6_8x8_k3s1p1_b1_relu_res" in text and "R.nn.relu" not in text
    with torch.no_grad():
        np.testing.assert_allclose(got, model(*inputs).numpy(), rtol=1e-4, atol=1e-5)


def test_bands_where_the_weight_stays_in_cache_and_the_map_makes_enough_of_them() -> None:
    """ResNet's 3x3 convs: banded on large maps with small weights; not where every band would re-read a
    large weight, nor where the map makes fewer than `MIN_BANDS` bands (two threads get unequal shares)."""
    spec = lambda cin, cout, hw, stride=1: direct.DirectSpec(1, cin, cout, hw, hw, 3, stride, 1, "relu")  # noqa: E731
    assert spec(64, 64, 56).banded and spec(64, 64, 56).bands == direct.BANDS
    assert spec(128, 128, 28).banded and spec(64, 128, 56, stride=2).banded
    assert not spec(256, 256, 14).banded  # 2.4 MB of weight
    assert spec(128, 128, 14).bands < direct.MIN_BANDS and not spec(128, 128, 14).banded
    assert "_bd" in spec(64, 64, 56).name and "_bd" not in spec(256, 256, 14).name
