"""Depth pruning (sparsefx.prune_layers): the least influential decoder layers go, the rest compute
what the dense model computes with those layers skipped, and the Hugging Face model still generates."""

import numpy as np
import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

import sparsefx
from sparsefx.channels.depth import block_influence


def llama(layers: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # layers of very different influence: scale each block's output projections
        for i, layer in enumerate(model.model.layers):
            for proj in (layer.self_attn.o_proj, layer.mlp.down_proj):
                proj.weight.mul_([3.0, 0.05, 1.0, 0.2, 2.0, 0.5][i % 6])
    return model


def calibration() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 96, (2, 12), generator=g) for _ in range(2)]


def skipping(model: LlamaForCausalLM, skipped: list[int]) -> list:
    """Hooks that make the given layers hand back their input: the dense model with them skipped."""
    def identity(module, args, kwargs, output):
        return args[0] if args else kwargs["hidden_states"]
    return [model.model.layers[i].register_forward_hook(identity, with_kwargs=True) for i in skipped]


def test_lowest_influence_layers_go_and_outputs_match_skipping():
    model = llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    influence = block_influence(model, calibration())
    pruned = sparsefx.prune_layers(model, calibration(), n=2)
    removed = pruned.sparsefx_depth["removed"]
    assert removed == sorted(np.argsort(influence)[:2].tolist()) == [1, 3]  # the down-scaled blocks
    assert len(pruned.model.layers) == 2 and pruned.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == [0, 1]
    # the user's model is untouched
    assert len(model.model.layers) == 4 and model.config.num_hidden_layers == 4
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())

    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(7))
    handles = skipping(model, removed)
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
    for h in handles:
        h.remove()
    with torch.no_grad():
        actual = pruned(ids, use_cache=False).logits
        dense = model(ids, use_cache=False).logits
    assert torch.allclose(actual, expected, atol=1e-5)
    assert not torch.allclose(actual, dense, atol=1e-3)  # skipping those layers does change the output


def test_generate_with_cache_after_depth_pruning():
    model = llama()
    pruned = sparsefx.prune_layers(model, calibration(), n=1)
    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cached = pruned.generate(ids, max_new_tokens=5, do_sample=False, use_cache=True)
        uncached = pruned.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False)
    assert cached.shape == (1, 11) and torch.equal(cached, uncached)


def test_depth_then_width(tmp_path):
    model = llama()
    model.config.use_cache = False
    shallow = sparsefx.prune_layers(model, calibration(), n=2)
    ids = torch.randint(0, 96, (1, 8))
    narrow = sparsefx.prune(shallow, (ids,), ratio={"model.layers.0.mlp.up_proj": 0.5, "model.layers.1.mlp.up_proj": 0.5})
    assert sparsefx.count_params(narrow) < sparsefx.count_params(shallow) < sparsefx.count_params(model)
    assert narrow(ids).logits.shape == (1, 8, 96)
    shallow.save_pretrained(tmp_path)
    again = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert again.config.num_hidden_layers == 2
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, shallow(ids).logits, atol=1e-6)


@pytest.mark.parametrize("n", [0, 4, 7, 1.5])
def test_bad_layer_count_is_one_line(n):
    model = llama()
    with pytest.raises(sparsefx.PruneError, match="blocks to remove") as info:
        sparsefx.prune_layers(model, calibration(), n=n)
    assert "\n" not in str(info.value) and len(model.model.layers) == 4


@pytest.mark.parametrize("bad", [torch.randn(2, 12), torch.randint(0, 96, (12,)), torch.full((2, 4), 500), [],
                                 [("text",)]])
def test_bad_calibration_is_one_line(bad):
    model = llama()
    with pytest.raises(sparsefx.CalibrationError) as info:
        sparsefx.prune_layers(model, bad, n=1)
    assert "\n" not in str(info.value) and len(model.model.layers) == 4


def gpt2() -> torch.nn.Module:
    return GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=4, n_head=2))


def gemma2() -> torch.nn.Module:  # alternating sliding/full attention: config.layer_types per layer
    return Gemma2ForCausalLM(Gemma2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                          num_attention_heads=2, num_key_value_heads=1, head_dim=16))


@pytest.mark.parametrize("build", [gpt2, gemma2])
def test_other_families_keep_their_cache_and_per_layer_config(build):
    torch.manual_seed(0)
    model = build().eval()
    types = getattr(model.config, "layer_types", None)
    pruned = sparsefx.prune_layers(model, calibration(), n=2)
    kept = pruned.sparsefx_depth["kept"]
    assert pruned.config.num_hidden_layers == 2
    if types is not None:
        assert pruned.config.layer_types == [types[i] for i in kept]
    ids = torch.randint(0, 96, (1, 6))
    with torch.no_grad():
        assert torch.equal(pruned.generate(ids, max_new_tokens=4, do_sample=False, use_cache=True),
                           pruned.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False))
