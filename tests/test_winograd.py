"""float32 3x3 convs as Winograd F(4x4, 3x3) on NCHW16c activations (`kernels.winograd`): the kernel
against a float64 conv (bias, residual, activations, maps that are not whole tiles, padded channels,
each way `blocked` groups output vectors), which convs the registry gives it, and a model whose 3x3
convs run on it inside a chain of blocked kernels, residuals written in place."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tvm
from torch import nn

from sparsefx.backends.tvm.kernels import registry as own_kernels
from sparsefx.backends.tvm.kernels import winograd
from sparsefx.backends.tvm.kernels.blocked_layout import stored
from sparsefx.target import resolve_target

from .own_kernels_helper import ACT, dispatched, with_random_bn_stats
from .test_blocked import from_layout, to_layout

BOUND = 2e-5  # of the output's largest value: F(4x4, 3x3)'s float32 rounding (7e-6 at 512 -> 512, direct 3e-7)

SPECS = [
    winograd.WinogradSpec(1, 16, 16, 8, 8),  # two whole tiles a side
    winograd.WinogradSpec(2, 32, 80, 7, 7, "relu", True),  # 5 output blocks: groups of 3 and 2 vectors; partial tiles
    winograd.WinogradSpec(1, 20, 72, 13, 11, "relu6"),  # channels padded to 32 and 80; 12 tiles, padded to 12
    winograd.WinogradSpec(3, 64, 96, 9, 6, "none", True),  # 6 blocks: 3 + 3; 18 tiles padded to a register block's 24
    winograd.WinogradSpec(1, 48, 64, 16, 16, "silu"),
]


@pytest.fixture(scope="module")
def library() -> tvm.runtime.Module:
    return own_kernels.build("winograd", SPECS, resolve_target("cpu").to_tvm())


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_kernel_matches_a_float64_conv(library: tvm.runtime.Module, spec: winograd.WinogradSpec) -> None:
    torch.manual_seed(0)
    x, weight = torch.randn(spec.nchw_in), torch.randn(spec.weight_shape) / (9 * spec.cin) ** 0.5
    bias, residual = torch.randn(spec.cout), torch.randn(spec.nchw_out)
    want = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    want = ACT[spec.activation](want + residual.double() if spec.residual else want)
    out = tvm.runtime.tensor(to_layout(residual) if spec.residual else np.zeros(spec.out_shape, "float32"))
    library[spec.name](tvm.runtime.tensor(to_layout(x)), tvm.runtime.tensor(winograd.pack_weight(spec, weight.numpy())),
                       tvm.runtime.tensor(winograd.pack_bias(spec, bias.numpy())), out)
    got = from_layout(out.numpy())
    error = float((got[:, :spec.cout].double() - want).abs().max() / want.abs().max())
    assert error < BOUND, (spec.name, error)
    assert not got[:, spec.cout:].any()  # the layout's padding channels stay zero
    assert want.abs().max() > 1  # outputs that depend on the input, not near zero


def test_weight_transform_reproduces_the_conv_on_one_tile() -> None:
    """U = G g G^T with the input and output transforms gives a 3x3 conv's 4x4 outputs over a 6x6 window."""
    rng = np.random.default_rng(0)
    window, g = rng.standard_normal((6, 6)), rng.standard_normal((3, 3))
    bt, at = np.asarray(winograd.BT, float), np.asarray(winograd.AT, float)
    u = winograd.transformed_weight(g[None, None])[0, 0]
    tile = at @ ((bt @ window @ bt.T) * u) @ at.T
    direct = np.array([[np.sum(window[i:i + 3, j:j + 3] * g) for j in range(4)] for i in range(4)])
    np.testing.assert_allclose(tile, direct, rtol=1e-10, atol=1e-10)


def test_packed_weight_has_the_kernels_argument_shape() -> None:
    spec = SPECS[2]
    packed = winograd.pack_weight(spec, np.ones(spec.weight_shape, "float32"))
    assert packed.shape == spec.arg_shapes[1] == (36 * stored(72) * stored(20),)


def conv(n: int, cin: int, hw: int, stride: int = 1, groups: int = 1, k: int = 3) -> tuple:
    """Dispatch's (attrs, shapes) of a conv with padding k // 2."""
    ho = (hw + 2 * (k // 2) - k) // stride + 1
    return ((stride, stride, k // 2, k // 2, 1, 1, groups), ((n, cin, hw, hw), (cin, cin // groups, k, k), (n, cin, ho, ho)))


def test_registry_gives_it_unstrided_3x3_convs_with_enough_tiles() -> None:
    assert own_kernels.kind_of(*conv(8, 512, 7)) == "winograd"  # 8 images x 4 tiles
    assert own_kernels.kind_of(*conv(1, 64, 56)) == "winograd"  # 196 tiles
    assert own_kernels.kind_of(*conv(1, 512, 7)) == "blocked"  # 4 tiles: the weight's reads outweigh the work saved
    assert own_kernels.kind_of(*conv(8, 64, 56, stride=2)) == "blocked"
    assert own_kernels.kind_of(*conv(8, 64, 56, k=1)) == "blocked"
    assert own_kernels.kind_of(*conv(8, 8, 56)) != "winograd"  # fewer input channels than a block
    assert own_kernels.kind_of(*conv(8, 64, 56, groups=64)) == "blocked_depthwise"
    assert own_kernels.kind_of(*conv(8, 64, 56), precision="bf16") != "winograd"  # float32 only


class Blocks(nn.Module):
    """A stem, two 3x3 residual blocks on a 16x16 map (16 tiles), and a strided 3x3 between."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1))
        self.down = nn.Conv2d(32, 48, 3, stride=2, padding=1)
        self.b = nn.Conv2d(48, 48, 3, padding=1)
        self.head = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        y = F.relu(self.a(y) + y)
        y = F.relu(self.down(y))
        y = F.relu(self.b(y) + y)
        return self.head(F.adaptive_avg_pool2d(y, 1).flatten(1))


def test_model_runs_its_3x3_convs_on_winograd_in_the_blocked_chain() -> None:
    model, inputs = with_random_bn_stats(Blocks()), (torch.randn(4, 3, 16, 16),)  # 8x8 after the stride: 4 x 4 tiles
    text, got = dispatched(model, inputs, lambda w: own_kernels.kind_of(w.conv_attrs, w.shapes) if w.op == "conv2d" else "tir")
    calls = [line for line in text.splitlines() if "R.call_tir" in line]
    assert sum("winograd_" in line for line in calls) == 3
    assert sum("R.call_tir_inplace" in line and "winograd_" in line for line in calls) == 2  # both residuals in place
    # one chain: converted only to copy the residual that the last conv also reads (it writes over the copy)
    assert sum("blocked_in" in line for line in calls) == sum("blocked_out" in line for line in calls) == 1, text
    with torch.no_grad():
        want = model(*inputs).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert np.abs(want).max() > 0.1
