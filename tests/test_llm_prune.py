"""Decoder LLMs from transformers (small random configs): heads in GQA groups, hidden size through
RMSNorm, gated MLPs; the pruned model is the user's class, generates with its cache, and
save_pretrained / from_pretrained round-trips without sparsefx."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import sparsefx
from sparsefx.capture.compare import check_reference, first_tensor, output_error

from .test_exactness import zero_lowest_classes

transformers = pytest.importorskip("transformers")
FAMILIES = ["Llama", "Mistral", "Qwen2", "Qwen3", "Phi3", "Gemma"]
HEADS, KV_HEADS, HEAD_DIM = 8, 2, 32


def build(family: str, seed: int = 0) -> torch.nn.Module:
    config = getattr(transformers, f"{family}Config")(
        vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    return getattr(transformers, f"{family}ForCausalLM")(config).eval()


def token_ids(batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(3, 1000, (batch, length), generator=torch.Generator().manual_seed(1))


def layer_heads(model: torch.nn.Module) -> set[tuple[int, int]]:
    """(query heads, key/value heads) read off every attention block's weights."""
    found = set()
    for module in model.modules():
        if hasattr(module, "o_proj"):
            query = module.o_proj.in_features // HEAD_DIM
            if hasattr(module, "k_proj"):
                found.add((query, module.k_proj.out_features // HEAD_DIM))
            else:
                found.add((query, (module.qkv_proj.out_features - module.o_proj.in_features) // (2 * HEAD_DIM)))
    return found


@pytest.mark.parametrize("family", FAMILIES)
def test_zeroed_units_prune_exactly_into_the_users_class(family: str) -> None:
    """Half of every head group, MLP and (where prunable) hidden channel zeroed in the dense model:
    pruning them away changes no logit, and the config describes the smaller layers."""
    model, ids = build(family), token_ids()
    assert zero_lowest_classes(model, (ids,), 0.5, "export") > 0
    expected = check_reference(model, (ids,))  # input-dependent, not near zero
    pruned = sparsefx.prune(model, (ids,), ratio=0.5, importance="l1")
    assert type(pruned) is type(model)
    assert sparsefx.count_params(pruned) < 0.75 * sparsefx.count_params(model)
    with torch.no_grad():
        error = output_error(expected, first_tensor(pruned(ids)))
    assert error.ok(), error
    config = pruned.config
    assert layer_heads(pruned) == {(config.num_attention_heads, config.num_key_value_heads)}
    assert config.num_attention_heads < HEADS and config.num_attention_heads % config.num_key_value_heads == 0
    assert config.intermediate_size == pruned.model.layers[0].mlp.down_proj.in_features < 512
    assert config.hidden_size == pruned.model.embed_tokens.embedding_dim < 256
    assert model.config.num_attention_heads == HEADS and model.config.use_cache  # the input is untouched


def test_gqa_unit_is_a_kv_head_with_its_query_heads() -> None:
    analysis = sparsefx.analyze(build("Llama"), (token_ids(),))
    group = next(g for g in analysis.groups if any(s.param.endswith("layers.0.self_attn.k_proj.weight")
                                                   for s in g.producers()))
    assert len(group.classes) == KV_HEADS
    for unit in group.classes:
        widths = {group.slot_objs[s].param.rsplit(".", 2)[-2]: len(p) for s, p in group.members[unit].items()
                  if group.slot_objs[s].dim == 0}
        assert widths == {"q_proj": HEADS // KV_HEADS * HEAD_DIM, "k_proj": HEAD_DIM, "v_proj": HEAD_DIM}
        query = group.members[unit][next(s for s in group.members[unit] if group.slot_objs[s].param.endswith("q_proj.weight"))]
        assert set(query // HEAD_DIM) == set(range(query[0] // HEAD_DIM, query[0] // HEAD_DIM + HEADS // KV_HEADS))


def test_rmsnorm_hidden_channels_are_prunable_and_rescaled() -> None:
    model, ids = build("Llama"), token_ids()
    pruned = sparsefx.prune(model, (ids,), ratio={"model.embed_tokens": 0.5, "*": 0.0})
    norm = pruned.model.layers[0].input_layernorm
    assert norm.weight.shape == (128,) and norm.variance_epsilon == pytest.approx(2 * model.config.rms_norm_eps)
    assert pruned.config.rms_norm_eps == pytest.approx(2 * model.config.rms_norm_eps)


def test_generate_after_pruning_uses_the_cache() -> None:
    model, ids = build("Qwen2"), token_ids(1, 6)
    pruned = sparsefx.prune(model, (token_ids(),), ratio=0.5)
    assert pruned.config.use_cache
    cached = pruned.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
    uncached = pruned.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.shape == (1, 12) and torch.equal(cached, uncached)
    with torch.no_grad():
        step = pruned(ids, use_cache=True)
    assert step.past_key_values is not None


@pytest.mark.parametrize("family", ["Llama", "Phi3", "Gemma"])  # plain, fused q/k/v, tied + scaled embeddings
def test_save_pretrained_round_trips_without_sparsefx(tmp_path: object, family: str) -> None:
    model, ids = build(family), token_ids()
    pruned = sparsefx.prune(model, (ids,), ratio=0.5)
    pruned.save_pretrained(tmp_path)
    with torch.no_grad():
        torch.save({"ids": ids, "logits": pruned(ids).logits}, tmp_path / "expected.pt")
    script = (
        "import sys, torch, transformers\n"
        f"d = {str(tmp_path)!r}\n"
        "m = transformers.AutoModelForCausalLM.from_pretrained(d).eval()\n"
        "e = torch.load(d + '/expected.pt')\n"
        "with torch.no_grad(): out = m(e['ids']).logits\n"
        "assert 'sparsefx' not in sys.modules\n"
        "print(type(m).__name__, float((out - e['logits']).abs().max()), m.config.num_attention_heads)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    name, error, heads = done.stdout.split()
    assert name == type(model).__name__ and float(error) < 1e-5 and int(heads) == pruned.config.num_attention_heads


def test_bare_decoder_keeps_its_output_width() -> None:
    """A bare *Model hands its hidden states to the user: heads and MLP shrink, the hidden size stays."""
    model, ids = transformers.LlamaModel(build("Llama").config).eval(), token_ids()
    pruned = sparsefx.prune(model, (ids,), ratio=0.5)
    assert type(pruned) is transformers.LlamaModel
    assert pruned.config.hidden_size == 256 and pruned.config.num_attention_heads == HEADS // 2
    with torch.no_grad():
        assert pruned(ids).last_hidden_state.shape == model(ids).last_hidden_state.shape


def test_unsupported_structure_names_the_op_that_freezes_it() -> None:
    """Mixtral's hidden size is beyond the analysis (the expert dispatch indexes the hidden states per
    token): asked to prune only it, prune says which op holds which layer and leaves the user's model
    as it was."""
    config = transformers.MixtralConfig(
        vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, num_local_experts=4, num_experts_per_tok=2, pad_token_id=0)
    model = transformers.MixtralForCausalLM(config).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match=r"nothing to prune.*frozen: .*index.*model\.embed_tokens"):
        sparsefx.prune(model, (token_ids(),), ratio={"model.embed_tokens": 0.5, "*": 0.0})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and model.config.use_cache


@pytest.mark.parametrize("kv_heads", [4, 1])
def test_gqa_ratio_holds_in_every_layer_under_global_ranking(kv_heads: int) -> None:
    """Layers ranked together may lose different numbers of units, yet each keeps query heads a
    multiple of its key/value heads, and stays the user's class: with grouped kv heads a group
    goes whole; with one kv head (multi-query) single query heads go and the kv head stays."""
    config = build("Llama").config
    config.num_key_value_heads = kv_heads
    model, ids = transformers.LlamaForCausalLM(config).eval(), token_ids()
    pruned = sparsefx.prune(model, (ids,), ratio=0.5, global_ranking=True)
    assert type(pruned) is transformers.LlamaForCausalLM
    assert sparsefx.count_params(pruned) < 0.75 * sparsefx.count_params(model)
    for query, kv in layer_heads(pruned):
        assert query % kv == 0 and (query // kv == HEADS // kv_heads if kv_heads > 1 else kv == 1)


def test_multi_query_attention_prunes_single_query_heads() -> None:
    """One kv head shared by all query heads: each query head is a unit (the kv head's copies go with
    it); heads whose query rows and output columns are zero go without changing a logit, also with
    eager attention, which repeats the kv head num_key_value_groups times."""
    config = build("Llama").config
    config.num_key_value_heads, config._attn_implementation = 1, "eager"
    model, ids = transformers.LlamaForCausalLM(config).eval(), token_ids()
    gone = (1, 3, 5, 6)
    with torch.no_grad():
        for layer in model.model.layers:
            for head in gone:
                layer.self_attn.q_proj.weight[head * HEAD_DIM:(head + 1) * HEAD_DIM] = 0
                layer.self_attn.o_proj.weight[:, head * HEAD_DIM:(head + 1) * HEAD_DIM] = 0
    expected = check_reference(model, (ids,))
    heads_only = {f"model.layers.{i}.self_attn.q_proj": 0.5 for i in range(2)} | {"*": 0.0}
    pruned = sparsefx.prune(model, (ids,), ratio=heads_only)
    assert type(pruned) is transformers.LlamaForCausalLM and layer_heads(pruned) == {(HEADS - len(gone), 1)}
    assert pruned.model.layers[0].self_attn.num_key_value_groups == HEADS - len(gone)
    with torch.no_grad():
        error = output_error(expected, first_tensor(pruned(ids)))
    assert error.ok(), error
    prompt = ids[:1, :4]
    assert torch.equal(pruned.generate(prompt, max_new_tokens=4, do_sample=False),
                       model.generate(prompt, max_new_tokens=4, do_sample=False))


def test_uneven_layers_round_trip_through_sparsefx_save(tmp_path: object) -> None:
    """Layers ranked together keep different MLP widths, which config.intermediate_size cannot say:
    the config keeps the dense value and sparsefx.save / sparsefx.load (given the dense architecture)
    carry the model."""
    model, ids = build("Llama"), token_ids()
    pruned = sparsefx.prune(model, (ids,), ratio=0.5, global_ranking=True)
    widths = [layer.mlp.down_proj.in_features for layer in pruned.model.layers]
    assert len(set(widths)) > 1 and pruned.config.intermediate_size == 512
    sparsefx.save(pruned, tmp_path / "saved")
    loaded = sparsefx.load(tmp_path / "saved", model=build("Llama", seed=5))
    assert type(loaded) is transformers.LlamaForCausalLM
    assert [layer.mlp.down_proj.in_features for layer in loaded.model.layers] == widths
    with torch.no_grad():
        error = output_error(pruned(ids).logits, loaded(ids).logits)
    assert error.ok(), error


class TinyRMSNorm(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight, self.eps = torch.nn.Parameter(torch.rand(width) + 0.5), 1e-2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class TinyResidual(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.norm = torch.nn.Embedding(50, 16), TinyRMSNorm(16)
        self.up, self.down, self.head = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16), torch.nn.Linear(16, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        x = x + self.down(torch.relu(self.up(self.norm(x))))
        return self.head(self.norm(x))


@pytest.mark.parametrize("method", ["fx", "export"])
def test_rmsnorm_rescale_is_exact_on_a_users_own_norm(method: str) -> None:
    """The eps (large here, so a missing rescale shows) and weight rescale hold for any module written
    as w * x * rsqrt(mean(x^2) + eps), on both capture routes; the user's class comes back."""
    torch.manual_seed(0)
    model, ids = TinyResidual().eval(), token_ids(2, 6) % 50
    with torch.no_grad():  # hidden channels 0..7 zero everywhere they are produced
        model.embed.weight[:, :8] = 0
        model.down.weight[:8], model.down.bias[:8] = 0, 0
    expected = check_reference(model, (ids,))
    pruned = sparsefx.prune(model, (ids,), ratio={"embed": 0.5, "*": 0.0}, method=method)
    assert type(pruned) is TinyResidual and pruned.norm.weight.shape == (8,)
    assert pruned.norm.eps == pytest.approx(2e-2)
    with torch.no_grad():
        error = output_error(expected, pruned(ids))
    assert error.ok(), error


@pytest.mark.parametrize("family", ["Llama", "Qwen2"])
def test_pruned_decoder_compiles_and_matches_eager(family: str) -> None:
    """sparsefx.compile on a pruned *ForCausalLM (its causal mask cumsums a bool tensor, which
    TVM's importer kept as bool and LLVM could not add): the logits match eager."""
    from sparsefx.backends.tvm import compile as tvm_compile

    ids = token_ids(batch=1, length=8)
    pruned = sparsefx.prune(build(family), (ids,), ratio=0.5, importance="l1")
    expected = check_reference(pruned, (ids,))
    compiled = tvm_compile(pruned, (ids,), verbose=False, threads=1)
    error = output_error(expected, first_tensor(compiled(ids)))
    assert error.ok(), error
