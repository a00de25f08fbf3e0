"""sparsefx's float32 Linear kernel: equals PyTorch's (bias, ReLU, both GELUs), and the pass swaps it in."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tvm
from torch import nn

from sparsefx.backends.tvm.kernels import linear
from sparsefx.backends.tvm.kernels import registry as own_kernels
from sparsefx.cost.kernel import Kernel
from sparsefx.target import resolve_target

from .own_kernels_helper import dispatched

ACT = {"none": lambda t: t, "relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}
# (rows, inputs, outputs, activation): ConvNeXt's pruned shapes, counts off the row and output blocks
SPECS = [(3136, 48, 192, "gelu"), (49, 384, 96, "none"), (37, 40, 70, "relu"), (20, 64, 33, "gelu_tanh"),
         (14, 5, 32, "gelu"), (100, 17, 95, "none"), (1, 512, 1000, "none"), (8, 700, 40, "relu"),  # classifiers: one row block
         (45, 301, 256, "gelu"),  # wide blocks (64 outputs x 6 rows), a reduction not a multiple of the unroll
         (13, 1536, 128, "none")]  # the most inputs it takes (pruned BERT-base's second FFN layer)


@pytest.mark.parametrize(("rows", "inputs", "outputs", "act"), SPECS)
def test_kernel_equals_torch_linear_with_bias_and_activation(rows: int, inputs: int, outputs: int, act: str) -> None:
    spec = linear.LinearSpec(rows, inputs, outputs, act)
    library = tvm.compile(tvm.IRModule({"main": linear.kernel(spec).with_attr("global_symbol", "main")}),
                          resolve_target("cpu").to_tvm())
    torch.manual_seed(0)
    x, w, b = torch.randn(rows, inputs) * 2, torch.randn(inputs, outputs), torch.randn(outputs)
    out = tvm.runtime.empty(spec.out_shape, "float32")
    library["main"](*[tvm.runtime.tensor(a) for a in (x.numpy(), linear.pack_weight(spec, w.numpy()), b.numpy())], out)
    want = ACT[act](x @ w + b)
    np.testing.assert_allclose(out.numpy(), want.numpy(), rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_erf_matches_torch_where_gelu_needs_it() -> None:
    """GELU's erf approximation, over and past [-4, 4] (clamped there): within float32's rounding."""
    spec = linear.LinearSpec(14, 1, 32, "gelu")
    library = tvm.compile(tvm.IRModule({"main": linear.kernel(spec).with_attr("global_symbol", "main")}),
                          resolve_target("cpu").to_tvm())
    x = torch.linspace(-12, 12, 14 * 32).reshape(14, 32)  # each output v = x: a weight of 1, no bias
    out = tvm.runtime.empty(spec.out_shape, "float32")
    got = np.empty((14, 32), np.float32)
    for col in range(32):
        w = np.zeros((1, 32), np.float32)
        w[0, col] = 1.0
        library["main"](tvm.runtime.tensor(x[:, col:col + 1].contiguous().numpy()),
                        tvm.runtime.tensor(linear.pack_weight(spec, w)), tvm.runtime.tensor(np.zeros(32, np.float32)), out)
        got[:, col] = out.numpy()[:, col]
    np.testing.assert_allclose(got, F.gelu(x).numpy(), rtol=1e-6, atol=1e-6)


def test_supported_takes_weight_matmuls_of_whole_blocks_with_few_inputs_or_rows() -> None:
    assert linear.supported(Kernel("matmul", (1, 3136, 48, 192)))
    assert not linear.supported(Kernel("matmul", (12, 128, 64, 128)))  # both operands activations
    assert linear.supported(Kernel("matmul", (1, 1, 2048, 1000)))  # a classifier: one row block, each weight read once
    assert not linear.supported(Kernel("matmul", (1, 15, 2048, 1000)))  # two row blocks: the weight read twice, from memory
    assert not linear.supported(Kernel("matmul", (1, 128, 48, 31)))  # fewer outputs than a block
    assert linear.supported(Kernel("matmul", (1, 128, 1536, 768)))
    assert not linear.supported(Kernel("matmul", (1, 128, 3072, 768)))  # an output block's weight past cache
    assert own_kernels.own_kernel(Kernel("matmul", (1, 128, 768, 768)))[0] == "linear"


def test_pass_runs_a_linear_on_a_channels_last_map_with_its_gelu() -> None:
    model = nn.Sequential(nn.Linear(24, 64), nn.GELU(), nn.Linear(64, 40)).eval()
    inputs = (torch.randn(1, 7, 9, 24),)  # ConvNeXt's layout: (n, h, w, c)
    text, got = dispatched(model, inputs, lambda k: "linear")
    assert "linear_63x24to64_gelu" in text and "linear_63x64to40_none" in text and "R.nn.gelu" not in text
    with torch.no_grad():
        np.testing.assert_allclose(got, model(*inputs).numpy(), rtol=1e-4, atol=1e-5)


def test_pass_fuses_the_gelu_after_a_reshape_back_to_tokens() -> None:
    """A Linear on (batch, tokens, features) imports as a 2-D matmul reshaped back before its GELU (BERT)."""
    model = nn.Sequential(nn.Linear(24, 64), nn.GELU()).eval()
    inputs = (torch.randn(1, 20, 24),)
    text, got = dispatched(model, inputs, lambda k: "linear")
    assert "linear_20x24to64_gelu" in text and "R.nn.gelu" not in text
    with torch.no_grad():
        np.testing.assert_allclose(got, model(*inputs).numpy(), rtol=1e-4, atol=1e-5)


def test_blocks_are_four_vectors_wide_unless_two_waste_fewer_outputs() -> None:
    assert linear.LinearSpec(197, 768, 2304).block == 64 and linear.LinearSpec(197, 768, 2304).block_rows == 6
    assert linear.LinearSpec(1, 2048, 1000).block == 64  # 16 wide blocks or 32 narrow: 24 outputs wasted either way
    assert linear.LinearSpec(784, 384, 96).block == 32 and linear.LinearSpec(784, 384, 96).block_rows == 14
    assert linear.LinearSpec(37, 40, 70).block == 32 and linear.LinearSpec(20, 64, 33).block == 32
