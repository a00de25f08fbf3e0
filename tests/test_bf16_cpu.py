"""bf16 on the CPU: dispatched convs and matmuls compute in bf16 on PyTorch's kernels (float32 in
and out, float32 accumulation), everything else stays float32; decisions and cost tables are kept
apart from fp32's; the CPU's lack of the instructions and a dispatch that never calls PyTorch are
one-line errors."""

from __future__ import annotations

import json
import tarfile

import pytest
import torch
from torch import nn

import sparsefx
from sparsefx.backends.tvm import compile, load
from sparsefx.backends.tvm.dispatch import torch_kernels
from sparsefx.backends.tvm.dispatch.table import table_key
from sparsefx.capture.compare import check_reference, output_error
from sparsefx.planning.pricing import cost_model
from sparsefx.target import BF16_FLAGS, TargetError, check_precision, cpu_flags, host_cpu, with_precision

from .own_kernels_helper import dispatched_module, run_module

pytestmark = pytest.mark.usefixtures("private_cache")
HAS_BF16 = bool(set(BF16_FLAGS) & cpu_flags())
needs_bf16 = pytest.mark.skipif(not HAS_BF16, reason="this CPU has neither AVX512-BF16 nor AMX")
BOUND = 3e-2  # relative L2 error on logits against float32 (docs/architecture.md, bf16 on the CPU)


class ConvNet(nn.Module):
    """Convs with a residual (the fused epilogue path), then a linear head (the matmul path)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.body = nn.Conv2d(32, 32, 3, padding=1)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.stem(x))
        y = torch.relu(self.body(y) + y)
        return self.head(y.mean((2, 3)))


def _model(batch: int = 8) -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    return ConvNet().eval(), (torch.randn(batch, 3, 24, 24),)


@needs_bf16
def test_bf16_build_is_within_its_bound_and_really_bf16() -> None:
    model, inputs = _model()
    expected = check_reference(model, inputs)  # input-dependent, not near zero
    compiled = compile(model, inputs, precision="bf16", threads=1, verbose=False)
    assert compiled.manifest["precision"] == "bf16"
    torch_calls = [d for d in compiled.manifest["dispatch"].values() if d["impl"] == "torch"]
    got = compiled(*inputs)
    assert got.dtype == torch.float32
    error = output_error(expected, got)
    assert error.relative_l2 < BOUND, error
    if torch_calls:  # something ran in bf16: the error is bf16's (2^-8 per rounding), not float32's
        assert error.relative_l2 > 1e-5, error
    assert (got.argmax(1) == expected.argmax(1)).float().mean() >= 0.75  # top-1 on random inputs


@needs_bf16
@pytest.mark.parametrize("prepacked", [False, True])
def test_bf16_conv_kernel_matches_float32_within_rounding(prepacked: bool) -> None:
    torch.manual_seed(0)
    x, w, b, residual = torch.randn(1, 16, 10, 10), torch.randn(24, 16, 3, 3) * 0.1, torch.randn(24), \
        torch.randn(1, 24, 10, 10)
    attrs = (1, 1, 1, 1, 1, 1, 1)
    key = 12345 if prepacked else 0
    exact = torch_kernels.conv(x, w, b, attrs, key, "relu", residual)
    half = torch_kernels.conv(x, w, b, attrs, key + 1 if key else 0, "relu", residual, precision="bf16")
    torch_kernels.forget_packed([key, key + 1])
    assert half.dtype == torch.float32 and half.is_contiguous()
    relative = ((half - exact).norm() / exact.norm()).item()
    assert 1e-5 < relative < 1e-2


@needs_bf16
def test_bf16_matmul_converts_a_keyed_weight_once() -> None:
    a, b = torch.randn(5, 32), torch.randn(32, 7)
    first = torch_kernels.matmul(a, b, key=77, precision="bf16")
    b.zero_()  # the bf16 copy made under key 77 is what runs now
    assert torch.equal(torch_kernels.matmul(a, b, key=77, precision="bf16"), first)
    torch_kernels.forget_packed([77])
    assert torch.count_nonzero(torch_kernels.matmul(a, b, key=77, precision="bf16")) == 0
    torch_kernels.forget_packed([77])


@needs_bf16
@pytest.mark.parametrize("act", ["none", "gelu_tanh"])
def test_bf16_prepacked_matmul_with_bias_and_activation_matches_float32_within_rounding(act: str) -> None:
    torch.manual_seed(0)
    a, b, bias = torch.randn(2, 9, 32), torch.randn(32, 24) * 0.2, torch.randn(24)
    exact = torch_kernels.matmul(a, b, bias=bias.clone(), act=act)
    half = torch_kernels.matmul(a, b, key=78, precision="bf16", bias=bias, act=act)
    torch_kernels.forget_packed([78])
    assert half.dtype == torch.float32 and half.shape == exact.shape == (2, 9, 24)
    relative = ((half - exact).norm() / exact.norm()).item()
    assert 1e-5 < relative < 1e-2


def test_bf16_tables_are_kept_apart_from_fp32() -> None:
    cpu = host_cpu()
    bf16 = cpu if not HAS_BF16 else with_precision(cpu, "bf16")
    if HAS_BF16:
        assert table_key(bf16, 1) != table_key(cpu, 1)
        assert cost_model(bf16, measure=False).path != cost_model(cpu, measure=False).path
        assert "bf16" in str(bf16)


def test_bf16_errors_are_one_line() -> None:
    model, inputs = _model(batch=1)
    with pytest.raises(TargetError, match="AVX512-BF16 or AMX") as error:
        check_precision("bf16", host_cpu(), flags=frozenset({"avx2"}))
    assert "\n" not in str(error.value)
    if HAS_BF16:
        for dispatch in (False, "own"):
            with pytest.raises(sparsefx.SparsefxError, match="dispatch=True") as error:
                compile(model, inputs, precision="bf16", dispatch=dispatch, verbose=False)
            assert "\n" not in str(error.value)


def test_old_artifacts_calling_pytorch_kernels_are_refused(tmp_path: object) -> None:
    model, inputs = _model(batch=1)
    path = compile(model, inputs, threads=1, verbose=False).export(tmp_path / "model.tar")
    with tarfile.open(path) as tar:
        manifest = json.loads(tar.extractfile("manifest.json").read())
        library = tar.extractfile("model.so").read()
    manifest["version"] = 1
    manifest["dispatch"]["conv2d_example"] = {"impl": "torch"}  # what a v1 artifact calling PyTorch holds
    old = tmp_path / "old"
    old.mkdir()
    (old / "manifest.json").write_text(json.dumps(manifest))
    (old / "model.so").write_bytes(library)
    with tarfile.open(tmp_path / "old.tar", "w") as tar:
        tar.add(old / "manifest.json", "manifest.json")
        tar.add(old / "model.so", "model.so")
    with pytest.raises(sparsefx.SparsefxError, match="compile the model again"):
        load(tmp_path / "old.tar")


@needs_bf16
def test_bf16_plan_is_priced_on_bf16_kernels() -> None:
    """The planner's cost model times what a bf16 build runs: its own table, and the plan says so."""
    model, inputs = _model(batch=1)
    bf16 = sparsefx.plan(model, inputs, macs_ratio=0.6, precision="bf16", verbose=False)
    assert bf16.target["precision"] == "bf16"
    assert cost_model(with_precision(host_cpu(), "bf16")).path.name.endswith("-bf16.json")
    assert sparsefx.plan(model, inputs, macs_ratio=0.6, verbose=False).target["precision"] == "fp32"


def _dispatched(model: nn.Module, inputs: tuple, precision: str) -> object:
    """The model's Relax module after every conv and matmul is decided for PyTorch, prepacked (no timing)."""
    return dispatched_module(model, inputs, lambda k: "torch", precision, prepack=True)


def _dispatched_ir(model: nn.Module, inputs: tuple, precision: str) -> str:
    return str(_dispatched(model, inputs, precision)["main"])


def test_bf16_convs_feeding_only_bf16_convs_hand_on_bf16() -> None:
    """stem -> body (input and residual) stays bf16 between the two convs; body's output, read by
    the mean (TIR), and the head's matmul are float32; an fp32 build has no bf16 at all."""
    model, inputs = _model(batch=1)
    text = _dispatched_ir(model, inputs, "bf16")
    lines = [line for line in text.splitlines() if "call_pure_packed" in line]
    convs = [line for line in lines if "conv2d" in line]
    assert len(convs) == 2
    assert 'dtype="bfloat16") = R.call_pure_packed("sparsefx.torch.conv2d_bias"' in convs[0]  # stem: chained
    assert 'dtype="float32") = R.call_pure_packed("sparsefx.torch.conv2d_bias_residual"' in convs[1]
    assert "bfloat16" not in _dispatched_ir(model, inputs, "fp32")


class StemNet(nn.Module):
    """ResNet's stem: conv, ReLU, max-pool, read by a block's conv and its shortcut conv (or, with
    `pool_read_by_tir`, also by a mean: TIR)."""

    def __init__(self, pool_read_by_tir: bool = False) -> None:
        super().__init__()
        self.stem, self.pool = nn.Conv2d(3, 16, 3, padding=1), nn.MaxPool2d(3, 2, 1)
        self.block, self.shortcut = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 1)
        self.pool_read_by_tir = pool_read_by_tir

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pool(torch.relu(self.stem(x)))
        out = (torch.relu(self.block(y)) + self.shortcut(y)).mean((2, 3))
        return out + y.mean((2, 3)) if self.pool_read_by_tir else out


def test_a_max_pool_between_bf16_convs_runs_in_bf16_on_pytorch() -> None:
    torch.manual_seed(0)
    inputs = (torch.randn(1, 3, 16, 16),)
    lines = [line for line in _dispatched_ir(StemNet().eval(), inputs, "bf16").splitlines() if "call_pure_packed" in line]
    pools = [line for line in lines if torch_kernels.MAX_POOL in line]
    assert len(pools) == 1 and 'dtype="bfloat16")' in pools[0]
    assert 'dtype="bfloat16") = R.call_pure_packed("sparsefx.torch.conv2d_bias"' in lines[0]  # the stem hands on bf16
    tir_read = _dispatched_ir(StemNet(pool_read_by_tir=True).eval(), inputs, "bf16")
    assert torch_kernels.MAX_POOL not in tir_read and "R.nn.max_pool2d" in tir_read  # float32 for TIR's mean
    assert torch_kernels.MAX_POOL not in _dispatched_ir(StemNet().eval(), inputs, "fp32")


@needs_bf16
def test_a_bf16_stem_with_its_pool_on_pytorch_is_within_the_bound() -> None:
    torch.manual_seed(0)
    model, inputs = StemNet().eval(), (torch.randn(2, 3, 32, 32),)
    expected = check_reference(model, inputs)
    mod = _dispatched(model, inputs, "bf16")
    assert torch_kernels.MAX_POOL in str(mod["main"])
    got = torch.from_numpy(run_module(mod, inputs))
    error = output_error(expected, got)
    assert 1e-5 < error.relative_l2 < BOUND, error  # bf16's rounding, within its bound


def test_own_conv_kernel_kinds_follow_the_cpu_and_precision(monkeypatch: pytest.MonkeyPatch) -> None:
    """One rule (`registry.runs_here`): bf16 convs on `amx` where the CPU has tiles, else on `dpbf16` (or Winograd) where it
    has AVX512-BF16, else on no bf16 kind (the NCHW float32 kernel `direct`, timed against PyTorch's bf16);
    float32 never on a bf16 kind."""
    from sparsefx.backends.tvm.kernels import registry

    stem = ((2, 2, 3, 3, 1, 1, 1), ((1, 3, 224, 224), (64, 3, 7, 7), (1, 64, 112, 112)))
    block = ((1, 1, 1, 1, 1, 1, 1), ((1, 64, 56, 56), (64, 64, 3, 3), (1, 64, 56, 56)))
    for tiles, bf16, want in ((True, True, "amx"), (False, True, "dpbf16"), (False, False, "direct")):
        monkeypatch.setattr(registry, "has_tiles", lambda tiles=tiles: tiles)
        monkeypatch.setattr(registry, "has_bf16", lambda bf16=bf16: bf16)
        assert registry.kind_of(*stem, precision="bf16") == want
        # an unstrided 3x3 on Winograd where `dpbf16` would run it (test_winograd_bf16)
        assert registry.kind_of(*block, precision="bf16") == ("winogradbf16" if want == "dpbf16" else want)
        assert registry.kind_of(*block) == "winograd"  # float32: an unstrided 3x3 on Winograd
