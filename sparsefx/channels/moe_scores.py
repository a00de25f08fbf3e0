"""Importance of mixture-of-experts hidden units and of whole experts (`channels.moe`).

Hidden units are ranked inside their own expert (each expert keeps its own units), so only the
order within an expert matters:
- l1 / l2: the unit's gate and up rows (its producers, as for any channel group);
- wanda: |W| * ||X|| summed over the unit's gate and up rows (X: the tokens routed to that
  expert) and its down column (X: the unit's activation on those tokens);
- taylor: |sum w * dL/dw| over its gate rows plus the same over its up rows;
- random.
An expert that no calibration token reached has no data to rank by: its units go by l1.

Whole experts: l1 / l2 of all the expert's weights; wanda, the sum over calibration tokens of the
expert's routing weight times the norm of its output (what it adds to the residual stream; an
expert never chosen scores 0); taylor, |sum w * dL/dw| over its gate/up and over its down weights.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from sparsefx.capture.trace import as_inputs, no_kv_cache
from sparsefx.channels.calibration import CalibrationError, batches, default_loss, main_output
from sparsefx.channels.depth import check_tokens
from sparsefx.channels.importance import calibration_batches
from sparsefx.channels.moe_layout import MoeBlock
from sparsefx.errors import PruneError, one_line

CRITERIA = ("l1", "l2", "wanda", "taylor", "random")


def score(model: nn.Module, blocks: list[MoeBlock], importance: str, whole: bool, example_inputs: object = (),
          calibration: object | None = None, loss_fn: Callable | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """{block name: scores}: (experts,) with `whole`, else (experts, units). Runs `model` for wanda
    and taylor (on `calibration`, else `example_inputs`); changes nothing."""
    if importance not in CRITERIA:
        raise PruneError(f"unknown importance {importance!r} for mixture-of-experts layers; use one of "
                         f"{', '.join(CRITERIA)}")
    if importance == "random":
        rng = np.random.default_rng(seed)
        return {b.name: rng.random(b.num_experts if whole else (b.num_experts, b.width)) for b in blocks}
    if importance in ("l1", "l2"):
        return {b.name: magnitude(b, 1 if importance == "l1" else 2, whole) for b in blocks}
    runs = data(model, example_inputs, calibration, importance)
    if importance == "wanda":
        stats = routed(model, blocks, runs)
        return {b.name: stats[b.name].contribution.numpy() if whole else wanda_units(b, stats[b.name]) for b in blocks}
    grads = gradients(model, blocks, runs, loss_fn)
    return {b.name: taylor(b, *grads[b.name], whole) for b in blocks}


def magnitude(block: MoeBlock, p: int, whole: bool) -> np.ndarray:
    gate, up, down = (t.abs() if p == 1 else t.pow(2) for t in block.weights())
    if whole:
        return (gate.sum((1, 2)) + up.sum((1, 2)) + down.sum((1, 2))).numpy()
    return (gate.sum(2) + up.sum(2)).numpy()


def data(model: nn.Module, example_inputs: object, calibration: object | None, criterion: str) -> list[tuple]:
    """The batches a data-aware criterion runs, checked like the graph criteria check theirs."""
    inputs = as_inputs(example_inputs)
    if inputs:
        runs = calibration_batches(inputs, calibration, criterion)
    elif calibration is None:
        raise PruneError(f"importance={criterion!r} needs data: pass calibration=batches of token ids")
    else:
        runs = batches(calibration)
    for i, batch in enumerate(runs):
        check_tokens(model, batch, i)
    return runs


class Routed:
    """What one block's experts saw over the calibration batches: per expert, the sum of squares
    of its routed tokens per hidden channel (`inputs`) and per unit of its activation (`units`),
    its token count, and the sum of routing weight times output norm (`contribution`)."""

    def __init__(self, block: MoeBlock) -> None:
        self.block = block
        count, hidden = block.num_experts, block.experts.gate_up_proj.shape[2]
        self.inputs, self.units = torch.zeros(count, hidden), torch.zeros(count, block.width)
        self.tokens, self.contribution = torch.zeros(count), torch.zeros(count, dtype=torch.float64)

    def record(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        values = list(args) + [kwargs[k] for k in ("hidden_states", "top_k_index", "top_k_weights") if k in kwargs]
        hidden, index, weights = (v.detach() for v in values[:3])
        gate, up, down = self.block.weights()
        act = self.block.experts.act_fn
        x = hidden.float().reshape(-1, hidden.shape[-1])
        for e in range(self.block.num_experts):
            hit = index == e
            rows = hit.any(-1)
            if not rows.any():
                continue
            xe, w = x[rows], (weights.float() * hit).sum(-1)[rows]
            h = act(xe @ gate[e].T) * (xe @ up[e].T)
            self.inputs[e] += xe.pow(2).sum(0)
            self.units[e] += h.pow(2).sum(0)
            self.tokens[e] += len(xe)
            self.contribution[e] += float((w * (h @ down[e].T).norm(dim=-1)).sum())


def run(model: nn.Module, runs: list[tuple], step: Callable[[tuple], None]) -> None:
    """`step(batch)` for every calibration batch, the model in eval mode and without its KV cache."""
    was_training = model.training
    model.eval()
    try:
        with no_kv_cache(model):
            for i, batch in enumerate(runs):
                try:
                    step(batch)
                except Exception as error:
                    raise CalibrationError(f"running the model on calibration batch {i} failed ({one_line(error)}); "
                                           "pass batches shaped like example_inputs") from None
    finally:
        model.train(was_training)


def routed(model: nn.Module, blocks: list[MoeBlock], runs: list[tuple]) -> dict[str, Routed]:
    stats = {b.name: Routed(b) for b in blocks}
    handles = [b.experts.register_forward_pre_hook(stats[b.name].record, with_kwargs=True) for b in blocks]
    try:
        with torch.no_grad():
            run(model, runs, lambda batch: model(*batch))
    finally:
        for handle in handles:
            handle.remove()
    return stats


def wanda_units(block: MoeBlock, stats: Routed) -> np.ndarray:
    gate, up, down = block.weights()
    x, h = stats.inputs.sqrt()[:, None, :], stats.units.sqrt()[:, None, :]
    scores = (gate.abs() * x).sum(2) + (up.abs() * x).sum(2) + (down.abs() * h).sum(1)
    unseen = stats.tokens == 0
    scores[unseen] = torch.from_numpy(magnitude(block, 1, whole=False))[unseen]
    return scores.numpy()


def gradients(model: nn.Module, blocks: list[MoeBlock], runs: list[tuple],
              loss_fn: Callable | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{block: (d loss / d gate_up_proj, d loss / d down_proj)} summed over the batches; only the
    expert weights take gradients while this runs."""
    wanted = {id(t) for b in blocks for t in (b.experts.gate_up_proj, b.experts.down_proj)}
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved:
        p.requires_grad_(id(p) in wanted)
        p.grad = None

    def step(batch: tuple) -> None:
        out = main_output(model(*batch))
        (loss_fn(out) if loss_fn is not None else default_loss(out, batch)).backward()

    try:
        run(model, runs, step)
        return {b.name: tuple(zeros_if_none(t) for t in (b.experts.gate_up_proj, b.experts.down_proj)) for b in blocks}
    finally:
        for p, flag in saved:
            p.grad = None
            p.requires_grad_(flag)


def zeros_if_none(t: torch.Tensor) -> torch.Tensor:
    return t.grad.detach().float() if t.grad is not None else torch.zeros_like(t, dtype=torch.float)


def taylor(block: MoeBlock, gate_up_grad: torch.Tensor, down_grad: torch.Tensor, whole: bool) -> np.ndarray:
    gate, up, down = block.weights()
    width = block.width
    gate_term, up_term = gate * gate_up_grad[:, :width], up * gate_up_grad[:, width:]
    if whole:
        return ((gate_term + up_term).sum((1, 2)).abs() + (down * down_grad).sum((1, 2)).abs()).numpy()
    scores = gate_term.sum(2).abs() + up_term.sum(2).abs()
    unseen = gate_up_grad.abs().sum((1, 2)) == 0
    scores[unseen] = torch.from_numpy(magnitude(block, 1, whole=False))[unseen]
    return scores.numpy()
