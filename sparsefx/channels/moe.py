"""Mixture-of-experts layers of Hugging Face decoders (Mixtral, Qwen2-MoE, Qwen3-MoE): each
expert's hidden units, and whole experts with their router rows.

Why module level: the expert dispatch is data-dependent (top-k routing, tokens gathered per
expert). torch.export captures it (sorted tokens and grouped matmuls), but no channel rule can
couple through a top-k, so the graph analysis freezes the expert tensors. The blocks are
handled here on the layout transformers (>= 5) gives them: `experts.gate_up_proj` (E, 2I, H),
gate rows then up rows, `experts.down_proj` (E, H, I), and the router `gate.weight` (E, H).

- Expert hidden units: unit j of expert e is gate row j, up row j and down column j; a unit
  whose gate and up rows are zero adds nothing, so removing it is exact. The experts of a layer
  are stacked tensors, so all keep the same count; each keeps its own units, ranked by its own
  scores (`moe_scores`).
- Whole experts: expert e's slices and router row e go. The router's softmax over the kept
  experts is the dense softmax with the removed experts' logits at -inf, and top-k then picks
  among kept experts only, so the pruned block computes exactly what the dense block computes
  with those logits at -inf. At least num_experts_per_tok experts must stay.

What changed is recorded as a removal step ("method": "moe") that `sparsefx.load` replays.
A shared expert (Qwen2-MoE) is a plain gated MLP of nn.Linear layers and its sigmoid gate a
Linear to one channel: the graph analysis prunes its hidden units like any MLP.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn

from sparsefx.channels import moe_scores
from sparsefx.channels.attention import split_attention
from sparsefx.channels.moe_layout import MoeBlock, moe_blocks
from sparsefx.channels.record import attach, history
from sparsefx.errors import PruneError

log = logging.getLogger("sparsefx.moe")
METHOD = "moe"  # the removal step's route: not a graph capture, replayed by `apply_changes`


# --- removal ---------------------------------------------------------------------------------------
def keep_units(block: MoeBlock, kept: np.ndarray) -> None:
    """Keep units kept[e] (sorted, the same count for every expert) of each expert of `block`."""
    experts, width = block.experts, block.width
    index = torch.as_tensor(kept, dtype=torch.long)
    gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
    rows = index[:, :, None].expand(-1, -1, gate_up.shape[2])
    gate_up = torch.cat([gate_up[:, :width].gather(1, rows), gate_up[:, width:].gather(1, rows)], 1)
    down = down.gather(2, index[:, None, :].expand(-1, down.shape[1], -1))
    experts.gate_up_proj = as_parameter(gate_up, experts.gate_up_proj)
    experts.down_proj = as_parameter(down, experts.down_proj)
    set_ints(experts, ("intermediate_dim", "intermediate_size"), index.shape[1])


def keep_experts(block: MoeBlock, kept: list[int]) -> None:
    """Keep experts `kept` (sorted) of `block` and their router rows."""
    index = torch.as_tensor(kept, dtype=torch.long)
    experts, gate = block.experts, block.gate
    experts.gate_up_proj = as_parameter(experts.gate_up_proj.detach()[index], experts.gate_up_proj)
    experts.down_proj = as_parameter(experts.down_proj.detach()[index], experts.down_proj)
    gate.weight = as_parameter(gate.weight.detach()[index], gate.weight)
    for module in (block.module, experts, gate):
        set_ints(module, ("num_experts", "num_local_experts"), len(kept))


def as_parameter(value: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    """A new parameter: the working copy's old tensors may be shared with a traced graph."""
    return nn.Parameter(value.detach().clone(), requires_grad=like.requires_grad)


def set_ints(module: nn.Module, names: Iterable[str], value: int) -> None:
    for name in names:
        if isinstance(getattr(module, name, None), int) and not isinstance(getattr(module, name), bool):
            setattr(module, name, value)


def apply_changes(model: nn.Module, changes: list[dict]) -> None:
    """Carry out removal-step changes ({"block", "experts": kept} or {"block", "units": kept per
    expert}) on `model` in place, each checked first, then make the config describe the blocks."""
    if not isinstance(changes, list):
        raise PruneError("a mixture-of-experts step must list its changes; the record is corrupt or edited")
    blocks = {b.name: b for b in moe_blocks(model)}
    for change in changes:
        block = blocks.get(change.get("block")) if isinstance(change, dict) else None
        if block is None:
            raise PruneError(f"{change.get('block') if isinstance(change, dict) else change!r} is not a mixture-of-"
                             f"experts block of {type(model).__name__}; the record does not fit this model")
        if "experts" in change:
            keep_experts(block, checked(change["experts"], block.num_experts, "experts", block.name,
                                        at_least=block.top_k))
        else:
            kept = [checked(row, block.width, "units", block.name) for row in change.get("units", [])]
            if len(kept) != block.num_experts or len({len(row) for row in kept}) != 1:
                raise PruneError(f"{block.name}: kept units must name one list of the same length per expert "
                                 f"({block.num_experts}); the record is corrupt or edited")
            keep_units(block, np.array(kept))
    sync_config(model)


def checked(kept: object, size: int, what: str, name: str, at_least: int = 1) -> list[int]:
    if (not isinstance(kept, list) or len(kept) < at_least or not all(isinstance(i, int) for i in kept)
            or kept != sorted(set(kept)) or kept[0] < 0 or kept[-1] >= size):
        raise PruneError(f"{name}: kept {what} must be at least {at_least} sorted distinct indices in 0..{size - 1}; "
                         "the record is corrupt or edited")
    return kept


def sync_config(model: nn.Module) -> list[str]:
    """Make the model's config (and its per-module copies) say the experts' count and width where
    every block agrees; where they differ, the config cannot say it (save with sparsefx.save)."""
    blocks = moe_blocks(model)
    counts, widths = {b.num_experts for b in blocks}, {b.width for b in blocks}
    config = getattr(model, "config", None)
    changed = []
    if len(counts) == 1:
        count = counts.pop()
        for module in model.modules():  # e.g. MixtralForCausalLM.num_experts, for the router's aux loss
            set_ints(module, ("num_experts",), count)
        for field in ("num_experts", "num_local_experts"):
            if isinstance(getattr(config, field, None), int) and getattr(config, field) != count:
                setattr(config, field, count)
                changed.append(field)
    field = "moe_intermediate_size" if hasattr(config, "moe_intermediate_size") else "intermediate_size"
    if len(widths) == 1 and isinstance(getattr(config, field, None), int):
        width = widths.pop()
        if getattr(config, field) != width:
            setattr(config, field, width)
            changed.append(field)
    if len(counts) > 1 or len(widths) > 1:
        log.info("mixture-of-experts layers differ (experts %s, widths %s): the config cannot describe them; "
                 "save with sparsefx.save", sorted(counts), sorted(widths))
    return changed


def carry_out(model: nn.Module, changes: list[dict]) -> nn.Module:
    """`apply_changes` on `model`, which then carries its removal record with one more step (the
    record taken first: a model never pruned is fingerprinted as it was)."""
    record = history(model)
    apply_changes(model, changes)
    record["steps"].append({"method": METHOD, "inputs": [], "kept": [], "moe": changes, "result": "module"})
    return attach(model, record)


# --- selection -------------------------------------------------------------------------------------
def unit_changes(blocks: list[MoeBlock], scores: dict[str, np.ndarray], ratio_of: Callable[[str], float],
                 round_to: int = 1) -> list[dict]:
    """Per block, the units each expert keeps: floor(ratio * width) of the lowest-scored go from
    every expert (the kept count rounded up to a multiple of `round_to`, at least one kept)."""
    changes = []
    for block in blocks:
        ratio = ratio_of(block.name)
        if not 0 <= ratio < 1:
            raise PruneError(f"ratio must be in [0, 1), got {ratio!r}")
        keep = block.width - int(np.floor(block.width * ratio))
        keep = min(block.width, -(-keep // round_to) * round_to)
        if keep == block.width:
            continue
        order = np.argsort(scores[block.name], axis=1, kind="stable")[:, block.width - keep:]
        changes.append({"block": block.name, "units": np.sort(order, axis=1).tolist()})
    return changes


def expert_changes(blocks: list[MoeBlock], scores: dict[str, np.ndarray], n: int) -> list[dict]:
    """Per block, the experts kept when its `n` lowest-scored experts go; refused where fewer than
    the router's top-k would stay."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise PruneError(f"n must be a non-negative integer number of experts per layer, got {n!r}")
    changes = []
    for block in blocks:
        if block.num_experts - n < block.top_k:
            raise PruneError(f"removing {n} of the {block.num_experts} experts of {block.name} leaves fewer than "
                             f"num_experts_per_tok={block.top_k}; remove at most {block.num_experts - block.top_k}")
        if n:
            order = np.argsort(scores[block.name], kind="stable")[n:]
            changes.append({"block": block.name, "experts": sorted(int(i) for i in order)})
    return changes


def prune_experts(model: nn.Module, n: int, importance: str = "l1", calibration: object | None = None,
                  example_inputs: object = (), loss_fn: Callable | None = None, seed: int = 0) -> nn.Module:
    """A copy of `model` with the `n` least important experts of every mixture-of-experts layer
    removed, with their router rows; the config's expert count follows.

    `importance`: "l1"/"l2" (the expert's weights), "wanda" (the routing-weighted norm of what the
    expert adds to the residual stream over `calibration`, or `example_inputs`), "taylor"
    (|w * dL/dw| summed over the expert's weights), "random". The input model is not modified."""
    if not isinstance(model, nn.Module):
        raise PruneError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    work = copy.deepcopy(model).eval()
    split_attention(work)  # the working copy `prune` and `sparsefx.load` start from
    blocks = moe_blocks(work)
    if not blocks:
        raise PruneError(f"{type(model).__name__} has no mixture-of-experts layer sparsefx knows (a block with "
                         "gate.weight (E, H) and experts.gate_up_proj / down_proj stacked per expert)")
    expert_changes(blocks, {b.name: np.zeros(b.num_experts) for b in blocks}, n)  # refuse before any data runs
    scores = moe_scores.score(work, blocks, importance, whole=True, example_inputs=example_inputs,
                              calibration=calibration, loss_fn=loss_fn, seed=seed)
    changes = expert_changes(blocks, scores, n)
    log.info("removing %d experts from each of %d layers", n, len(blocks))
    return carry_out(work, changes).train(model.training)
