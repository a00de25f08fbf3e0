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

CHANNEL_VECTOR_SPECS = [  # output rows of 14 or fewer columns, 16 channels or more (counts off the 16-lane blocks too)
    (1, 16, 7, 7, 5, 1, 2, "relu6"), (2, 37, 14, 14, 3, 1, 1, "silu"), (1, 24, 14, 13, 5, 2, 2, "relu"),
    (1, 20, 9, 6, 3, 1, 0, "none"), (2, 17, 27, 28, 3, 2, 1, "none"),
]


def test_narrow_rows_vectorise_over_channels_and_match_torch_conv() -> None:
    specs = [depthwise.DepthwiseSpec(*s) for s in CHANNEL_VECTOR_SPECS]
    assert all(s.by_channels and s.name.endswith("_cv") for s in specs)
    assert not any(depthwise.DepthwiseSpec(*s).by_channels for s in SPECS)  # fewer than 16 channels
    assert not depthwise.DepthwiseSpec(1, 32, 28, 28, 3, 1, 1).by_channels  # 28-wide output rows
    assert_kernels_match_torch("depthwise", specs, lambda s: s.channels)


ROW_PAIR_SPECS = [  # 3x3 stride 2 over even widths of 32 or more, output rows wider than 14 or few channels
    (1, 3, 9, 40, 3, 2, 1, "silu"), (2, 3, 16, 32, 3, 2, 1, "relu6"), (1, 2, 10, 46, 3, 2, 1, "none"),
    (1, 20, 33, 34, 3, 2, 1, "relu"),
]


def test_stride_2_rows_split_by_shuffles_match_torch_conv() -> None:
    specs = [depthwise.DepthwiseSpec(*s) for s in ROW_PAIR_SPECS]
    assert all(s.by_row_pairs and s.name.endswith("_rp") for s in specs)
    assert not depthwise.DepthwiseSpec(1, 8, 40, 40, 5, 2, 2).by_row_pairs  # 5x5: phase planes
    assert not depthwise.DepthwiseSpec(1, 8, 40, 30, 3, 2, 1).by_row_pairs  # narrower than two vectors
    assert not depthwise.DepthwiseSpec(1, 8, 40, 41, 3, 2, 1).by_row_pairs  # odd width
    assert_kernels_match_torch("depthwise", specs, lambda s: s.channels)


ROW_SPECS = [  # 3x3 stride 1 over rows of more than 16 columns: two vectors overlapping, a shifted last one, three whole
    (1, 3, 5, 17, 3, 1, 1, "relu6"), (2, 4, 9, 40, 3, 1, 1, "silu"), (1, 2, 1, 48, 3, 1, 1, "none"),
    (1, 18, 20, 20, 3, 1, 1, "relu"),
]


def test_stride_1_rows_read_straight_from_the_input_match_torch_conv() -> None:
    specs = [depthwise.DepthwiseSpec(*s) for s in ROW_SPECS]
    assert all(s.by_rows and s.name.endswith("_r") for s in specs)
    assert not depthwise.DepthwiseSpec(1, 4, 16, 16, 3, 1, 1).by_rows  # one vector: both ends at once
    assert not depthwise.DepthwiseSpec(1, 4, 20, 20, 3, 1, 0).by_rows  # no padding: phase planes
    assert_kernels_match_torch("depthwise", specs, lambda s: s.channels)


def test_packed_weight_holds_each_block_of_channels_tap_major() -> None:
    s = depthwise.DepthwiseSpec(1, 20, 7, 7, 3, 1, 1)
    w = np.arange(20 * 9, dtype=np.float32).reshape(20, 1, 3, 3)
    packed = depthwise.pack_weight(s, w)
    assert packed.shape == s.arg_shapes[1] == (2, 3, 3, 16)
    np.testing.assert_array_equal(packed[0, 1, 2], w[:16, 0, 1, 2])
    np.testing.assert_array_equal(packed[1, 2, 0], w[4:, 0, 2, 0])  # the last block shifted back to end at 20


def test_supported_takes_only_plain_depthwise_convs() -> None:
    shapes = ((1, 8, 16, 16), (8, 1, 3, 3), (1, 8, 16, 16))
    assert depthwise.supported((1, 1, 1, 1, 1, 1, 8), shapes)
    assert not depthwise.supported((1, 1, 1, 1, 2, 2, 8), shapes)  # dilated
    assert not depthwise.supported((1, 1, 1, 1, 1, 1, 4), ((1, 8, 16, 16), (8, 2, 3, 3), (1, 8, 16, 16)))  # grouped
    assert not depthwise.supported((3, 3, 1, 1, 1, 1, 8), ((1, 8, 16, 16), (8, 1, 3, 3), (1, 8, 6, 6)))  # stride 3


class _Block(nn.Module):
    """Depthwise conv + BN + ReLU6 (BN folds into a bias), then a pointwise conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.dw, self.bn = nn.Conv2d(channels, channels, 3, 2, 1, groups=channels, bias=False), nn.BatchNorm2d(channels)
        self.pw = nn.Conv2d(channels, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(F.relu6(self.bn(self.dw(x))))


@pytest.mark.parametrize(("channels", "name"), [(12, "depthwise_c12_15x15_k3s2p1_b1_relu6"),
                                              (24, "depthwise_c24_15x15_k3s2p1_b1_relu6_cv")])
def test_pass_swaps_in_the_kernel_with_its_epilogue_and_matches_eager(channels, name) -> None:
    model = with_random_bn_stats(_Block(channels))
    inputs = (torch.randn(1, channels, 15, 15),)
    text, got = dispatched(model, inputs, lambda w: "depthwise" if w.conv_attrs[-1] > 1 else "tir")
    assert name in text and "R.clip" not in text  # bias and ReLU6 fused in
    with torch.no_grad():
        np.testing.assert_allclose(got, model(*inputs).numpy(), rtol=1e-4, atol=1e-5)
