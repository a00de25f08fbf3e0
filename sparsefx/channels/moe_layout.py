"""The mixture-of-experts blocks `channels.moe` prunes: the stacked-expert layout of transformers >= 5
(Mixtral, Qwen2-MoE, Qwen3-MoE), found by structure, and nothing else."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class MoeBlock:
    """A sparse MoE block: `module.gate` (router) and `module.experts` (stacked expert weights)."""

    name: str
    module: nn.Module

    @property
    def experts(self) -> nn.Module:
        return self.module.experts

    @property
    def gate(self) -> nn.Module:
        return self.module.gate

    @property
    def num_experts(self) -> int:
        return self.experts.gate_up_proj.shape[0]

    @property
    def width(self) -> int:
        return self.experts.down_proj.shape[2]

    @property
    def top_k(self) -> int:
        return int(getattr(self.gate, "top_k", getattr(self.module, "top_k", 1)))

    def weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate, up, down) as float tensors: (E, I, H), (E, I, H), (E, H, I)."""
        gate_up = self.experts.gate_up_proj.detach().float()
        return gate_up[:, :self.width], gate_up[:, self.width:], self.experts.down_proj.detach().float()


def is_moe_block(module: nn.Module) -> bool:
    """The stacked-expert layout this module knows, and nothing else in it indexed by expert."""
    experts, gate = getattr(module, "experts", None), getattr(module, "gate", None)
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    router = getattr(gate, "weight", None)
    if not all(isinstance(t, nn.Parameter) for t in (gate_up, down, router)):
        return False
    if gate_up.dim() != 3 or down.dim() != 3 or router.dim() != 2:
        return False
    count, double, hidden = gate_up.shape
    plain = (not getattr(experts, "has_bias", False) and not getattr(experts, "is_transposed", False)
             and getattr(experts, "is_concatenated", True) and getattr(experts, "has_gate", True))
    only = {n for n, _ in experts.named_parameters()} | {n for n, _ in experts.named_buffers()}
    extra = [n for n, _ in list(gate.named_parameters()) + list(gate.named_buffers()) if n != "weight"]
    return (plain and only == {"gate_up_proj", "down_proj"} and not extra and double % 2 == 0
            and down.shape == (count, hidden, double // 2) and router.shape == (count, hidden))


def moe_blocks(model: nn.Module) -> list[MoeBlock]:
    return [MoeBlock(name, m) for name, m in model.named_modules() if is_moe_block(m)]
