"""sparsefx's LayerNorm kernel (layer_norm's CPU legalization) against PyTorch, and where it declines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tvm
from torch import nn
from tvm import relax

from sparsefx.backends.tvm import pipeline
from sparsefx.backends.tvm.kernels import layer_norm
from sparsefx.backends.tvm.pipeline import build_module
from sparsefx.target import resolve_target

from .own_kernels_helper import dispatched_module, run_module

# (shape, eps): BERT's and pruned ViT's rows, widths off the 16-lane vector (a tail of 4, one narrower than
# a vector), one row, more rows than parallel tasks
CASES = [((1, 128, 768), 1e-12), ((2, 9, 384), 1e-6), ((3, 5, 20), 1e-5), ((1, 7, 12), 1e-5), ((1, 1, 64), 1e-5),
         ((37, 48), 1e-5)]


def norm_module(shape: tuple[int, ...], eps: float, axes: tuple[int, ...] = (-1,), **attrs: object) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    norm_shape = [shape[a] for a in axes]
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    w = relax.Var("w", relax.TensorType(norm_shape, "float32"))
    b = relax.Var("b", relax.TensorType(norm_shape, "float32"))
    with bb.function("main", [x, w, b]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.nn.layer_norm(x, w, b, list(axes), eps, **attrs)))
        bb.emit_func_output(out)
    return bb.get()


def run(mod: tvm.IRModule, *args: torch.Tensor) -> np.ndarray:
    target = resolve_target("cpu")
    vm = relax.VirtualMachine(build_module(mod, target.to_tvm(), target), tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a.numpy()) for a in args]).numpy()


@pytest.mark.parametrize(("shape", "eps"), CASES)
def test_layer_norm_equals_torch(shape: tuple[int, ...], eps: float) -> None:
    mod = norm_module(shape, eps)
    assert layer_norm.spec_of(mod["main"].body.blocks[0].bindings[0].value) == layer_norm.LayerNormSpec(shape, eps)
    torch.manual_seed(0)
    w, b = torch.randn(shape[-1]), torch.randn(shape[-1])
    x = torch.randn(shape) * 2.0
    np.testing.assert_allclose(run(mod, x, w, b), F.layer_norm(x, shape[-1:], w, b, eps).numpy(), rtol=1e-5, atol=1e-5)
    # a mean far from zero against the spread (E[x^2] - E[x]^2 would cancel to noise): as close to the
    # float64 result as PyTorch's float32 is (the inputs' own rounding bounds both)
    x = torch.randn(shape) * 0.5 + 300.0
    exact = F.layer_norm(x.double(), shape[-1:], w.double(), b.double(), eps).numpy()
    torch_error = np.abs(F.layer_norm(x, shape[-1:], w, b, eps).numpy() - exact).max()
    assert np.abs(run(mod, x, w, b) - exact).max() <= 2 * torch_error + 1e-6


def test_layer_norm_declines_other_axes_and_still_compiles_right() -> None:
    shape = (2, 6, 8)
    mod = norm_module(shape, 1e-5, axes=(1, 2))
    assert layer_norm.spec_of(mod["main"].body.blocks[0].bindings[0].value) is None
    x, w, b = torch.randn(shape), torch.randn(6, 8), torch.randn(6, 8)
    np.testing.assert_allclose(run(mod, x, w, b), F.layer_norm(x, (6, 8), w, b, 1e-5).numpy(), rtol=1e-4, atol=1e-4)


def test_a_layer_norm_left_in_tir_runs_on_the_kernel() -> None:
    model = nn.Sequential(nn.Linear(16, 40), nn.LayerNorm(40), nn.ReLU()).eval()
    with torch.no_grad():
        model[1].weight.normal_()
        model[1].bias.normal_()
    inputs = (torch.randn(3, 5, 16),)
    mod = dispatched_module(model, inputs, lambda k: "tir")
    target = resolve_target("cpu")
    passes = pipeline.lowering_passes(target, target.to_tvm(), None)
    legalized = pipeline.run(passes[:[name for name, _ in passes].index("LegalizeOps") + 1], mod, target.to_tvm())
    assert any(g.name_hint.startswith("layer_norm_3x5x40") for g in legalized.functions)
    with torch.no_grad():
        np.testing.assert_allclose(run_module(mod, inputs), model(*inputs).numpy(), rtol=1e-4, atol=1e-5)
