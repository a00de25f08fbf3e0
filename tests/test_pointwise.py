"""1x1 conv TIR kernel: equals PyTorch's conv (bias, residual, activation), and the pass swaps it in."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsefx.backends.tvm.kernels import pointwise

from .own_kernels_helper import assert_kernels_match_torch, dispatched, with_random_bn_stats

SPECS = [  # (batch, cin, cout, height, width, activation, residual, scaled): channel and pixel counts off the blocks
    (1, 12, 72, 8, 8, "relu6", False), (2, 5, 3, 7, 7, "relu", True), (1, 20, 13, 9, 5, "silu", False),
    (1, 3, 8, 4, 8, "none", True), (3, 16, 17, 6, 11, "relu", False),
    (2, 40, 12, 8, 8, "none", False, True), (1, 7, 9, 6, 6, "none", True, True), (2, 33, 20, 5, 9, "relu", True, True),
]


pytestmark = pytest.mark.usefixtures("private_cache")


def split_into_bands(monkeypatch: pytest.MonkeyPatch, banded: bool) -> None:
    """Both task orders: every pixel block a band of its own, or channel blocks outermost."""
    monkeypatch.setattr(pointwise, "BAND_INPUT", 64 if banded else 1 << 30)
    monkeypatch.setattr(pointwise, "INPUT_IN_CACHE", 0)


@pytest.mark.parametrize("banded", [True, False])
def test_kernel_matches_torch_conv_with_bias_residual_and_activation(monkeypatch, banded) -> None:
    split_into_bands(monkeypatch, banded)
    assert_kernels_match_torch("pointwise", [pointwise.PointwiseSpec(*s) for s in SPECS])

CHANNEL_VECTOR_SPECS = [  # small maps: vectorised over output channels (counts off the 32-channel blocks too)
    (1, 40, 64, 7, 7, "relu", False), (2, 24, 96, 14, 14, "none", True), (1, 17, 60, 6, 9, "relu6", True),
    (1, 64, 32, 11, 3, "silu", False), (2, 40, 64, 7, 7, "none", False, True), (1, 9, 96, 5, 10, "relu", True, True),
]


@pytest.mark.parametrize("banded", [True, False])
def test_small_maps_vectorise_over_channels_and_match_torch_conv(monkeypatch, banded) -> None:
    split_into_bands(monkeypatch, banded)
    specs = [pointwise.PointwiseSpec(*s) for s in CHANNEL_VECTOR_SPECS]
    assert all(s.by_channels and s.name.endswith("_cv") for s in specs)
    assert_kernels_match_torch("pointwise", specs)


PACKED_SPECS = [  # bands copied before their blocks: channel and pixel counts off the blocks, several images
    (2, 5, 13, 9, 7, "relu", True), (3, 16, 8, 6, 11, "none", False), (1, 9, 20, 13, 5, "relu6", True),
    (2, 70, 3, 12, 12, "none", True),
]


def test_bands_copied_before_their_blocks_match_torch_conv(monkeypatch) -> None:
    split_into_bands(monkeypatch, True)
    monkeypatch.setattr(pointwise, "PACKED_MIN_CIN", 1)
    monkeypatch.setattr(pointwise, "PACKED_MIN_BLOCKS", 1)
    monkeypatch.setattr(pointwise, "TASKS", 2)
    specs = [pointwise.PointwiseSpec(*s) for s in PACKED_SPECS]
    assert all(s.packs_bands and s.name.endswith("_pk") for s in specs)
    assert_kernels_match_torch("pointwise", specs)


def test_bands_copied_only_for_large_inputs_with_many_channels() -> None:
    assert pointwise.PointwiseSpec(8, 256, 64, 56, 56).packs_bands  # 26 MB of input from memory
    assert pointwise.PointwiseSpec(1, 256, 64, 112, 112).packs_bands
    assert not pointwise.PointwiseSpec(1, 256, 64, 56, 56).packs_bands  # 13 bands: too few tasks for the threads
    assert not pointwise.PointwiseSpec(8, 32, 96, 112, 112).packs_bands  # too few input channels to pay for the copy
    assert not pointwise.PointwiseSpec(8, 96, 16, 56, 56).packs_bands  # too few channel blocks to share it
    assert not pointwise.PointwiseSpec(8, 256, 64, 56, 56, scaled=True).packs_bands
    assert not pointwise.PointwiseSpec(8, 576, 96, 14, 14).packs_bands  # vectorised over channels


def test_bands_only_where_the_input_is_large_and_the_weight_stays_in_cache() -> None:
    mb = 1 << 20
    assert pointwise.bands(98, 3 * mb, 64 << 10) == 12  # 256 -> 64 at 56x56: a quarter MB of input per band
    assert pointwise.bands(98, 3 * mb, 4 * mb) == 1  # every band would read a weight from memory again
    assert pointwise.bands(98, 128 << 10, 64 << 10) == 1  # the input comes from cache anyway
    assert pointwise.bands(7, 600 << 10, 64 << 10) == 1  # 3 and 4 pixel blocks: one thread would wait
    assert pointwise.bands(5, 3 * mb, 64 << 10) == 5  # an input in memory: bands even where unequal


def test_channel_vectorised_where_fewer_lanes_are_wasted() -> None:
    assert pointwise.PointwiseSpec(1, 512, 2048, 7, 7).by_channels  # 49 pixels: 2 x 32-pixel blocks
    assert pointwise.PointwiseSpec(1, 256, 1024, 14, 14).pixel_block == 14
    assert not pointwise.PointwiseSpec(1, 288, 48, 14, 14).by_channels  # 48 channels: 2 x 32-channel blocks
    assert not pointwise.PointwiseSpec(1, 64, 256, 28, 28).by_channels  # large map
    assert not pointwise.PointwiseSpec(1, 64, 16, 7, 7).by_channels  # fewer channels than a block
    assert not pointwise.PointwiseSpec(1, 2048, 512, 7, 7).by_channels  # a 2048 x 32 weight block per pixel block


def test_packed_weight_holds_each_block_of_output_channels_transposed() -> None:
    s = pointwise.PointwiseSpec(1, 3, 60, 7, 7)
    w = np.arange(60 * 3, dtype=np.float32).reshape(60, 3, 1, 1)
    packed = pointwise.pack_weight(s, w)
    assert packed.shape == s.arg_shapes[1] == (2, 3, 32)
    np.testing.assert_array_equal(packed[0], w[:32, :, 0, 0].T)
    np.testing.assert_array_equal(packed[1], w[28:, :, 0, 0].T)  # the last block shifted back to end at 60


def test_pass_repacks_the_weight_of_a_channel_vectorised_conv() -> None:
    model = with_random_bn_stats(nn.Sequential(nn.Conv2d(24, 64, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()))
    inputs = (torch.randn(2, 24, 7, 7),)
    text, got = dispatched(model, inputs, lambda w: "pointwise")
    assert "pointwise_24to64_7x7_b2_relu_cv" in text and "R.nn.relu" not in text
    with torch.no_grad():
        np.testing.assert_allclose(got, model(*inputs).numpy(), rtol=1e-4, atol=1e-5)


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

    def __init__(self, scale_first: bool, out: int = 10) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(24, 6, 1), nn.Conv2d(6, 24, 1)
        self.project, self.bn = nn.Conv2d(24, out, 1, bias=False), nn.BatchNorm2d(out)
        self.scale_first = scale_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.sigmoid(self.fc2(F.silu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return self.bn(self.project(s * x if self.scale_first else x * s))


@pytest.mark.parametrize(("scale_first", "out", "name"), [(True, 10, "pointwise_24to10_8x6_b2_none_scaled"),
                                                          (False, 10, "pointwise_24to10_8x6_b2_none_scaled"),
                                                          (True, 64, "pointwise_24to64_8x6_b2_none_scaled_cv")])
def test_pass_folds_the_squeeze_excite_scale_into_the_next_1x1_conv(scale_first, out, name) -> None:
    model = with_random_bn_stats(_SqueezeExcite(scale_first, out))
    inputs = (torch.randn(2, 24, 8, 6),)
    text, got = dispatched(model, inputs, lambda w: "pointwise" if pointwise.supported(w.conv_attrs, w.shapes) else "tir")
    assert name in text and "R.multiply" not in text
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
