"""Physical removal is exact: channels whose own weights are zero can go without changing outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sparsefx
from sparsefx.capture.compare import check_reference, first_tensor, output_error
from sparsefx.channels.attention import split_attention
from sparsefx.channels.importance import OWN_ROLES

from .models_zoo import CASES


def zero_lowest_classes(model: torch.nn.Module, inputs: tuple, ratio: float, method: str, seed: int = 0) -> int:
    """Zero the own parameters (producer rows, norm affine terms) of a random `ratio` of
    every prunable group's units; returns how many units were zeroed."""
    analysis = sparsefx.analyze(model, inputs, method=method)
    rng = np.random.default_rng(seed)
    zeroed = 0
    with torch.no_grad():
        for group in analysis.groups:
            if not group.prunable:
                continue
            free = group.free
            chosen = rng.choice(len(free), size=int(len(free) * ratio), replace=False)
            for index in chosen:
                members = group.members[free[index]]
                for s, positions in members.items():
                    slot = group.slot_objs[s]
                    if slot.roles & OWN_ROLES:
                        tensor = dict(model.named_parameters()) | dict(model.named_buffers())
                        tensor[slot.param].index_fill_(slot.dim, torch.as_tensor(positions), 0.0)
                zeroed += 1
    return zeroed


@pytest.mark.parametrize("method", ["fx", "export"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_pruning_zeroed_channels_is_exact(case: str, method: str) -> None:
    torch.manual_seed(0)
    build, make_inputs = CASES[case]
    model, inputs = build().eval(), make_inputs()
    split_attention(model)  # so that parameter names match the analysed copy's
    assert zero_lowest_classes(model, inputs, 0.5, method) > 0
    expected = check_reference(model, inputs)  # O(1) and input-dependent even with half the channels zeroed
    pruned = sparsefx.prune(model, inputs, ratio=0.5, importance="l1", method=method)
    assert sparsefx.count_params(pruned) < sparsefx.count_params(model)
    with torch.no_grad():
        error = output_error(expected, first_tensor(pruned(*inputs)))
    assert error.ok(), error


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_structure_has_prunable_groups(case: str) -> None:
    build, make_inputs = CASES[case]
    analysis = sparsefx.analyze(build().eval(), make_inputs())
    assert any(g.prunable for g in analysis.groups)


def test_attention_prunes_whole_heads() -> None:
    build, make_inputs = CASES["attention"]
    analysis = sparsefx.analyze(build().eval(), make_inputs())
    heads = [g for g in analysis.groups if any(s.layer == "q" for s in g.producers())]
    assert len(heads) == 1
    group = heads[0]
    assert len(group.classes) == 4 and group.size == 32  # 4 heads of 8 channels
    assert {s.layer for s in group.producers()} == {"q", "k", "v"}


def test_packed_multihead_attention_prunes_heads_and_stays_equivalent() -> None:
    build, make_inputs = CASES["packed_attention"]
    model, inputs = build().eval(), make_inputs()
    analysis = sparsefx.analyze(model, inputs)
    heads = [g for g in analysis.groups if any(s.layer == "attn.q_proj" for s in g.producers())]
    assert len(heads) == 1 and len(heads[0].classes) == 4
    pruned = sparsefx.prune(model, inputs, ratio=0.5)
    assert pruned.attn.q_proj.out_features == 16 and pruned(*inputs).shape == model(*inputs).shape


def test_depthwise_and_grouped_convs_lose_whole_groups() -> None:
    build, make_inputs = CASES["depthwise"]
    model, inputs = build().eval(), make_inputs()
    pruned = sparsefx.prune(model, inputs, ratio=0.5)
    assert pruned.dw[0].groups == pruned.dw[0].in_channels == pruned.dw[0].out_channels == 24
    assert pruned.grouped[0].groups == 2 and pruned.norm.num_groups * 4 == pruned.norm.num_channels
    assert pruned(*inputs).shape == model(*inputs).shape


class FocalGates(torch.nn.Module):
    """FocalNet's modulation: one conv's output split into a query, a context and per-level gates,
    each gate a single channel sliced out (gates[:, l:l+1]) and broadcast over the context's."""

    def __init__(self) -> None:
        super().__init__()
        self.f = torch.nn.Conv2d(8, 16 + 16 + 3, 1)
        self.focal = torch.nn.ModuleList(torch.nn.Conv2d(16, 16, 3, padding=1, groups=16) for _ in range(2))
        self.h, self.proj = torch.nn.Conv2d(16, 16, 1), torch.nn.Conv2d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, ctx, gates = torch.split(self.f(x), [16, 16, 3], 1)
        total = 0
        for level, layer in enumerate(self.focal):
            ctx = torch.nn.functional.gelu(layer(ctx))
            total = total + ctx * gates[:, level:level + 1]
        total = total + ctx.mean((2, 3), keepdim=True) * gates[:, 2:]
        return self.proj(q * self.h(total))


@pytest.mark.parametrize("method", ["fx", "export"])
def test_single_channel_gates_broadcast_over_many_stay(method: str) -> None:
    """Pruning a one-channel gate would leave none to broadcast (timm's FocalNet failed so); the
    gates are frozen and the rest prunes exactly."""
    torch.manual_seed(0)
    model, inputs = FocalGates().eval(), (torch.randn(2, 8, 6, 6),)
    groups = sparsefx.analyze(model, inputs, method=method).groups
    assert any("single channel broadcast" in why for g in groups for why in g.frozen.values())
    assert zero_lowest_classes(model, inputs, 0.5, method) > 0
    expected = check_reference(model, inputs)
    pruned = sparsefx.prune(model, inputs, ratio=0.5, importance="l1", method=method)
    assert sparsefx.count_params(pruned) < sparsefx.count_params(model)
    with torch.no_grad():
        error = output_error(expected, first_tensor(pruned(*inputs)))
    assert error.ok(), error
