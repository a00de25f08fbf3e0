"""One decoding step with the KV cache as tensors (sparsefx.capture.decode_step): the same logits
and new keys/values as transformers' own cached step and as a full forward, compiled through TVM
for a pruned decoder, and one-line errors for what it cannot take."""

from __future__ import annotations

import pytest
import torch

import sparsefx
from sparsefx.capture.compare import check_reference, output_error
from sparsefx.capture.decode_step import DecodeStep, cache_tensors

from .test_llm_prune import build, token_ids

pytest.importorskip("transformers")


def context(model: torch.nn.Module, length: int = 10) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    prompt = token_ids(batch=1, length=length)
    with torch.no_grad():
        return prompt, cache_tensors(model(prompt, use_cache=True))


def test_step_matches_a_full_forward_and_returns_the_new_keys() -> None:
    model = build("Llama")
    prompt, past = context(model)
    token = torch.tensor([[7]])
    with torch.no_grad():
        logits, *new = DecodeStep(model)(token, *past)
        full = model(torch.cat([prompt, token], 1), use_cache=True)
    error = output_error(full.logits[:, -1:], logits)
    assert error.ok(), error
    assert len(new) == len(past)
    for mine, cached in zip(new, cache_tensors(full), strict=True):
        assert mine.shape[-2] == 1
        assert torch.allclose(mine, cached[:, :, -1:], atol=1e-5)


def test_pruned_step_compiles_and_matches_eager() -> None:
    """The cache starts as an empty (0,) tensor that keys are concatenated onto; TVM's concat
    refused the mixed ranks until the importer dropped empty vectors as torch.cat does."""
    from sparsefx.backends.tvm import compile as tvm_compile

    pruned = sparsefx.prune(build("Qwen2"), (token_ids(batch=1, length=8),), ratio=0.5, importance="l1")
    _, past = context(pruned)
    inputs = (torch.tensor([[11]]), *past)
    step = DecodeStep(pruned).eval()
    expected = check_reference(step, inputs)
    compiled = tvm_compile(step, inputs, verbose=False, threads=1)
    error = output_error(expected, compiled(*inputs)[0])
    assert error.ok(), error


def test_wrong_cache_is_a_one_line_error() -> None:
    model = build("Llama")
    _, past = context(model)
    with pytest.raises(sparsefx.SparsefxError, match="a key and a value per layer"):
        DecodeStep(model)(torch.tensor([[7]]), *past[:-1])
    with pytest.raises(sparsefx.SparsefxError, match="transformers Cache"):
        cache_tensors((past[0], past[1]))
    with pytest.raises(sparsefx.SparsefxError, match="transformers decoder"):
        DecodeStep(torch.nn.Linear(2, 2))
