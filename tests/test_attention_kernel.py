"""sparsefx's float32 attention kernel: equals PyTorch's SDPA (bias, causal mask, scale, blocks shifted
back at the edges), and the pass swaps it in for attention decided onto it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tvm
from torch import nn

from sparsefx.backends.tvm.kernels import attention
from sparsefx.backends.tvm.kernels import registry as own_kernels
from sparsefx.cost.kernel import Kernel
from sparsefx.target import resolve_target

from .own_kernels_helper import dispatched

# (batch, seq, heads, dim, seq_kv, dim_v, scale, causal, bias): ViT's and BERT's shapes at a few heads, counts off
# every block (queries, keys, value rows), a given scale, a causal mask, a mask of the scores' shape
SPECS = [attention.AttentionSpec(1, 197, 2, 64, 197, 64, 0.0),
         attention.AttentionSpec(1, 128, 3, 64, 128, 64, 0.0, bias=True),
         attention.AttentionSpec(2, 64, 2, 32, 64, 32, 0.0, causal=True),
         attention.AttentionSpec(1, 50, 3, 24, 40, 20, 0.3, bias=True),
         attention.AttentionSpec(1, 33, 1, 16, 13, 7, 0.0, causal=True)]


def test_kernel_equals_torch_sdpa() -> None:
    specs = {s.name: s for s in SPECS}
    library = own_kernels.build("attention", list(specs.values()), resolve_target("cpu").to_tvm())
    torch.manual_seed(0)
    for s in specs.values():
        q, k, v = (torch.randn(shape) * 2 for shape in s.arg_shapes[:3])  # scores spread wide: the softmax matters
        bias = torch.randn(s.arg_shapes[3]) if s.bias else None
        out = tvm.runtime.empty(s.out_shape, "float32")
        library[s.name](*[tvm.runtime.tensor(t.numpy()) for t in (q, k, v, *([bias] if s.bias else []))], out)
        want = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias,
                                              is_causal=s.causal, scale=s.scale or None).transpose(1, 2)
        np.testing.assert_allclose(out.numpy(), want.numpy(), rtol=1e-4, atol=1e-5, err_msg=s.name)


def test_supported_leaves_short_query_runs_and_long_sequences_to_pytorch() -> None:
    assert attention.supported(Kernel("attention", (1, 197, 12, 64, 197, 64), (0.0, 0.0, 0.0)))
    assert not attention.supported(Kernel("attention", (1, 1, 32, 128, 900, 128), (0.0, 1.0, 0.0)))  # a decode step
    assert not attention.supported(Kernel("attention", (1, 4096, 8, 64, 4096, 64), (0.0, 1.0, 0.0)))  # scores past cache
    assert not attention.supported(Kernel("matmul", (1, 197, 768, 768)))
    assert own_kernels.own_kernel(Kernel("attention", (1, 128, 12, 64, 128, 64), (0.0, 0.0, 1.0)))[0] == "attention"


def test_query_blocks_are_four_vectors_unless_two_waste_fewer() -> None:
    assert attention.AttentionSpec(1, 197, 12, 64, 197, 64, 0.0).queries == 32  # 224 computed, 256 with four
    assert attention.AttentionSpec(1, 128, 12, 64, 128, 64, 0.0).queries == 64
    assert attention.AttentionSpec(1, 64, 12, 64, 64, 64, 0.0).value_rows == 4  # 4 divides 64, 6 (the widest) would not


class SelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(48, 3, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


@pytest.mark.parametrize("impl", ["attention", "torch"])
def test_pass_swaps_the_kernel_in_and_the_model_matches_eager(impl: str) -> None:
    torch.manual_seed(0)
    model, inputs = SelfAttention().eval(), (torch.randn(1, 40, 48),)
    text, got = dispatched(model, inputs, lambda k: impl if k.op == "attention" else "tir")
    assert ("attention_1x40x3x16_40x16_sd" in text) == (impl == "attention")
    with torch.no_grad():
        np.testing.assert_allclose(got, model(*inputs).numpy(), rtol=1e-4, atol=1e-5)


def test_grouped_query_attention_is_not_a_dispatch_workload() -> None:
    """Relax's attention takes fewer key/value heads than query heads; the attention kernel and SDPA's
    dispatched call index them as equal, so such a call is left to TVM."""
    from tvm import relax

    from sparsefx.backends.tvm.dispatch.patterns import kernel_of

    q, k, v = (relax.Var(name, relax.TensorType(shape, "float32"))
               for name, shape in (("q", (1, 40, 8, 16)), ("k", (1, 40, 2, 16)), ("v", (1, 40, 2, 16))))
    typed = relax.BlockBuilder().normalize
    assert kernel_of(typed(relax.op.nn.attention(q, k, v))) is None
    assert kernel_of(typed(relax.op.nn.attention(q, q, q))).dims == (1, 40, 8, 16, 40, 16)


def test_own_dispatch_keeps_attention_whole_for_the_kernel_and_matches_eager() -> None:
    """`dispatch="own"` (bundles, other CPUs: nothing on PyTorch) runs the attention kernel where it takes
    the call, instead of writing attention out as matmuls and a softmax."""
    from sparsefx.backends.tvm import compile as compile_

    torch.manual_seed(0)
    model, inputs = SelfAttention().eval(), (torch.randn(1, 40, 48),)
    compiled = compile_(model, inputs, dispatch="own", threads=1, verbose=False, cache=False)
    assert [d["impl"] for k, d in compiled.manifest["dispatch"].items() if k.startswith("attention")] == ["attention"]
    with torch.no_grad():
        np.testing.assert_allclose(compiled(*inputs).numpy(), model(*inputs).numpy(), rtol=1e-4, atol=1e-5)
