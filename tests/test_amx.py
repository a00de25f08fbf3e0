"""bf16 convs on AMX tiles (`kernels.amx`) and on AVX512-BF16 (`kernels.dpbf16`): each shape kind
against PyTorch's conv, the weight packing and rounding against PyTorch's bf16, the tile layout's other
kernels, and a bf16 build whose chain of convs converts its layout only at the ends (on `amx` where
the CPU has tiles, else on `dpbf16`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tvm
from torch import nn

from sparsefx.backends.tvm import compile, compiler, load
from sparsefx.backends.tvm.kernels import amx, amx_depthwise, amx_linear, dpbf16, tile_layout
from sparsefx.capture.compare import check_reference, output_error
from sparsefx.errors import SparsefxError
from sparsefx.target import has_bf16, has_tiles, host_cpu, with_precision

pytestmark = [pytest.mark.usefixtures("private_cache"),
              pytest.mark.skipif(not has_bf16(), reason="this CPU has no AVX512-BF16")]
needs_tiles = pytest.mark.skipif(not has_tiles(), reason="this CPU has no AMX bf16 tiles")
ACT = {"none": lambda t: t, "relu": F.relu, "relu6": lambda t: t.clamp(0, 6)}


def bits(t: torch.Tensor, step: int | None = None) -> np.ndarray:
    """A float NCHW tensor as NHWC bf16 bit patterns, channels zero-padded as the layout stores them
    (in steps of `step`, default this CPU's)."""
    padded = F.pad(t, (0, 0, 0, 0, 0, tile_layout.stored(t.shape[1], step) - t.shape[1]))
    return padded.permute(0, 2, 3, 1).contiguous().bfloat16().view(torch.int16).numpy().view(np.uint16)


def from_bits(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16).float().permute(0, 3, 1, 2)


def test_bf16_bits_round_as_pytorch_does() -> None:
    torch.manual_seed(0)
    x = torch.randn(4096) * torch.logspace(-30, 30, 4096)
    assert np.array_equal(amx.bf16_bits(x.numpy()), x.bfloat16().view(torch.int16).numpy().view(np.uint16))


CONVS = [
    (32, 32, 8, 3, 1, False, "relu"),  # padded flat positions, padding columns dropped
    (64, 48, 9, 1, 1, True, "none"),  # unpadded 1x1, the last tile moved back over its predecessor
    (32, 64, 10, 3, 2, False, "relu6"),  # stride 2: positions within output rows
    (64, 32, 7, 1, 2, True, "relu"),  # strided 1x1 (a downsample), rows of 4
    (96, 32, 3, 3, 1, False, "none"),  # fewer positions than a tile; weight-stationary task order
    (128, 64, 5, 3, 1, True, "relu"),  # weight-stationary with images inside, 3 tiles: the last pair one tile twice
    (3, 32, 16, 7, 2, False, "relu"),  # a stem: window columns folded into the reduction
    (3, 32, 11, 3, 1, True, "none"),  # folded, stride 1; an odd tile count: the last pair is one tile twice
    (24, 40, 9, 3, 1, True, "relu6"),  # channels stored padded to 32 in and out
    (144, 24, 8, 1, 1, False, "none"),  # 144 = 4.5 steps: the last one half zeros
    (32, 32, (9, 13), 3, 2, True, "relu"),  # not square
    (16, 16, 10, 3, 1, True, "relu"),  # 16 channels: half steps in, one output-channel tile out
    (8, 48, 9, 1, 1, False, "relu6"),  # 8 channels stored as 16
    (48, 8, 9, 1, 2, False, "none"),  # 8 outputs stored as 16
    (3, 16, 12, 7, 2, False, "relu"),  # a folded stem with one output tile
    (3, 32, (12, 17), 7, 2, False, "none"),  # a folded stem, not square
    (4, 32, 11, 3, 1, True, "none"),  # folded, stride 1 on 4 channels (whole pairs for `dpbf16`)
    (48, 80, 9, 1, 1, True, "relu6"),  # `dpbf16`: 48 in, 16-channel steps; 80 out, blocks of five vectors
    (72, 144, 8, 3, 2, False, "relu6"),  # `dpbf16`: 72 stored as 80; 144 out, blocks of three vectors
    (64, 64, 7, 3, 1, True, "relu"),  # `dpbf16`: 49 positions in blocks of 5, the last moved back over a residual
]


@needs_tiles
@pytest.mark.parametrize(("cin", "cout", "size", "kernel", "stride", "residual", "act"), CONVS)
def test_kernel_matches_pytorch(cin: int, cout: int, size: int | tuple[int, int], kernel: int, stride: int,
                                residual: bool, act: str) -> None:
    amx.enable()
    check_conv(amx, amx.AmxSpec, cin, cout, size, kernel, stride, residual, act, tile_layout.STEP)


@pytest.mark.parametrize(("cin", "cout", "size", "kernel", "stride", "residual", "act"),
                         [c for c in CONVS if c[0] * c[4] % 2 == 0])  # a stem's positions on whole pairs
def test_dpbf16_kernel_matches_pytorch(cin: int, cout: int, size: int | tuple[int, int], kernel: int, stride: int,
                                       residual: bool, act: str) -> None:
    check_conv(dpbf16, dpbf16.Dpbf16Spec, cin, cout, size, kernel, stride, residual, act, tile_layout.HALF_STEP)


def check_conv(module: object, spec_type: type, cin: int, cout: int, size: int | tuple[int, int], kernel: int,
               stride: int, residual: bool, act: str, step: int) -> None:
    """The kernel against PyTorch, channels stored in steps of `step` (the layout's on the CPUs it runs on)."""
    height, width = size if isinstance(size, tuple) else (size, size)
    attrs = (stride, stride, kernel // 2, kernel // 2, 1, 1, 1)
    assert module.supported(attrs, ((2, cin, height, width), (cout, cin, kernel, kernel)))
    spec = spec_type(2, cin, cout, height, width, kernel, stride, kernel // 2, act, residual, step=step)
    library = tvm.compile(tvm.IRModule({"main": module.kernel(spec).with_attr("global_symbol", "main")}),
                          with_precision(host_cpu(), "bf16").to_tvm())
    torch.manual_seed(0)
    x, w, b = torch.randn(2, cin, height, width), torch.randn(cout, cin, kernel, kernel) * 0.1, torch.randn(cout)
    add = torch.randn(2, cout, *spec.out_hw)
    x, w, add = (t.bfloat16().float() for t in (x, w, add))  # the kernel's inputs are exactly these
    want = F.conv2d(x, w, b, stride, kernel // 2)
    want = ACT[act](want + add if residual else want)
    # with a residual the result is written over it (`call_tir_inplace`): each position added to it once
    out = tvm.runtime.tensor(bits(add, step)) if residual else tvm.runtime.empty(spec.out_shape, "uint16")
    args = [bits(x, step), module.pack_weight(spec, w.numpy()), module.pack_bias(spec, b.numpy())]
    library["main"](*[tvm.runtime.tensor(a) for a in args], out)
    stored = from_bits(out.numpy())
    assert not stored[:, cout:].any()  # the layout's channels past the conv's stay zero
    got = stored[:, :cout]
    assert got.shape == want.shape
    assert (got - want).norm() / want.norm() < 5e-3  # float32 accumulation, one bf16 rounding at the end


@pytest.mark.parametrize(("channels", "size", "kernel", "stride", "act"), [
    (32, 10, 3, 1, "relu6"), (40, 9, 3, 2, "relu"), (96, 12, 5, 2, "none"), (64, 5, 3, 1, "relu6"),
    (48, (7, 11), 3, 2, "relu6"), (8, 9, 3, 1, "relu6"), (72, 8, 3, 1, "relu6"),  # 72: stored as 80 or 96
])
def test_depthwise_matches_pytorch(channels: int, size: int | tuple[int, int], kernel: int, stride: int,
                                   act: str) -> None:
    height, width = size if isinstance(size, tuple) else (size, size)
    spec = amx_depthwise.AmxDepthwiseSpec(2, channels, channels, height, width, kernel, stride, kernel // 2, act)
    library = tvm.compile(tvm.IRModule({"main": amx_depthwise.kernel(spec).with_attr("global_symbol", "main")}),
                          with_precision(host_cpu(), "bf16").to_tvm())
    torch.manual_seed(0)
    x, w, b = torch.randn(2, channels, height, width).bfloat16().float(), torch.randn(channels, 1, kernel, kernel), \
        torch.randn(channels)
    want = ACT[act](F.conv2d(x, w, b, stride, kernel // 2, 1, channels))
    out = tvm.runtime.empty(spec.out_shape, "uint16")
    args = [bits(x), amx_depthwise.pack_weight(spec, w.numpy()), amx_depthwise.pack_bias(spec, b.numpy())]
    library["main"](*[tvm.runtime.tensor(a) for a in args], out)
    stored = from_bits(out.numpy())
    assert not stored[:, channels:].any()
    assert (stored[:, :channels] - want).norm() / want.norm() < 5e-3


@pytest.mark.parametrize(("rows", "inputs", "outputs", "act"), [(1, 96, 100, "none"), (3, 40, 64, "relu"),
                                                                      (10, 64, 70, "none")])  # passes of 4, 4, last 4 moved back
def test_linear_matches_pytorch(rows: int, inputs: int, outputs: int, act: str) -> None:
    spec = amx_linear.LinearSpec(rows, inputs, outputs, act)
    library = tvm.compile(tvm.IRModule({"main": amx_linear.kernel(spec).with_attr("global_symbol", "main")}),
                          with_precision(host_cpu(), "bf16").to_tvm())
    torch.manual_seed(0)
    x, w, b = torch.randn(rows, inputs), torch.randn(inputs, outputs).bfloat16().float(), torch.randn(outputs)
    want = ACT[act](x @ w + b)
    out = tvm.runtime.empty(spec.out_shape, "float32")
    library["main"](*[tvm.runtime.tensor(a) for a in (x.numpy(), amx_linear.pack_weight(spec, w.numpy()),
                                                      b.numpy())], out)
    assert (torch.from_numpy(out.numpy()) - want).norm() / want.norm() < 1e-5  # the weight is exact in bf16


@pytest.mark.parametrize("channels", [40, 64])  # a part-vector of scales past the whole ones; none
def test_layout_scale_and_mean_match_pytorch(channels: int) -> None:
    stored = (2, 5, 6, tile_layout.stored(channels))
    target = with_precision(host_cpu(), "bf16").to_tvm()
    build = {f: tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target)["main"]
             for f in (tile_layout.scale(stored, channels), tile_layout.mean(stored, channels))}
    scale_fn, mean_fn = build.values()
    torch.manual_seed(0)
    x, s = torch.randn(2, channels, 5, 6).bfloat16().float(), torch.rand(2, channels, 1, 1)
    scaled = tvm.runtime.empty(stored, "uint16")
    scale_fn(tvm.runtime.tensor(bits(x)), tvm.runtime.tensor(s.numpy()), scaled)
    got = from_bits(scaled.numpy())
    assert not got[:, channels:].any()
    assert (got[:, :channels] - x * s).norm() / (x * s).norm() < 5e-3
    means = tvm.runtime.empty((2, channels, 1, 1), "float32")
    mean_fn(tvm.runtime.tensor(bits(x)), means)
    assert torch.allclose(torch.from_numpy(means.numpy()), x.mean((2, 3), keepdim=True), atol=1e-5)


def test_supported_shapes() -> None:
    plain = (1, 1, 1, 1, 1, 1, 1)
    assert amx.supported(plain, ((1, 64, 8, 8), (32, 64, 3, 3)))
    assert amx.supported(plain, ((1, 48, 8, 8), (24, 48, 3, 3)))  # stored as 64 and 32 channels
    assert amx.supported((2, 2, 3, 3, 1, 1, 1), ((1, 3, 224, 224), (64, 3, 7, 7)))  # a stem, folded
    assert not amx.supported((1, 1, 5, 5, 1, 1, 1), ((1, 3, 8, 8), (32, 3, 11, 11)))  # 3 x 11 > 32: no fold
    assert not amx.supported((1, 1, 0, 0, 1, 1, 1), ((1, 96, 1, 1), (4, 96, 1, 1)))  # 4 outputs: narrower than a tile
    assert not amx.supported((1, 1, 0, 0, 1, 1, 1), ((1, 3, 8, 8), (32, 3, 1, 1)))  # 1x1 on 3 channels: no fold
    assert not amx.supported((1, 1, 1, 1, 1, 1, 2), ((1, 64, 8, 8), (32, 32, 3, 3)))  # grouped
    assert dpbf16.supported((2, 2, 3, 3, 1, 1, 1), ((1, 3, 224, 224), (64, 3, 7, 7)))  # a stem, stride 2: pairs
    assert not dpbf16.supported((1, 1, 1, 1, 1, 1, 1), ((1, 3, 8, 8), (32, 3, 3, 3)))  # stride 1 on 3: odd starts


def test_dpbf16_register_blocks_fit_the_map() -> None:
    """One position short of `POSITIONS` where that computes less (4 or 3 vectors), never more than the map."""
    assert [dpbf16.positions(4, n) for n in (3, 25, 49, 196, 3136)] == [3, 5, 5, 6, 6]
    assert [dpbf16.positions(3, n) for n in (49, 784)] == [7, 8]
    assert [dpbf16.positions(2, n) for n in (49, 196)] == [12, 12]  # 2 vectors: 12 always
    assert dpbf16.positions(1, 9) == 9


def test_channels_are_stored_in_the_cpus_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """With AMX a tile's 32-channel steps; without, 16 (`dpbf16`'s pairs in, vectors out): a pruned
    72 channels take 80, not 96. A spec keeps the step it was made with (its kernel's cache key)."""
    counts = (3, 8, 16, 24, 48, 72, 80, 144)
    monkeypatch.setattr(tile_layout, "has_tiles", lambda: True)
    assert [tile_layout.stored(c) for c in counts] == [3, 16, 16, 32, 64, 96, 96, 160]
    with_tiles = dpbf16.Dpbf16Spec(8, 72, 144, 56, 56, 1, 1, 0)
    monkeypatch.setattr(tile_layout, "has_tiles", lambda: False)
    assert [tile_layout.stored(c) for c in counts] == [3, 16, 16, 32, 48, 80, 80, 144]
    spec = dpbf16.Dpbf16Spec(8, 72, 144, 56, 56, 1, 1, 0)
    assert (spec.cin_stored, spec.cout_stored, dpbf16.vectors(spec)) == (80, 144, 3)
    assert (with_tiles.cin_stored, with_tiles.cout_stored, dpbf16.vectors(with_tiles)) == (96, 160, 5)
    assert spec != with_tiles and spec.in_shape == (8, 56, 56, 80)


class Blocks(nn.Module):
    """A ResNet's stem and max-pool, two residual blocks, a classifier: every conv on tiles, the pool
    between and the mean after them on the tiles too, the classifier on `amx_linear`."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.pool = nn.Conv2d(3, 64, 7, stride=2, padding=3), nn.MaxPool2d(3, 2, 1)
        self.a, self.b = nn.Conv2d(64, 64, 3, padding=1), nn.Conv2d(64, 64, 1)
        self.c, self.d = nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.Conv2d(64, 64, 1)
        self.down = nn.Conv2d(64, 64, 1, stride=2)
        self.head = nn.Linear(64, 100)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pool(torch.relu(self.stem(x)))
        y = torch.relu(self.b(torch.relu(self.a(y))) + y)
        z = torch.relu(self.d(torch.relu(self.c(y))) + self.down(y))
        return self.head(z.mean((2, 3)))


class SelfResidual(nn.Module):
    """A conv whose input is its own residual: the kernel writing over the residual must not read it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(32, 64, 3, padding=1), nn.Conv2d(64, 64, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.a(x))
        return torch.relu(self.b(y) + y)


def tile_convs(calls: list[str]) -> list[str]:
    return [name for name in calls if name.startswith(("amx_", "dpbf16_", "winogradbf16_")) and not name.startswith(
        (tile_layout.TO_TILES, tile_layout.FROM_TILES, "amx_linear", "amx_mean"))]


def compiled_in_bf16(model: nn.Module, inputs: tuple) -> tuple[object, object, list[str]]:
    """The reference output, the model compiled in bf16 on one thread, and the calls one run makes."""
    expected = check_reference(model, inputs)
    compiled = compile(model, inputs, precision="bf16", threads=1, verbose=False)
    return expected, compiled, [row["name"] for row in compiled.profile(*inputs, repeat=1)]


def test_chain_converts_only_at_its_ends() -> None:
    torch.manual_seed(0)
    inputs = (torch.randn(1, 3, 64, 64),)
    expected, compiled, calls = compiled_in_bf16(Blocks().eval(), inputs)
    assert len(tile_convs(calls)) == 7, calls  # six convs and the pool
    assert sum(name.endswith("_res") for name in calls) == 2, calls  # both residual adds fused
    assert sum(name.startswith("amx_linear") for name in calls) == 1, calls
    assert sum(name.startswith(tile_layout.TO_TILES) for name in calls) == 1  # the input, once
    assert sum(name.startswith("amx_mean") for name in calls) == 1, calls  # `.mean((2, 3))` reads the tiles
    assert not any(name.startswith(tile_layout.FROM_TILES) for name in calls), calls
    error = output_error(expected, compiled(*inputs))
    assert 1e-5 < error.relative_l2 < 3e-2, error  # bf16 rounding (not float32), within the bf16 bound


def test_a_conv_on_its_own_residual_reads_a_copy() -> None:
    torch.manual_seed(0)
    inputs = (torch.randn(1, 32, 20, 20),)
    expected, compiled, calls = compiled_in_bf16(SelfResidual().eval(), inputs)
    assert any(name.endswith("_res") for name in tile_convs(calls)), calls
    error = output_error(expected, compiled(*inputs))
    assert 1e-5 < error.relative_l2 < 3e-2, error  # wrong by far where the conv read its overwritten input


def test_artifact_with_tiles_is_refused_on_a_cpu_without(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model, inputs = Blocks().eval(), (torch.randn(1, 3, 64, 64),)
    compile(model, inputs, precision="bf16", threads=1, verbose=False).export(tmp_path / "m.sfx")
    monkeypatch.setattr(compiler, "has_tiles", lambda: False)
    monkeypatch.setattr(compiler, "has_bf16", lambda: False)
    with pytest.raises(SparsefxError, match="which this CPU lacks"):
        load(tmp_path / "m.sfx")
    monkeypatch.undo()
    assert torch.equal(load(tmp_path / "m.sfx")(*inputs), load(tmp_path / "m.sfx")(*inputs))  # the file is intact


class Excited(nn.Module):
    """EfficientNet's squeeze-and-excitation between two convs, and a pooling head."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(32, 64, 3, padding=1), nn.Conv2d(64, 48, 1)
        self.squeeze, self.excite = nn.Conv2d(64, 16, 1), nn.Conv2d(16, 64, 1)
        self.pool, self.head = nn.AdaptiveAvgPool2d(1), nn.Linear(48, 100)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.silu(self.a(x))
        y = y * torch.sigmoid(self.excite(F.silu(self.squeeze(self.pool(y)))))
        return self.head(self.pool(self.b(y)).flatten(1))


def test_squeeze_excitation_and_pooling_head_stay_in_the_layout() -> None:
    torch.manual_seed(0)
    inputs = (torch.randn(1, 32, 20, 20),)
    expected, compiled, calls = compiled_in_bf16(Excited().eval(), inputs)
    assert any(name.startswith("amx_scale") for name in calls), calls
    assert sum(name.startswith("amx_mean") for name in calls) == 2, calls  # the squeeze and the head
    big = [name for name in calls if name.startswith(tile_layout.FROM_TILES) and not name.endswith("x1x1")]
    assert not big, calls  # nothing but 1x1 maps leaves the layout
    error = output_error(expected, compiled(*inputs))
    assert 1e-5 < error.relative_l2 < 3e-2, error
