"""Rewrite pass (module level): replace `nn.MultiheadAttention` by `HeadAttention`.

`nn.MultiheadAttention` packs q/k/v into one weight and is a leaf to torch.fx, so its
heads are invisible to the coupling analysis. `HeadAttention` computes the same function
from four `nn.Linear` layers and plain reshapes, so heads become removable units.
Run on a copy before tracing. Invalidates: any trace of the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class HeadAttention(nn.Module):
    """Multi-head attention over separate q/k/v/out projections (same maths as nn.MultiheadAttention)."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, batch_first: bool = False,
                 bias: bool = True) -> None:
        super().__init__()
        self.head_dim, self.dropout, self.batch_first = embed_dim // num_heads, dropout, batch_first
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(embed_dim, embed_dim, bias=bias) for _ in range(3))
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        batch, length = query.shape[0], query.shape[1]
        q = self.q_proj(query).view(batch, length, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(key).view(batch, key.shape[1], -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(value).view(batch, value.shape[1], -1, self.head_dim).transpose(1, 2)
        mask = _merge_masks(attn_mask, key_padding_mask, q.dtype)
        dropout = self.dropout if self.training else 0.0
        if need_weights:
            scores = q @ k.transpose(-2, -1) * self.head_dim ** -0.5
            if is_causal:
                causal = torch.ones(length, key.shape[1], dtype=torch.bool, device=q.device).tril()
                scores = scores.masked_fill(~causal, float("-inf"))
            probs = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            out = F.dropout(probs, dropout, self.training) @ v
            weights = probs.mean(1) if average_attn_weights else probs
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal)
            weights = None
        out = self.out_proj(out.transpose(1, 2).reshape(batch, length, -1))
        return (out if self.batch_first else out.transpose(0, 1)), weights


def _merge_masks(attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None,
                 dtype: torch.dtype) -> torch.Tensor | None:
    """nn.MultiheadAttention's masks (True = masked out) as one additive float mask."""
    merged = None
    for mask, shape in ((attn_mask, None), (key_padding_mask, "padding")):
        if mask is None:
            continue
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
        if shape == "padding":
            mask = mask[:, None, None, :]
        merged = mask if merged is None else merged + mask
    return merged


def _splittable(m: nn.MultiheadAttention) -> bool:
    return m._qkv_same_embed_dim and m.bias_k is None and not m.add_zero_attn and m.in_proj_weight is not None


def from_multihead(m: nn.MultiheadAttention) -> HeadAttention:
    head = HeadAttention(m.embed_dim, m.num_heads, m.dropout, m.batch_first, bias=m.in_proj_bias is not None)
    head = head.to(device=m.in_proj_weight.device, dtype=m.in_proj_weight.dtype)
    with torch.no_grad():
        for i, proj in enumerate((head.q_proj, head.k_proj, head.v_proj)):
            proj.weight.copy_(m.in_proj_weight[i * m.embed_dim:(i + 1) * m.embed_dim])
            if m.in_proj_bias is not None:
                proj.bias.copy_(m.in_proj_bias[i * m.embed_dim:(i + 1) * m.embed_dim])
        head.out_proj.load_state_dict(m.out_proj.state_dict())
    return head.train(m.training)


def split_attention(model: nn.Module) -> int:
    """Swap every splittable nn.MultiheadAttention under `model` in place; returns how many."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.MultiheadAttention) and _splittable(child):
                setattr(parent, name, from_multihead(child))
                swapped += 1
    return swapped
