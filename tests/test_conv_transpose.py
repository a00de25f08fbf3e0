"""Transposed convolutions prune through like convolutions: weight (in, out/groups, k...), groups shrink
by whole groups, output padding kept; removing zeroed channels leaves the output unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsefx
from sparsefx.capture.compare import check_reference, first_tensor, output_error
from sparsefx.channels.coupling import ChannelGroup
from sparsefx.channels.prune import analyze

from .test_exactness import zero_lowest_classes


class UNet(nn.Module):
    """Encoder, a ConvTranspose2d decoder step and a skip connection concatenated in."""

    def __init__(self) -> None:
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.enc2 = nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU())
        self.up = nn.ConvTranspose2d(32, 16, 3, stride=2, padding=1, output_padding=1)
        self.dec = nn.Sequential(nn.Conv2d(32, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Conv2d(16, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.enc1(x)
        up = F.relu(self.up(self.enc2(skip)))
        return self.head(self.dec(torch.cat([up, skip], 1)))


class Autoencoder1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Conv1d(4, 16, 4, 2, 1), nn.BatchNorm1d(16), nn.ReLU())
        self.dec = nn.Sequential(nn.ConvTranspose1d(16, 12, 4, 2, 1), nn.ReLU())
        self.out = nn.Conv1d(12, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.dec(self.enc(x)))


class Autoencoder3d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Conv3d(2, 8, 3, 2, 1), nn.ReLU())
        self.dec = nn.Sequential(nn.ConvTranspose3d(8, 6, 2, 2), nn.BatchNorm3d(6), nn.ReLU())
        self.out = nn.Conv3d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.dec(self.enc(x)))


class GroupedDecoder(nn.Module):
    """A grouped (4 groups of 4 in, 6 out) and a depthwise transposed convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.up = nn.ConvTranspose2d(16, 24, 3, stride=2, padding=1, output_padding=1, groups=4)
        self.norm = nn.BatchNorm2d(24)
        self.depthwise = nn.ConvTranspose2d(24, 24, 3, padding=1, groups=24, bias=False)
        self.head = nn.Conv2d(24, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.depthwise(F.relu(self.norm(self.up(self.enc(x)))))))


class FunctionalDecoder(nn.Module):
    """F.conv_transpose2d on parameters of its own (groups given by keyword)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU())
        self.up = nn.Module()
        self.up.weight = nn.Parameter(torch.randn(8, 3, 2, 2) * 0.3)  # (in 8, out 6 / groups 2, 2, 2)
        self.up.bias = nn.Parameter(torch.randn(6) * 0.1)
        self.head = nn.Conv2d(6, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv_transpose2d(self.enc(x), self.up.weight, self.up.bias, stride=2, groups=2)
        return self.head(F.relu(y))


CASES = {  # model, input shape, the transposed convolutions' layer names
    "unet": (UNet, (2, 3, 16, 16), ["up"]), "autoencoder_1d": (Autoencoder1d, (2, 4, 32), ["dec.0"]),
    "autoencoder_3d": (Autoencoder3d, (2, 2, 8, 8, 8), ["dec.0"]),
    "grouped": (GroupedDecoder, (2, 3, 16, 16), ["up", "depthwise"]),
    "functional": (FunctionalDecoder, (2, 3, 16, 16), ["up"]),
}


def _group_reading(analysis: sparsefx.Analysis, layer: str) -> ChannelGroup:
    """The group of `layer`'s input channels (a transposed conv's weight dim 0)."""
    return next(g for g in analysis.groups if any(g.slot_objs[i].layer == layer and "in" in g.slot_objs[i].roles
                                                  for i in g.slots))


@pytest.mark.parametrize("method", ["fx", "export"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_transposed_conv_prunes_exactly(case: str, method: str) -> None:
    torch.manual_seed(0)
    build, shape, layers = CASES[case]
    model, inputs = build().eval(), (torch.randn(*shape),)
    analysis = analyze(model, inputs, method=method)
    assert not any("unsupported op" in g.reason() for g in analysis.groups), str(analysis)
    assert all(_group_reading(analysis, layer).prunable for layer in layers), str(analysis)
    assert zero_lowest_classes(model, inputs, 0.5, method) > 0
    expected = check_reference(model, inputs)
    pruned = sparsefx.prune(model, inputs, ratio=0.5, importance="l1", method=method)
    assert sparsefx.count_params(pruned) < sparsefx.count_params(model)
    with torch.no_grad():
        error = output_error(expected, first_tensor(pruned(*inputs)))  # shapes must match too
    assert error.ok(), error
    for layer in pruned.modules():  # attributes follow the sliced weight
        if isinstance(layer, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            assert layer.in_channels == layer.weight.shape[0]
            assert layer.out_channels == layer.weight.shape[1] * layer.groups


def test_grouped_transposed_conv_loses_whole_groups() -> None:
    torch.manual_seed(0)
    model, inputs = GroupedDecoder().eval(), (torch.randn(1, 3, 16, 16),)
    pruned = sparsefx.prune(model, inputs, ratio=0.5, method="fx")
    assert pruned.up.groups == 2 and tuple(pruned.up.weight.shape) == (8, 6, 3, 3)
    assert pruned.up.output_padding == (1, 1) and pruned.up.stride == (2, 2)
    assert pruned.depthwise.groups == pruned.depthwise.in_channels == pruned.depthwise.out_channels == 12
    assert pruned(*inputs).shape == model(*inputs).shape


@pytest.mark.parametrize("method", ["fx", "export"])
def test_transposed_conv_macs(method: str) -> None:
    """Every input element meets (out/groups x kernel) weights: N*Cin*L_in * weight[1:] per layer."""
    model = GroupedDecoder().eval()
    x = torch.randn(2, 3, 16, 16)
    enc = 2 * 16 * 8 * 8 * 3 * 9
    up = 2 * 16 * 8 * 8 * (24 // 4) * 9
    depthwise = 2 * 24 * 16 * 16 * 1 * 9
    head = 2 * 3 * 16 * 16 * 24
    assert sparsefx.count_macs(model, x, method=method) == enc + up + depthwise + head
    pruned = sparsefx.prune(model, x, ratio=0.5, method=method)  # half of every group: half of every layer's MACs
    assert sparsefx.count_macs(pruned, x, method=method) == (enc + up + depthwise + head) // 2
