"""Keep a pruned Hugging Face model's config true to its layers, where one number can say it.

`save_pretrained` writes the config and `from_pretrained` builds the model from it, so a
config that still says intermediate_size=3072 after the MLPs were cut to 1536 makes the
saved model unloadable. A size field is updated when every layer that had that width before
removal has one and the same width after (the MLPs pruned evenly); uneven widths, or pruned
heads (BERT derives the head width from hidden_size / num_attention_heads), are beyond what the
config can describe: it is left as it was and `from_pretrained` refuses the shapes.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsefx.channels.coupling import ChannelGroup
from sparsefx.log import get_logger

LOG = get_logger("channels")
# Config fields that are the width of a family of Linear layers' outputs (MLP hidden sizes).
WIDTH_FIELDS = ("intermediate_size", "n_inner", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim")


def linear_widths(model: nn.Module) -> dict[str, int]:
    return {name: m.out_features for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def sync_config(model: nn.Module, widths_before: dict[str, int]) -> list[str]:
    """Update `model.config`'s width fields to the pruned layers; returns the fields changed."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return []
    after = linear_widths(model)
    changed = []
    for field in WIDTH_FIELDS:
        width = getattr(config, field, None)
        if not isinstance(width, int):
            continue
        family = [name for name, before in widths_before.items() if before == width and name in after]
        new = {after[name] for name in family}
        if len(new) == 1 and width not in new:
            setattr(config, field, new.pop())
            changed.append(field)
        elif len(new) > 1:
            LOG.info(f"config.{field} cannot describe the pruned widths {sorted(new)}; "
                     "save_pretrained will write a config from_pretrained refuses (save with sparsefx.save)")
    return changed


# --- decoder language models: heads, key/value heads, head_dim, hidden size, RMSNorm eps -----------
HEAD_ATTRIBUTES = ("num_heads", "num_attention_heads")  # per-module copies some families keep
KV_ATTRIBUTES = ("num_key_value_heads",)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "qkv_proj")


def head_dim(model: nn.Module) -> int | None:
    """A decoder's head width as its config gives it (explicit head_dim, else hidden / heads)."""
    config = getattr(model, "config", None)
    heads, hidden = getattr(config, "num_attention_heads", None), getattr(config, "hidden_size", None)
    if not isinstance(heads, int) or not isinstance(hidden, int):
        return None
    return getattr(config, "head_dim", None) or hidden // heads


def splits_heads(group: ChannelGroup, width: int | None) -> bool:
    """True where a unit of `group` is part of a decoder's attention head: valid for the graph (a
    multi-query model's value features can go one by one), but the model's own class keeps one
    head_dim for q, k and v, so such a group is not offered for pruning."""
    if width is None:
        return False
    for unit in group.classes:
        for index, positions in group.members[unit].items():
            slot = group.slot_objs[index]
            layer = slot.layer.rsplit(".", 1)[-1]
            projects = (layer in PROJECTIONS and slot.dim == 0) or (layer == "o_proj" and slot.dim == 1)
            if projects and len(positions) % width:
                return True
    return False


def attention_heads(module: nn.Module, width: int) -> tuple[int, int] | None:
    """(query heads, key/value heads) of a Hugging Face decoder attention block, from its layers."""
    out = getattr(module, "o_proj", None)
    if not isinstance(out, nn.Linear):
        return None
    query = out.in_features // width
    if isinstance(getattr(module, "k_proj", None), nn.Linear):
        return query, module.k_proj.out_features // width
    if isinstance(getattr(module, "qkv_proj", None), nn.Linear):  # Phi-3: q, k, v stacked in one layer
        return query, (module.qkv_proj.out_features - out.in_features) // (2 * width)
    return None


def sync_decoder(model: nn.Module, width: int | None, norm_rescale: dict[str, float],
                 offset_norms: set[str] = frozenset()) -> list[str]:
    """After channel removal, make a decoder LM's modules and config describe its layers: RMSNorm eps
    rescaled (`channels.decoder`), per-module head counts, the embedding scale (Gemma), and the
    config's heads, key/value heads, head_dim, hidden and intermediate sizes where every layer
    agrees. Returns the fields changed."""
    rescale_embedding(model, offset_norms)
    for layer, ratio in norm_rescale.items():
        module = model.get_submodule(layer)
        for attr in ("variance_epsilon", "eps"):
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, getattr(module, attr) * ratio)
    config = getattr(model, "config", None)
    if width is None or config is None:
        return []
    changed: dict[str, object] = {}
    if len(set(norm_rescale.values())) == 1 and isinstance(getattr(config, "rms_norm_eps", None), float):
        changed["rms_norm_eps"] = config.rms_norm_eps * next(iter(norm_rescale.values()))
    heads = {}
    for name, module in model.named_modules():
        counts = attention_heads(module, width)
        if counts is None:
            continue
        heads[name] = counts
        for attr in HEAD_ATTRIBUTES + KV_ATTRIBUTES:
            if isinstance(getattr(module, attr, None), int):
                setattr(module, attr, counts[attr in KV_ATTRIBUTES])
        if isinstance(getattr(module, "num_key_value_groups", None), int):  # repeat_kv's copies per kv head
            module.num_key_value_groups = counts[0] // counts[1]
    if len(set(heads.values())) == 1:
        query, kv = next(iter(heads.values()))
        changed.update(num_attention_heads=query, num_key_value_heads=kv, head_dim=width)
    elif heads:
        LOG.info(f"layers keep different head counts {sorted(set(heads.values()))}: config.num_attention_heads "
                 "cannot describe them; save with sparsefx.save")
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if isinstance(embeddings, nn.Embedding):
        changed["hidden_size"] = embeddings.embedding_dim
    mlps = {name: m.down_proj.in_features for name, m in model.named_modules()
            if isinstance(getattr(m, "down_proj", None), nn.Linear)}
    for field, shared in (("intermediate_size", False), ("shared_expert_intermediate_size", True)):
        widths = {width for name, width in mlps.items() if name.endswith("shared_expert") == shared}
        if len(widths) == 1:  # Qwen2-MoE's shared experts have a size of their own
            changed[field] = widths.pop()
    fields = [k for k, v in changed.items() if hasattr(config, k) and getattr(config, k) != v or k == "head_dim"]
    for field in fields:
        setattr(config, field, changed[field])
    return fields


def rescale_embedding(model: nn.Module, offset_norms: set[str]) -> None:
    """Gemma multiplies embeddings by sqrt(hidden_size), a buffer its config rebuilds on load. With
    the hidden size cut from N to n, store weights times c = sqrt(N / n) and the scale sqrt(n): same
    output, and from_pretrained rebuilds the same scale. A tied lm_head then sees c times the
    weights, which the final norm (1 + w, the norm before lm_head) takes back. The working copy's
    tensors are replaced, not changed: the traced graph shares them."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    scale = getattr(embeddings, "scalar_embed_scale", None)
    if not isinstance(embeddings, nn.Embedding) or not isinstance(scale, float):
        return
    wanted = embeddings.embedding_dim ** 0.5
    if abs(scale - wanted) < 1e-6 * wanted:
        return
    factor = scale / wanted
    old = embeddings.weight
    embeddings.weight = nn.Parameter(old.detach() * factor, requires_grad=old.requires_grad)
    embeddings.scalar_embed_scale = wanted
    embeddings.embed_scale = torch.full_like(embeddings.embed_scale, wanted)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    norm = getattr(getattr(model, "model", None), "norm", None)
    if head is not None and head.weight is old and norm is not None:
        head.weight = embeddings.weight
        offset = 1.0 if any(name.endswith("model.norm") for name in offset_norms) else 0.0
        norm.weight = nn.Parameter((norm.weight.detach() + offset) / factor - offset)
