"""float32 convs on channel-blocked activations (`kernels.blocked`, `blocked_depthwise`, NCHW16c):
each shape kind against PyTorch's conv, the layout's conversions and ops against PyTorch, which
convs the registry gives them, what the timer charges PyTorch between them, and a model whose chain
of blocked convs converts its layout only at the ends."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tvm
from torch import nn

from sparsefx.backends.tvm.kernels import blocked, blocked_depthwise, blocked_layout
from sparsefx.backends.tvm.kernels import registry as own_kernels
from sparsefx.backends.tvm.measure import host
from sparsefx.cost.kernel import conv2d_kernel
from sparsefx.target import resolve_target

from .own_kernels_helper import ACT, dispatched, with_random_bn_stats


def to_layout(t: torch.Tensor) -> np.ndarray:
    """An NCHW tensor as NCHW16c, channels zero-padded as the layout stores them."""
    n, c, h, w = t.shape
    padded = F.pad(t, (0, 0, 0, 0, 0, blocked_layout.stored(c) - c))
    return padded.view(n, -1, blocked_layout.BLOCK, h, w).permute(0, 1, 3, 4, 2).contiguous().numpy()


def from_layout(a: np.ndarray) -> torch.Tensor:
    """NCHW16c -> NCHW with every stored channel (the padding included)."""
    n, cb, h, w, lanes = a.shape
    return torch.from_numpy(a).permute(0, 1, 4, 2, 3).reshape(n, cb * lanes, h, w)


def run(func: tvm.tirx.PrimFunc, *args: np.ndarray, out_shape: tuple[int, ...], into: np.ndarray | None = None) -> np.ndarray:
    """`func` on `args` and an output of `out_shape`, holding `into` on the way in (a residual written over)."""
    library = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), resolve_target("cpu").to_tvm())
    out = tvm.runtime.tensor(np.ascontiguousarray(into, "float32")) if into is not None else tvm.runtime.empty(out_shape, "float32")
    library["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a, "float32")) for a in args], out)
    return out.numpy()


# small maps with big weights, run input block by input block (`blocked.sliced`): groups of 3 and 2
# vectors, 10 blocks and one of 4, a residual; and stride 2
SLICED = [blocked.BlockedSpec(1, 320, 80, 8, 8, 3, 1, 1, "relu", True), blocked.BlockedSpec(1, 256, 64, 13, 13, 3, 2, 1)]


# unstrided 1x1 convs whose group's weight is past L1, reduced in passes of input blocks (`blocked.chunked`):
# 20 input blocks (passes of 8, 8, 4), groups of 3 and 2 vectors, a residual, 143 positions (23 blocks and one of 5)
# in chunks across tasks; and one image whose 17 blocks split into 16 chunks, the last block starting early
CHUNKED = [blocked.BlockedSpec(2, 320, 80, 13, 11, activation="relu", residual=True),
           blocked.BlockedSpec(1, 256, 64, 10, 10, activation="relu6")]


def test_the_sliced_specs_run_sliced() -> None:
    assert all(blocked.sliced(spec) for spec in SLICED)
    assert not blocked.sliced(blocked.BlockedSpec(1, 256, 64, 14, 14, 3, 1, 1))  # 196 positions


def test_1x1_convs_with_a_group_weight_past_l1_reduce_in_passes() -> None:
    assert all(blocked.chunked(spec) and not blocked.sliced(spec) for spec in CHUNKED)
    assert blocked.task_split(CHUNKED[1], 100) == (1, 17, 16)  # one image, one group: 17 blocks (the last starting early) in 16 tasks
    assert not blocked.chunked(blocked.BlockedSpec(1, 128, 512, 14, 14))  # 32 KB a group: in L1
    assert not blocked.chunked(blocked.BlockedSpec(1, 256, 64, 28, 28, 1, 2, 0))  # strided: on phase planes


@pytest.mark.parametrize("spec", [
    blocked.BlockedSpec(1, 64, 64, 14, 14, activation="relu"),
    blocked.BlockedSpec(2, 24, 40, 13, 11, activation="relu6", residual=True),  # channels padded to 32 and 48;
    # 143 positions: 23 blocks and one of 5 (a block ending at the map's end would add its overlap's residual twice)
    blocked.BlockedSpec(1, 20, 72, 15, 15, 3, 1, 1, "relu"),
    blocked.BlockedSpec(2, 16, 32, 14, 14, 3, 2, 1, "none", True),
    blocked.BlockedSpec(1, 32, 80, 17, 17, 5, 2, 2, "silu"),
    blocked.BlockedSpec(1, 64, 128, 16, 16, 1, 2, 0),
    blocked.BlockedSpec(2, 12, 72, 10, 10, activation="relu6"),  # a 1x1 on 12 channels, padded to 16
    blocked.BlockedSpec(1, 3, 64, 32, 32, 7, 2, 3, "relu"),  # a stem: NCHW in, the layout out
    blocked.BlockedSpec(2, 3, 40, 17, 15, 3, 2, 1, "relu6"),
    blocked.BlockedSpec(2, 48, 80, 7, 7, activation="relu", residual=True),  # 49 positions: 8 blocks and one of 1
    blocked.BlockedSpec(1, 32, 48, 9, 9, 3, 1, 1, "relu"),  # 81: 13 blocks and one of 3
    *SLICED,
    *CHUNKED,
])
def test_conv_matches_torch_and_keeps_the_padding_channels_zero(spec: blocked.BlockedSpec) -> None:
    torch.manual_seed(0)
    x, w, b = torch.randn(spec.nchw_in), torch.randn(spec.weight_shape), torch.randn(spec.cout)
    res = torch.randn(spec.nchw_out)
    want = F.conv2d(x, w, b, spec.stride, spec.padding)
    want = ACT[spec.activation](want + res if spec.residual else want)
    args = [x.numpy() if spec.nchw_input else to_layout(x), blocked.pack_weight(spec, w.numpy()),
            blocked.pack_bias(spec, b.numpy())]
    got = from_layout(run(blocked.kernel(spec), *args, out_shape=spec.out_shape,
                          into=to_layout(res) if spec.residual else None))  # the residual written over
    scale = float(want.abs().max())
    assert scale > 1  # outputs that depend on the input
    np.testing.assert_allclose(got[:, :spec.cout].numpy(), want.numpy(), rtol=1e-5, atol=1e-5 * scale)
    assert not got[:, spec.cout:].any()


# 3x3 convs read in place (`window_kernel`) or from phase planes, whichever `windowed` picks: forced
# each way, with borders on every side (stride 1), on the top and left only (stride 2, even sizes) or
# on all four (stride 2, odd), columns left over after whole blocks, and a residual written over
WINDOWS = [blocked.BlockedSpec(2, 32, 48, 15, 13, 3, 1, 1, "relu", True), blocked.BlockedSpec(1, 16, 64, 7, 7, 3, 1, 1),
           blocked.BlockedSpec(1, 48, 16, 9, 11, 3, 2, 1, "relu6", True), blocked.BlockedSpec(2, 16, 32, 20, 16, 3, 2, 1, "relu")]


@pytest.mark.parametrize("in_place", [True, False])
@pytest.mark.parametrize("spec", WINDOWS)
def test_a_3x3_read_in_place_matches_torch(spec: blocked.BlockedSpec, in_place: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(blocked, "INSIDE_SHARE", 0 if in_place else 2)
    assert blocked.windowed(spec) == in_place
    torch.manual_seed(0)
    x, w, b, res = torch.randn(spec.nchw_in), torch.randn(spec.weight_shape), torch.randn(spec.cout), torch.randn(spec.nchw_out)
    want = F.conv2d(x, w, b, spec.stride, spec.padding)
    want = ACT[spec.activation](want + res if spec.residual else want)
    got = from_layout(run(blocked.kernel(spec), to_layout(x), blocked.pack_weight(spec, w.numpy()), blocked.pack_bias(spec, b.numpy()),
                          out_shape=spec.out_shape, into=to_layout(res) if spec.residual else None))
    scale = float(want.abs().max())
    assert scale > 1
    np.testing.assert_allclose(got[:, :spec.cout].numpy(), want.numpy(), rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("spec", WINDOWS)
def test_border_runs_and_the_inside_cover_each_position_once_with_its_valid_taps(spec: blocked.BlockedSpec) -> None:
    ho, wo = spec.out_hw
    y0, y1, x0, x1 = blocked.inside(spec)
    seen = [(oy, ox) for oy in range(y0, y1 + 1) for ox in range(x0, x1 + 1)]
    for oy, ox, dy, dx, length, kh0, kh1, kw0, kw1 in blocked.border_segments(spec):
        for t in range(length):
            y, x = oy + t * dy, ox + t * dx
            seen.append((y, x))
            valid = [(kh, kw) for kh in range(3) for kw in range(3)
                     if 0 <= y * spec.stride - 1 + kh < spec.height and 0 <= x * spec.stride - 1 + kw < spec.width]
            assert valid == [(kh, kw) for kh in range(kh0, kh1) for kw in range(kw0, kw1)]
    assert sorted(seen) == [(oy, ox) for oy in range(ho) for ox in range(wo)]


def test_windowed_takes_3x3_convs_whose_windows_mostly_lie_inside() -> None:
    assert blocked.windowed(blocked.BlockedSpec(1, 64, 64, 56, 56, 3, 1, 1))
    assert blocked.windowed(blocked.BlockedSpec(1, 128, 256, 14, 14, 3, 2, 1))  # 36 of 49 positions inside
    assert not blocked.windowed(blocked.BlockedSpec(1, 128, 128, 7, 7, 3, 1, 1))  # 25 of 49
    assert not blocked.windowed(blocked.BlockedSpec(1, 3, 64, 224, 224, 7, 2, 3))  # a stem
    assert not blocked.windowed(blocked.BlockedSpec(1, 512, 512, 7, 7, 3, 1, 1))  # sliced


@pytest.mark.parametrize("planes_bytes", [1, 1 << 30])  # one image's planes at a time, or all three at once
def test_images_copied_in_turns_or_at_once_give_the_same_result(planes_bytes: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(blocked, "PLANES_BYTES", planes_bytes)
    spec = blocked.BlockedSpec(3, 16, 32, 10, 10, 3, 2, 1, "relu", True)
    torch.manual_seed(0)
    x, w, b, res = torch.randn(spec.nchw_in), torch.randn(spec.weight_shape), torch.randn(spec.cout), torch.randn(spec.nchw_out)
    want = F.relu(F.conv2d(x, w, b, 2, 1) + res)
    got = from_layout(run(blocked.kernel(spec), to_layout(x), blocked.pack_weight(spec, w.numpy()),
                          blocked.pack_bias(spec, b.numpy()), out_shape=spec.out_shape, into=to_layout(res)))
    np.testing.assert_allclose(got[:, :spec.cout].numpy(), want.numpy(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("spec", [
    blocked_depthwise.BlockedDepthwiseSpec(1, 20, 15, 13, 3, 1, 1, "relu"),
    blocked_depthwise.BlockedDepthwiseSpec(2, 32, 14, 14, 5, 2, 2, "none"),
    blocked_depthwise.BlockedDepthwiseSpec(1, 48, 7, 9, 3, 2, 1, "relu6"),
])
def test_depthwise_matches_torch(spec: blocked_depthwise.BlockedDepthwiseSpec) -> None:
    torch.manual_seed(0)
    x, w, b = torch.randn(spec.nchw_in), torch.randn(spec.weight_shape), torch.randn(spec.channels)
    want = ACT[spec.activation](F.conv2d(x, w, b, spec.stride, spec.padding, groups=spec.channels))
    args = [to_layout(x), blocked_depthwise.pack_weight(spec, w.numpy()), blocked_depthwise.pack_bias(spec, b.numpy())]
    got = from_layout(run(blocked_depthwise.kernel(spec), *args, out_shape=spec.out_shape))
    assert float(want.abs().max()) > 1
    np.testing.assert_allclose(got[:, :spec.channels].numpy(), want.numpy(), rtol=1e-5, atol=1e-5)
    assert not got[:, spec.channels:].any()


@pytest.mark.parametrize("shape", [(1, 16, 5, 7), (2, 40, 9, 4)])
def test_layout_conversions_and_ops_match_torch(shape: tuple[int, int, int, int]) -> None:
    torch.manual_seed(0)
    x = torch.randn(shape)
    n, c, h, w = shape
    into = run(blocked_layout.to_blocked(shape), x.numpy(), out_shape=blocked_layout.blocked(shape))
    np.testing.assert_array_equal(into, to_layout(x))
    np.testing.assert_array_equal(run(blocked_layout.from_blocked(shape), into, out_shape=shape), x.numpy())
    pooled = F.max_pool2d(x, 3, 2, 1)
    got = run(blocked_layout.max_pool(shape, pooled.shape[2:], 3, 2, 1), into,
              out_shape=blocked_layout.blocked(tuple(pooled.shape)))
    np.testing.assert_array_equal(from_layout(got)[:, :c].numpy(), pooled.numpy())
    s = torch.rand(n, c, 1, 1)
    got = run(blocked_layout.scale(shape), into, s.numpy(), out_shape=into.shape)
    np.testing.assert_allclose(from_layout(got)[:, :c].numpy(), (x * s).numpy(), rtol=1e-6)
    got = run(blocked_layout.mean(shape), into, out_shape=(n, c, 1, 1))
    np.testing.assert_allclose(got, x.mean((2, 3), keepdim=True).numpy(), rtol=1e-5, atol=1e-6)


def test_registry_gives_float32_convs_to_the_blocked_kernels_but_stems_and_tiny_maps() -> None:
    def kind(x: tuple, out: tuple, groups: int, k: int, stride: int, padding: int, precision: str = "fp32") -> str | None:
        found = own_kernels.own_kernel(conv2d_kernel(x, out, groups, (k, k), (stride, stride), (padding, padding),
                                                     (1, 1), 0), precision)
        return found and found[0]

    assert kind((1, 64, 56, 56), (1, 64, 56, 56), 1, 3, 1, 1) == "winograd"  # unstrided 3x3s, 196 tiles (test_winograd)
    assert kind((1, 64, 7, 7), (1, 64, 7, 7), 1, 3, 1, 1) == "blocked"  # 4 tiles
    assert kind((1, 256, 56, 56), (1, 512, 28, 28), 1, 1, 2, 0) == "blocked"
    assert kind((1, 96, 56, 56), (1, 96, 56, 56), 96, 3, 1, 1) == "blocked_depthwise"
    assert kind((1, 3, 224, 224), (1, 64, 112, 112), 1, 7, 2, 3) == "blocked"  # a stem: its image read as it is
    assert kind((1, 8, 56, 56), (1, 64, 56, 56), 1, 3, 1, 1) == "direct"  # 8 channels stored as 16: twice the work
    assert kind((1, 8, 112, 112), (1, 48, 112, 112), 1, 1, 1, 0) == "blocked"  # a 1x1 pads its input only
    assert kind((1, 7, 112, 112), (1, 48, 112, 112), 1, 1, 1, 0) == "pointwise"
    assert kind((1, 64, 2, 2), (1, 64, 2, 2), 1, 1, 1, 0) is None  # fewer positions than a register block
    assert kind((1, 64, 56, 56), (1, 64, 56, 56), 1, 3, 1, 1, "bf16") not in ("blocked", "winograd")  # float32 only


class Bottlenecks(nn.Module):
    """A ResNet in small: stem, max-pool, two residual blocks (one strided, with a projection), pooling head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.a = nn.Sequential(nn.Conv2d(16, 24, 1), nn.ReLU(), nn.Conv2d(24, 16, 3, padding=1))
        self.b = nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(), nn.Conv2d(32, 32, 1))
        self.project = nn.Conv2d(16, 32, 1, 2)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pool(self.stem(x))
        y = F.relu(self.a(y) + y)
        y = F.relu(self.b(y) + self.project(y))
        return self.head(F.adaptive_avg_pool2d(y, 1).flatten(1))


def test_chain_converts_only_at_its_ends_and_matches_eager() -> None:
    model, inputs = with_random_bn_stats(Bottlenecks()), (torch.randn(2, 3, 32, 32),)
    text, got = dispatched(model, inputs, lambda w: own_kernels.kind_of(w.conv_attrs, w.shapes) if w.op == "conv2d" else "tir")
    calls = [line for line in text.splitlines() if "R.call_tir" in line]
    # the stem reads the image as it is, the pool runs in the layout, the head's mean reads it: no conversion
    assert not any(blocked_layout.TO_BLOCKED in line or blocked_layout.FROM_BLOCKED in line for line in calls), text
    assert any("blocked_3to16" in line for line in calls) and sum("blocked_max_pool" in line for line in calls) == 1
    assert sum("blocked_mean" in line for line in calls) == 1
    assert sum("_res," in line for line in calls) == 2  # both residual adds fused
    with torch.no_grad():
        np.testing.assert_allclose(got, model(*inputs).numpy(), rtol=1e-4, atol=1e-4)


class SharedResidual(nn.Module):
    """One tensor the input of a conv, its residual, and the residual of a later conv."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.a, self.b = nn.Conv2d(16, 16, 1), nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.first(x))
        z = F.relu(self.a(y) + y)
        return F.relu(self.b(z) + y)


def test_a_residual_read_later_is_copied_before_a_kernel_writes_over_it() -> None:
    model, inputs = SharedResidual(), (torch.randn(2, 16, 12, 12),)
    text, got = dispatched(model, inputs, lambda w: "blocked")
    calls = [line for line in text.splitlines() if "R.call_tir" in line]
    assert sum("R.call_tir_inplace" in line for line in calls) == 2
    # the image in, and y again for `a`'s residual: `a` reads y and `b` adds it after `a` has run
    assert sum(blocked_layout.TO_BLOCKED in line for line in calls) == 2, text
    with torch.no_grad():
        want = model(*inputs)
    assert float(want.abs().max()) > 1
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)


def test_pytorch_between_blocked_convs_is_charged_the_conversions(monkeypatch: pytest.MonkeyPatch) -> None:
    conv = conv2d_kernel((1, 32, 16, 16), (1, 32, 16, 16), 1, (3, 3), (1, 1), (1, 1), (1, 1), 0)
    narrow = conv2d_kernel((1, 8, 16, 16), (1, 32, 16, 16), 1, (3, 3), (1, 1), (1, 1), (1, 1), 0)
    stem = conv2d_kernel((1, 3, 16, 16), (1, 32, 16, 16), 1, (3, 3), (1, 1), (1, 1), (1, 1), 0)
    converted = []

    def timed(rivals, **_):  # noqa: ANN001, ANN202
        converted.append(rivals["edges"][0].args[0] is not None)  # the input converted out of the layout
        return {"edges": 0.5}

    monkeypatch.setattr(host, "time_in_turn", timed)
    times = [{"torch": 1.0, "blocked": 1.0}, {"torch": 1.0, "direct": 1.0}, {"torch": 1.0, "blocked": 1.0}]
    host.HostTimer.add_edge_casts([conv, narrow, stem], times, "fp32")
    assert times == [{"torch": 1.5, "blocked": 1.0}, {"torch": 1.0, "direct": 1.0}, {"torch": 1.5, "blocked": 1.0}]
    assert converted == [True, False]  # the stem's image is not in the layout


def test_register_blocks_hold_two_vectors_or_more_and_compute_each_block_once() -> None:
    for cout in range(1, 400, 7):
        sizes = blocked.BlockedSpec(1, 32, cout, 8, 8).group_sizes
        assert sum(size * count for size, count in sizes) == blocked_layout.stored(cout) // blocked_layout.BLOCK
        assert len(sizes) <= 2 and all(2 <= size <= 4 for size, _ in sizes) or sizes == ((1, 1),), (cout, sizes)
    assert blocked.BlockedSpec(1, 32, 80, 8, 8).group_sizes == ((3, 1), (2, 1))
    assert blocked.BlockedSpec(1, 32, 144, 8, 8).group_sizes == ((3, 3),)  # 9 blocks: 3 + 3 + 3
    assert blocked.BlockedSpec(1, 32, 208, 8, 8).group_sizes == ((4, 1), (3, 3))  # 13: 4 + 3 + 3 + 3
