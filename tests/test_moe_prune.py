"""Mixture-of-experts decoders from transformers (small random configs: 2 layers, hidden 64, 4 experts,
top-2): each expert's hidden units and whole experts with their router rows; Qwen2-MoE's shared
expert. The pruned model is the user's class, its config says the new sizes, it generates, and
save_pretrained / from_pretrained (or sparsefx.save / load where layers differ) round-trips."""

from __future__ import annotations

import json
from unittest import mock

import numpy as np
import pytest
import torch

import sparsefx
from sparsefx.capture.compare import check_reference, output_error
from sparsefx.channels import moe_scores
from sparsefx.channels.moe_layout import moe_blocks

transformers = pytest.importorskip("transformers")
FAMILIES = [f for f in ("Mixtral", "Qwen2Moe", "Qwen3Moe") if hasattr(transformers, f"{f}ForCausalLM")]
EXPERTS, TOP_K, WIDTH, SHARED = 4, 2, 32, 48
COMMON = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, num_experts_per_tok=TOP_K, pad_token_id=0, bos_token_id=1, eos_token_id=2)
SIZES = {"Mixtral": dict(num_local_experts=EXPERTS, intermediate_size=WIDTH),
         "Qwen2Moe": dict(num_experts=EXPERTS, moe_intermediate_size=WIDTH, shared_expert_intermediate_size=SHARED),
         "Qwen3Moe": dict(num_experts=EXPERTS, moe_intermediate_size=WIDTH)}
MLP_ONLY = {f"model.layers.{i}.mlp": 0.5 for i in range(2)} | {"*": 0.0}


def build(family: str, seed: int = 0) -> torch.nn.Module:
    config = getattr(transformers, f"{family}Config")(**COMMON, **SIZES[family])
    torch.manual_seed(seed)
    model = getattr(transformers, f"{family}ForCausalLM")(config).eval()
    with torch.no_grad():  # Qwen's routers start at zero (every expert tied): give each token a clear choice
        for block in moe_blocks(model):
            block.gate.weight.normal_(0, 1)
    return model


def token_ids(batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(3, 1000, (batch, length), generator=torch.Generator().manual_seed(1))


def width_field(model: torch.nn.Module) -> int:
    config = model.config
    return config.moe_intermediate_size if hasattr(config, "moe_intermediate_size") else config.intermediate_size


def moe_steps(model: torch.nn.Module) -> list[dict]:
    return [change for step in model.sparsefx_removal["steps"] if step["method"] == "moe" for change in step["moe"]]


@pytest.mark.parametrize("family", [f for f in ("Mixtral", "Qwen2Moe") if f in FAMILIES])
def test_zeroed_expert_units_prune_exactly(tmp_path: object, family: str) -> None:
    """One expert per layer removed, then half of every expert's hidden units (each expert its own) and
    of the shared expert's zeroed: pruning the MLPs at 0.5 removes exactly those and no logit changes;
    every expert keeps the same count, which the config says; generate() runs with its cache and stock
    from_pretrained rebuilds the model from what save_pretrained wrote."""
    model, ids = sparsefx.prune_experts(build(family), 1), token_ids()
    count, rng = EXPERTS - 1, np.random.default_rng(0)
    with torch.no_grad():
        for block in moe_blocks(model):
            for e in range(count):
                gone = torch.as_tensor(rng.choice(WIDTH, WIDTH // 2, replace=False))
                block.experts.gate_up_proj[e, gone] = 0
                block.experts.gate_up_proj[e, WIDTH + gone] = 0
            shared = getattr(block.module, "shared_expert", None)
            if shared is not None:
                gone = torch.as_tensor(rng.choice(SHARED, SHARED // 2, replace=False))
                shared.gate_proj.weight[gone], shared.up_proj.weight[gone] = 0, 0
    expected = check_reference(model, (ids,))
    pruned = sparsefx.prune(model, (ids,), ratio=MLP_ONLY, importance="l1")
    assert type(pruned) is type(model)
    with torch.no_grad():
        error = output_error(expected, pruned(ids).logits)
    assert error.ok(), error
    for block in moe_blocks(pruned):
        assert block.experts.gate_up_proj.shape == (count, WIDTH, 64)  # gate and up, half each
        assert block.experts.down_proj.shape == (count, 64, WIDTH // 2) and block.experts.intermediate_dim == WIDTH // 2
        assert block.gate.weight.shape == (count, 64)
    kept = [tuple(row) for change in moe_steps(pruned) if "units" in change for row in change["units"]]
    assert len(kept) == 2 * count and len(set(kept)) > 1  # ranked per expert, not one choice for all
    assert width_field(pruned) == WIDTH // 2 and pruned.config.num_experts == count and width_field(model) == WIDTH
    if family == "Qwen2Moe":
        assert pruned.config.shared_expert_intermediate_size == SHARED // 2
        assert pruned.model.layers[0].mlp.shared_expert_gate.weight.shape == (1, 64)
    prompt = ids[:1, :5]
    cached = pruned.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=True)
    assert cached.shape == (1, 10) and torch.equal(cached, pruned.generate(prompt, max_new_tokens=5, do_sample=False,
                                                                             use_cache=False))
    pruned.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model) and loaded.config.num_experts == count
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, pruned(ids).logits, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_removed_experts_equal_router_logits_at_minus_inf(family: str) -> None:
    """Removing an expert and its router row computes what the dense model computes with that expert's
    router logit at -inf (softmax gives it 0, top-k never picks it); the config counts the experts."""
    model, ids = build(family), token_ids()
    pruned = sparsefx.prune_experts(model, 1)
    kept = {change["block"]: change["experts"] for change in moe_steps(pruned)}
    assert type(pruned) is type(model) and all(len(k) == EXPERTS - 1 for k in kept.values())
    linear = torch.nn.functional.linear
    with torch.no_grad():
        for block in moe_blocks(model):
            gone = sorted(set(range(EXPERTS)) - set(kept[block.name]))
            forward = block.gate.forward

            def masked(hidden: torch.Tensor, forward=forward, weight=block.gate.weight, gone=gone) -> object:
                def logits(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
                    out = linear(x, w, b)
                    if w is weight:
                        out[..., gone] = float("-inf")
                    return out
                with mock.patch("torch.nn.functional.linear", logits):
                    return forward(hidden)

            block.gate.forward = masked
        expected = model(ids).logits
        error = output_error(expected, pruned(ids).logits)
    assert error.ok(), error
    assert pruned.config.num_experts == EXPERTS - 1 and pruned.config.num_experts_per_tok == TOP_K
    assert pruned.num_experts == EXPERTS - 1 and model.config.num_experts == EXPERTS
    for block in moe_blocks(pruned):
        assert block.gate.weight.shape == (EXPERTS - 1, 64) and block.experts.num_experts == EXPERTS - 1


def test_uneven_layers_round_trip_through_sparsefx_save(tmp_path: object) -> None:
    """Layers cut to different expert widths, which one config field cannot say: the config keeps the
    dense width and sparsefx.save / load (on a fresh dense instance) replays both steps. (A graph step
    between two MoE steps replays in order too: see test_cli_calibration.)"""
    model, ids = build("Qwen3Moe" if "Qwen3Moe" in FAMILIES else "Mixtral"), token_ids()
    uneven = {"model.layers.0.mlp.experts": 0.5, "model.layers.1.mlp.experts": 0.25, "*": 0.0}
    pruned = sparsefx.prune(sparsefx.prune_experts(model, 2), (ids,), ratio=uneven)
    assert [b.width for b in moe_blocks(pruned)] == [WIDTH // 2, WIDTH * 3 // 4] and width_field(pruned) == WIDTH
    assert [step["method"] for step in pruned.sparsefx_removal["steps"]] == ["moe", "moe"]
    sparsefx.save(pruned, tmp_path / "saved")
    loaded = sparsefx.load(tmp_path / "saved", model=build(type(model).__name__.removesuffix("ForCausalLM"), seed=5))
    assert [(b.num_experts, b.width) for b in moe_blocks(loaded)] == [(2, WIDTH // 2), (2, WIDTH * 3 // 4)]
    with torch.no_grad():
        error = output_error(pruned(ids).logits, loaded(ids).logits)
    assert error.ok(), error
    description = json.loads((tmp_path / "saved" / "sparsefx.json").read_text())
    description["removal"][0]["moe"][0]["experts"] = [1]  # fewer than the router's top-k
    (tmp_path / "saved" / "sparsefx.json").write_text(json.dumps(description))
    with pytest.raises(sparsefx.SparsefxError, match=r"step 1: model.layers.0.mlp: kept experts must be at least 2"):
        sparsefx.load(tmp_path / "saved", model=build(type(model).__name__.removesuffix("ForCausalLM")))


def test_data_aware_expert_importance_looks_at_outputs() -> None:
    """An expert with the largest weights but an output ~1000x smaller: l1 keeps it, wanda (routing
    weight times output norm on calibration tokens) removes it."""
    model = build("Mixtral")
    with torch.no_grad():
        for block in moe_blocks(model):
            block.experts.gate_up_proj[0] *= 10
            block.experts.down_proj[0] *= 1e-4
    by_l1 = sparsefx.prune_experts(model, 1, importance="l1")
    by_wanda = sparsefx.prune_experts(model, 1, importance="wanda", calibration=[token_ids(4, 16)])
    assert all(0 in change["experts"] for change in moe_steps(by_l1))
    assert all(0 not in change["experts"] for change in moe_steps(by_wanda))
    by_taylor = sparsefx.prune_experts(model, 1, importance="taylor", calibration=token_ids(2, 16))
    assert all(len(change["experts"]) == EXPERTS - 1 for change in moe_steps(by_taylor))


@pytest.mark.parametrize("importance", ["wanda", "taylor"])
def test_data_aware_unit_scores_rank_inside_each_expert(importance: str) -> None:
    """Per expert one score per hidden unit; a unit with no weights scores lowest in its expert."""
    model = build("Qwen3Moe" if "Qwen3Moe" in FAMILIES else "Mixtral")
    blocks = moe_blocks(model)
    with torch.no_grad():
        for block in blocks:
            block.experts.gate_up_proj[:, [5, WIDTH + 5]] = 0
            block.experts.down_proj[:, :, 5] = 0
    scores = moe_scores.score(model, blocks, importance, whole=False, calibration=[token_ids(4, 16)])
    for block in blocks:
        assert scores[block.name].shape == (EXPERTS, WIDTH) and np.isfinite(scores[block.name]).all()
        assert (scores[block.name].argmin(1) == 5).all()


def test_impossible_requests_are_one_line_errors() -> None:
    model = build("Mixtral")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(sparsefx.PruneError, match=r"leaves fewer than num_experts_per_tok=2; remove at most 2$"):
        sparsefx.prune_experts(model, 3)
    with pytest.raises(sparsefx.PruneError, match="non-negative integer"):
        sparsefx.prune_experts(model, -1)
    with pytest.raises(sparsefx.PruneError, match="needs data"):
        sparsefx.prune_experts(model, 1, importance="wanda")
    with pytest.raises(sparsefx.CalibrationError, match="integer token ids"):
        sparsefx.prune_experts(model, 1, importance="wanda", calibration=torch.randn(2, 8, 64))
    with pytest.raises(sparsefx.PruneError, match="unknown importance"):
        sparsefx.prune_experts(model, 1, importance="bn_scale")
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{k: v for k, v in COMMON.items()
                                                                      if k != "num_experts_per_tok"}))
    with pytest.raises(sparsefx.PruneError, match="no mixture-of-experts layer"):
        sparsefx.prune_experts(llama, 1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and model.config.num_experts == EXPERTS
