"""Dispatched PyTorch convolutions and matmuls: prepacked oneDNN weights and fused ReLU6/SiLU epilogues match eager."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsefx.backends.tvm import compile, pipeline
from sparsefx.backends.tvm.dispatch import torch_kernels
from sparsefx.backends.tvm.measure.host import HostTimer
from sparsefx.capture.compare import check_reference, output_error
from sparsefx.target import resolve_target

from .own_kernels_helper import dispatched_module, run_module

pytestmark = pytest.mark.usefixtures("private_cache")


class _Activations(nn.Module):
    """conv-BN-ReLU6, conv-BN-SiLU, a residual conv-BN and a clip that is not ReLU6."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.b = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), nn.SiLU())
        self.c = nn.Sequential(nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.d = nn.Conv2d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.b(self.a(x))
        return self.d(self.c(y) + y).clamp(-1, 1)


def _model() -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    model = _Activations().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial folded bias and scale
            nn.init.uniform_(m.running_mean, -1, 1), nn.init.uniform_(m.running_var, 0.5, 2)
    return model, (torch.randn(2, 3, 12, 12),)


def _mlp() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """Linear layers on a (batch, tokens, features) input: float32 matmuls with constant weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 48), nn.GELU(), nn.Linear(48, 16)).eval()
    return model, (torch.randn(1, 10, 24),)


def _all_on_torch(model: nn.Module, inputs: tuple[torch.Tensor]) -> str:
    """main's text after the dispatch passes with every kernel decided for PyTorch."""
    return str(dispatched_module(model, inputs, lambda k: "torch")["main"])


def test_activations_fuse_into_dispatched_convs() -> None:
    text = _all_on_torch(*_model())
    assert "R.nn.silu" not in text and "conv2d_bias_residual" in text
    assert text.count("R.clip") == 1  # clamp(-1, 1) is no ReLU6 and stays in TIR


def test_linear_layers_keep_bias_and_gelu_in_one_call() -> None:
    text = _all_on_torch(*_mlp())
    assert text.count("sparsefx.torch.matmul_bias") == 2
    assert "R.nn.gelu" not in text and "sparsefx.torch.gelu" not in text and "R.add" not in text


@pytest.mark.parametrize("make", [_model, _mlp])
@pytest.mark.parametrize("prepack", [True, False])
def test_dispatched_model_matches_eager(prepack: bool, make, monkeypatch) -> None:
    if prepack and not torch_kernels.PREPACK:
        pytest.skip("this PyTorch has no MKLDNN: there are no prepacked weights to check")
    monkeypatch.setattr(torch_kernels, "PREPACK", prepack)
    # every kernel on PyTorch, prepacked (own kernels and TIR far slower), its call out free
    rigged = {"torch": 2e-6, "torch_prepacked": 1e-6, "depthwise": 1.0, "pointwise": 1.0, "direct": 1.0, "tir": 1.0}
    monkeypatch.setattr(HostTimer, "time", lambda self, kernels, implementations=None: [dict(rigged) for _ in kernels])
    monkeypatch.setattr(HostTimer, "overheads", lambda self: {})
    model, inputs = make()
    compiled = compile(model, inputs, verbose=False)
    decided = [d for d in compiled.manifest["dispatch"].values() if d["op_class"].startswith(("conv2d", "matmul"))]
    assert decided and all(d["impl"] == "torch" and d["prepack"] for d in decided)
    expected = check_reference(model, inputs)
    with torch.no_grad():
        for _ in range(2):  # the second call reuses the packed weights
            error = output_error(expected, compiled(*inputs))
            assert error.ok(), error


def test_weight_key_names_contents() -> None:
    w = torch.randn(8, 4, 3, 3).numpy()
    assert torch_kernels.weight_key(w) == torch_kernels.weight_key(w.copy()) > 0
    assert torch_kernels.weight_key(w) != torch_kernels.weight_key(w * 2)


def test_a_reshape_between_the_linear_and_its_gelu_still_fuses() -> None:
    """A Linear on 3-D input imported through torch.export: 2-D matmul, bias, reshape back, GELU."""
    import numpy as np
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((10, 24), "float32"))
    weight, bias = (np.random.rand(*s).astype("float32") for s in ((24, 48), (48,)))
    w, b = relax.const(weight), relax.const(bias)
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.add(b, relax.op.matmul(x, w)))
            out = bb.emit_output(relax.op.nn.gelu(relax.op.reshape(y, (1, 10, 48))))
        bb.emit_func_output(out)
    mod = bb.get()
    decisions = {k.key: {"impl": "torch"} for k in pipeline.collect_kernels(mod)}
    target = resolve_target("cpu")
    fused = pipeline.run(pipeline.dispatch(decisions), mod, target.to_tvm())
    text = str(fused["main"])
    assert "sparsefx.torch.matmul_bias" in text and "gelu" not in text.replace("matmul_bias", "")
    xs = torch.randn(10, 24)
    got = torch.from_numpy(run_module(fused, (xs,)))
    want = torch.nn.functional.gelu(xs @ torch.from_numpy(weight) + torch.from_numpy(bias))
    assert got.shape == (1, 10, 48)
    torch.testing.assert_close(got[0], want, rtol=1e-4, atol=1e-5)


class _Residuals(nn.Module):
    """Three conv + residual tails: one the residual's last reader, one whose residual is read again
    afterwards, one whose conv reads the residual itself (writing into it would overwrite its input)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.p, self.a, self.b, self.c, self.d, self.e = nn.Conv2d(3, 16, 3, padding=1), \
            *(nn.Conv2d(16, 16, k, padding=k // 2) for k in (3, 1, 3, 1, 3, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.stem(x)
        y = torch.relu(self.a(self.p(r)) + r)  # r's last reader: may take the result
        s = self.b(y)
        z = torch.relu(self.c(s) + s) + s  # s is read again
        t = self.d(z)
        return torch.relu(self.e(t) + t)  # t's last reader, but the conv reads t too


def test_a_residual_read_last_takes_the_result_in_place(monkeypatch) -> None:
    torch.manual_seed(0)
    model, inputs = _Residuals().eval(), (torch.randn(1, 3, 10, 10),)
    text = _all_on_torch(model, inputs)
    assert text.count(f'"{torch_kernels.CONV_RESIDUAL_IN_PLACE}"') == 1
    assert text.count(f'"{torch_kernels.CONV_RESIDUAL}"') == 2
    if not torch_kernels.PREPACK:
        return  # the in-place call only differs on oneDNN
    rigged = {"torch": 2e-6, "torch_prepacked": 1e-6, "depthwise": 1.0, "pointwise": 1.0, "direct": 1.0, "tir": 1.0}
    monkeypatch.setattr(HostTimer, "time", lambda self, kernels, implementations=None: [dict(rigged) for _ in kernels])
    monkeypatch.setattr(HostTimer, "overheads", lambda self: {})
    compiled = compile(model, inputs, verbose=False)
    expected = check_reference(model, inputs)
    with torch.no_grad():
        for _ in range(2):
            error = output_error(expected, compiled(*inputs))
            assert error.ok(), error


class _ViewedResidual(nn.Module):
    """A residual whose reshaped view is read after the residual conv: writing into it would change the view."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.p, self.a = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.stem(x)
        view = r.reshape(r.shape[0], -1)
        y = torch.relu(self.a(self.p(r)) + r)
        return y, view * 2


def test_a_residual_read_through_a_view_keeps_its_values() -> None:
    torch.manual_seed(0)
    text = _all_on_torch(_ViewedResidual().eval(), (torch.randn(1, 3, 10, 10),))
    assert f'"{torch_kernels.CONV_RESIDUAL}"' in text and torch_kernels.CONV_RESIDUAL_IN_PLACE not in text
