"""TVM backend: compiled outputs match eager, artifacts round-trip, bad input is refused clearly."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import sparsefx
from sparsefx.backends.tvm import compile, load
from sparsefx.backends.tvm.kernels import registry as own_kernels
from sparsefx.capture.compare import check_reference, output_error
from sparsefx.errors import SparsefxError
from sparsefx.target import resolve_target

from .models_zoo import CASES

pytestmark = pytest.mark.usefixtures("private_cache")


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    error = output_error(expected, actual)  # raises if the reference is near zero: no vacuous pass
    assert error.ok(), error


@pytest.mark.parametrize("case", ["residual", "concat", "depthwise", "squeeze_excite", "attention",
                                  "sdpa_attention", "packed_attention"])
@pytest.mark.parametrize("pruned", [False, True])
def test_compiled_matches_eager(case: str, pruned: bool) -> None:
    torch.manual_seed(0)
    build, make_inputs = CASES[case]
    model, inputs = build().eval(), make_inputs()
    if pruned:
        model = sparsefx.prune(model, inputs, ratio=0.5)
    expected = check_reference(model, inputs)  # O(1) and moved by the input, so a wrong build can fail
    compiled = compile(model, inputs, target="cpu", verbose=False)
    with torch.no_grad():
        _close(compiled(*inputs), expected)


def test_dispatch_can_be_disabled_and_is_recorded() -> None:
    build, make_inputs = CASES["residual"]
    model, inputs = build().eval(), make_inputs()
    pure = compile(model, inputs, dispatch=False, verbose=False)
    assert pure.manifest["dispatch"] == {} and "DispatchToTorch" not in pure.manifest["passes"]
    mixed = compile(model, inputs, verbose=False)
    impls = ("tir", "torch", *own_kernels.KERNELS)
    assert mixed.manifest["dispatch"] and all(d["impl"] in impls for d in mixed.manifest["dispatch"].values())
    with torch.no_grad():
        _close(pure(*inputs), model(*inputs))


def test_own_dispatch_puts_convs_on_sparsefx_kernels_untimed() -> None:
    build, make_inputs = CASES["depthwise"]
    model, inputs = build().eval(), make_inputs()
    expected = check_reference(model, inputs)
    own = compile(model, inputs, dispatch="own", verbose=False)
    decisions = list(own.manifest["dispatch"].values())
    assert decisions and all(d["decided_by"] == "kind" and d["impl"] != "torch" for d in decisions)
    assert any(d["impl"] in own_kernels.KERNELS for d in decisions)
    with torch.no_grad():
        _close(own(*inputs), expected)
    with pytest.raises(SparsefxError, match="dispatch must be"):
        compile(model, inputs, dispatch="torch", verbose=False)


def test_export_and_load_round_trip(tmp_path) -> None:
    build, make_inputs = CASES["squeeze_excite"]
    model, inputs = build().eval(), make_inputs()
    compiled = compile(model, inputs, verbose=False)
    path = compiled.export(tmp_path / "model.sfx")
    loaded = load(path)
    assert loaded.manifest["inputs"] == compiled.manifest["inputs"]
    with torch.no_grad():
        _close(loaded(*inputs), model(*inputs))


def test_profile_times_every_call_by_kind_and_leaves_the_model_as_it_was() -> None:
    build, make_inputs = CASES["squeeze_excite"]
    model, inputs = build().eval(), make_inputs()
    compiled = compile(model, inputs, verbose=False)
    rows = compiled.profile(*inputs, repeat=3)
    kinds = {row["kind"] for row in rows}
    assert kinds <= {"tir", "torch", "vm", "sparse", *own_kernels.KERNELS} and kinds - {"vm"}
    assert all(row["ms"] >= 0 and row["name"] for row in rows)
    assert any(row["shapes"][0] == list(inputs[0].shape) for row in rows if row["kind"] != "vm")  # the first op's input
    with torch.no_grad():
        _close(compiled(*inputs), model(*inputs))


def test_corrupt_artifact_is_one_line_error(tmp_path) -> None:
    path = tmp_path / "broken.sfx"
    path.write_bytes(b"not a tar file at all")
    with pytest.raises(sparsefx.SparsefxError) as error:
        load(path)
    assert "not a sparsefx compiled model" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(sparsefx.SparsefxError, match="no compiled model"):
        load(tmp_path / "missing.sfx")


def test_bad_targets() -> None:
    with pytest.raises(sparsefx.SparsefxError, match="unknown target 'tpu'"):
        resolve_target("tpu")
    with pytest.raises(sparsefx.SparsefxError, match="CUDA arch 'sm_99' does not exist"):
        resolve_target("cuda:sm_99")


def test_wrong_input_shape_is_refused() -> None:
    build, make_inputs = CASES["residual"]
    model, inputs = build().eval(), make_inputs()
    compiled = compile(model, inputs, verbose=False)
    with pytest.raises(sparsefx.SparsefxError, match="compiled for inputs"):
        compiled(torch.randn(1, 3, 8, 8))


class _Unsupported(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.special.bessel_j0(x) + 1


def test_unsupported_op_names_op_and_node() -> None:
    with pytest.raises(sparsefx.SparsefxError) as error:
        compile(_Unsupported(), (torch.randn(2, 3),), verbose=False)
    text = str(error.value)
    assert "bessel_j0" in text and "node" in text and "\n" not in text


def test_cuda_compiles_on_a_cpu_only_host(tmp_path) -> None:
    build, make_inputs = CASES["residual"]
    model, inputs = build().eval(), make_inputs()
    compiled = compile(model, inputs, target="cuda:sm_90", verbose=False)
    assert compiled.manifest["target"]["arch"] == "sm_90" and compiled.manifest["dispatch"] == {}
    path = compiled.export(tmp_path / "gpu.sfx")
    assert path.stat().st_size > 0


def test_torch_convs_keep_bias_residual_and_relu_in_one_call() -> None:
    from sparsefx.backends.tvm import pipeline
    from sparsefx.backends.tvm.importer import to_relax

    build, make_inputs = CASES["depthwise"]  # bias-free convs + BN (folded), ReLUs and a residual add
    model, inputs = build().eval(), make_inputs()
    target = resolve_target("cpu")
    mod, _ = to_relax(model, inputs)
    mod = pipeline.run(pipeline.optimize_passes(), mod, target.to_tvm())
    decisions = {k.key: {"impl": "torch"} for k in pipeline.collect_kernels(mod)}
    text = str(pipeline.run(pipeline.dispatch(decisions), mod, target.to_tvm())["main"])
    assert "sparsefx.torch.conv2d_bias_residual" in text and "sparsefx.torch.conv2d_bias\"" in text
    assert text.count("R.nn.relu") == 1  # only the ReLU after GroupNorm stays in TIR


@pytest.mark.parametrize("pruned", [False, True])
def test_functional_layer_norm_keeps_eps_weight_and_bias(pruned: bool) -> None:
    """ConvNeXt's LayerNorm2d calls F.layer_norm with keyword weight, bias and eps=1e-6; TVM's fx
    importer read only positional arguments: eps 1e-5 put ConvNeXt (affine at its init) 3-8e-4 off;
    with the trained-like weight and bias here, the dropped affine put it ~0.5 off."""
    from torchvision.models.convnext import LayerNorm2d

    torch.manual_seed(0)
    norm = LayerNorm2d(32, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(1, 0.5)
        norm.bias.normal_(0, 0.5)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 4, stride=4), norm, torch.nn.Conv2d(32, 8, 1)).eval()
    with torch.no_grad():
        model[0].weight.mul_(0.1)
    inputs = (torch.randn(1, 3, 32, 32),)
    if pruned:
        model = sparsefx.prune(model, inputs, ratio=0.5)
    compiled = compile(model, inputs, target="cpu", dispatch=False, verbose=False)
    with torch.no_grad():
        _close(compiled(*inputs), model(*inputs))


@pytest.mark.parametrize(("preset", "expected"), [(None, "0"), ("5000", "5000")])
def test_tvm_pool_workers_sleep_unless_the_user_says_otherwise(preset, expected):
    """Spinning TVM workers starve the PyTorch threads dispatched kernels run on; a user's setting wins."""
    env = {k: v for k, v in os.environ.items() if k != "TVM_THREAD_POOL_SPIN_COUNT"}
    if preset is not None:
        env["TVM_THREAD_POOL_SPIN_COUNT"] = preset
    code = "import os, sparsefx.backends.tvm; print(os.environ['TVM_THREAD_POOL_SPIN_COUNT'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == expected


class _BatchFirstAttention(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = torch.nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(x, x, x, need_weights=False)[0]


def test_export_route_keeps_projection_weights_unbroadcast() -> None:
    # torch.export turns this projection into a matmul against the weight broadcast to the batch,
    # which FoldConstant would materialise (1.4 GB for ViT-B/16 at batch 8)
    from torch.export import export
    from tvm.relax.frontend.torch import from_exported_program

    from sparsefx.backends.tvm.unbroadcast import unbroadcast_matmul

    model, inputs = _BatchFirstAttention().eval(), (torch.randn(2, 5, 16),)
    mod = from_exported_program(export(model, inputs, strict=False), keep_params_as_input=True)
    assert "(5, 16, 48)" in str(mod["main"])  # the weight, broadcast to the 5 positions
    assert "(5, 16, 48)" not in str(unbroadcast_matmul(mod)["main"])
    compiled = compile(model, inputs, target="cpu", verbose=False)
    with torch.no_grad():
        _close(compiled(*inputs), model(*inputs))


class _MathBlock(torch.nn.Module):
    """LayerNorm (eps 1e-6, non-trivial affine), GELU (erf and tanh), softmax on the last axis
    (dispatchable) and on the first (not: PyTorch's kernel is only taken for the last axis)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(16, eps=1e-6)
        self.fc = torch.nn.Linear(16, 16)
        with torch.no_grad():
            self.norm.weight.normal_(1, 0.5)
            self.norm.bias.normal_(0, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(self.norm(x))  # read by both GELUs: neither fuses into the Linear's call
        h = torch.nn.functional.gelu(h) + torch.nn.functional.gelu(h, approximate="tanh")
        return torch.softmax(h, dim=-1) + torch.softmax(h, dim=0)


def test_gelu_softmax_and_layer_norm_run_on_torch_when_dispatched_and_match_eager() -> None:
    import tvm
    from tvm import relax

    from sparsefx.backends.tvm import pipeline
    from sparsefx.backends.tvm.importer import to_relax

    torch.manual_seed(0)
    model, inputs = _MathBlock().eval(), (torch.randn(4, 8, 16),)
    target = resolve_target("cpu")
    mod, _ = to_relax(model, inputs)
    mod = pipeline.run(pipeline.optimize_passes(), mod, target.to_tvm())
    kernels = pipeline.collect_kernels(mod)
    assert {"layer_norm", "gelu", "gelu_tanh", "softmax"} <= {k.op for k in kernels}
    mod = pipeline.run(pipeline.dispatch({k.key: {"impl": "torch"} for k in kernels}), mod, target.to_tvm())
    text = str(mod["main"])
    for name in ("layer_norm", "gelu", "gelu_tanh", "softmax"):
        assert f"sparsefx.torch.{name}\"" in text
    assert "R.nn.softmax" not in text  # the first-axis softmax too, with its axis (checked by the output below)
    lowering = pipeline.as_pipeline(pipeline.lowering_passes(target, target.to_tvm(), None))
    vm = relax.VirtualMachine(tvm.compile(mod, target.to_tvm(), relax_pipeline=lowering), tvm.cpu())
    out = torch.from_dlpack(vm["main"](tvm.runtime.tensor(inputs[0].numpy())))
    with torch.no_grad():
        _close(out, model(*inputs))
    compiled = compile(model, inputs, verbose=False)  # measured decisions, recorded with both timings
    recorded = {k: d for k, d in compiled.manifest["dispatch"].items() if k.split("|")[0] in ("gelu", "softmax")}
    assert recorded and all(d["torch_ms"] > 0 for d in recorded.values())
    with torch.no_grad():
        _close(compiled(*inputs), model(*inputs))


class SiluByHand(torch.nn.Module):
    """YOLO's pieces as torch.export sees them: SiLU written as x * sigmoid(x) after a conv, a gate
    x * sigmoid(y) that is not SiLU, and a softmax over the channel axis (the DFL head's)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.gate = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(16, 16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        y = y * torch.sigmoid(y)
        y = y * torch.sigmoid(self.gate(y))
        return torch.softmax(y, dim=1)


@pytest.mark.parametrize("route", ["fx", "export"])
def test_silu_written_out_becomes_silu_and_channel_softmax_can_leave_tir(route: str) -> None:
    from tvm import relax

    from sparsefx.backends.tvm.importer import to_relax
    from sparsefx.backends.tvm.silu import silu_pass

    torch.manual_seed(0)
    model, inputs = SiluByHand().eval(), (torch.randn(1, 3, 12, 12),)
    if route == "export":  # fx traces this model; export's graph is what YOLO arrives as
        model = torch.export.export(model, inputs).module()
    mod, _ = to_relax(model, inputs)
    text = silu_pass(relax.transform.CanonicalizeBindings()(mod)).script()
    assert text.count("R.nn.silu(") == 1 and text.count("R.sigmoid(") == 1  # the gate stays a gate
    expected = check_reference(model, inputs)
    compiled = compile(model, inputs, verbose=False, threads=1)
    assert "FuseSiLU" in compiled.manifest["passes"]
    softmax = [d for key, d in compiled.manifest["dispatch"].items() if key.startswith("softmax")]
    assert softmax  # a channel-axis softmax is a dispatch workload now, not TIR only
    with torch.no_grad():
        _close(compiled(*inputs), expected)


class SdpaVariant(torch.nn.Module):
    """PyTorch's SDPA with one of the arguments TVM's own converter dropped or refused."""

    def __init__(self, mask: torch.Tensor | None = None, causal: bool = False, gqa: bool = False,
                 scale: float | None = None) -> None:
        super().__init__()
        self.q, self.kv = torch.nn.Linear(32, 32), torch.nn.Linear(32, 16 if gqa else 32)
        self.mask, self.causal, self.gqa, self.scale = mask, causal, gqa, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        kv_heads = 2 if self.gqa else 4
        q = self.q(x).view(b, s, 4, 8).transpose(1, 2)
        kv = self.kv(x)
        k, v = (t.view(b, s, kv_heads, 8).transpose(1, 2) for t in (kv, kv.flip(-1)))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, is_causal=self.causal,
                                                               scale=self.scale, enable_gqa=self.gqa)
        return out.transpose(1, 2).reshape(b, s, 32)


@pytest.mark.parametrize("variant", ["bool_mask", "float_mask", "causal_scaled", "gqa"])
@pytest.mark.parametrize("dispatch", [True, False])
def test_sdpa_compiles_to_one_attention_with_every_argument(variant: str, dispatch: bool) -> None:
    torch.manual_seed(0)
    keep = torch.rand(10, 10) > 0.4
    keep[:, 0] = True  # every query sees a key: on a fully masked row implementations disagree (NaN or 0)
    model = {"bool_mask": lambda: SdpaVariant(mask=keep),
             "float_mask": lambda: SdpaVariant(mask=torch.randn(2, 1, 10, 10)),
             "causal_scaled": lambda: SdpaVariant(causal=True, scale=0.3),
             "gqa": lambda: SdpaVariant(gqa=True)}[variant]()
    inputs = (torch.randn(2, 10, 32),)
    expected = check_reference(model.eval(), inputs)
    compiled = compile(model, inputs, target="cpu", dispatch=dispatch, verbose=False, cache=False)
    _close(compiled(*inputs), expected)
    if dispatch:
        assert any(key.startswith("attention|") for key in compiled.manifest["dispatch"])  # one fused workload
    else:  # nothing runs it on PyTorch: written out as matmuls and a softmax, as TIR compiles them well
        assert "ExpandAttention" in compiled.manifest["passes"]


def test_attention_is_written_out_for_cuda_targets() -> None:
    model, inputs = SdpaVariant(causal=True, scale=0.3).eval(), (torch.randn(2, 10, 32),)
    compiled = compile(model, inputs, target="cuda:sm_90", precision="fp16", verbose=False, cache=False)
    assert "ExpandAttention" in compiled.manifest["passes"]
