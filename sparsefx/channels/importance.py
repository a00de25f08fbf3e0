"""Analysis pass: importance of every removable unit (class) of every group.

A class's score sums, over the group's own parameters (producer weights and biases,
norm affine terms, depthwise filters), the chosen statistic of its positions:
pruning a channel removes its producer, so the producer's weights say what is lost
(Li et al. 2017). Scores never change the model.

Data-aware scores run calibration batches (`calibration=`, see `channels.calibration`):
`wanda` weighs every weight by the norm of the activation it multiplies, `taylor` by its
gradient. Without `calibration` they run the example inputs.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import numpy as np
import torch

from sparsefx.channels.calibration import batches, default_loss, in_example_batches, input_norms, main_output
from sparsefx.channels.coupling import ChannelGroup, Coupling
from sparsefx.errors import PruneError

OWN_ROLES = frozenset({"out", "norm", "param"})
Scores = dict[int, np.ndarray]  # group id -> one score per class, in group.classes order


def _weights(gm: torch.nn.Module, name: str) -> torch.Tensor:
    return operator.attrgetter(name)(gm)


def _reduce(group: ChannelGroup, coupling: Coupling, per_position: Callable[[int], np.ndarray | None],
            roles: frozenset[str] | None = OWN_ROLES) -> np.ndarray:
    """Sum per-class the positions of the group's slots whose roles meet `roles` (None: every slot)."""
    scores = np.zeros(len(group.classes))
    for s in group.slots:
        if roles is not None and not coupling.slots[s].roles & roles:
            continue
        values = per_position(s)
        if values is None:
            continue
        positions = [group.members[root][s] for root in group.classes]
        owner = np.repeat(np.arange(len(positions)), [len(p) for p in positions])
        scores += np.bincount(owner, weights=values[np.concatenate(positions)], minlength=len(positions))
    return scores


def _norm_scores(gm: torch.nn.Module, coupling: Coupling, groups: list[ChannelGroup], p: int) -> Scores:
    cache: dict[int, np.ndarray] = {}

    def per_position(s: int) -> np.ndarray | None:
        slot = coupling.slots[s]
        if "running" in slot.param.rsplit(".", 1)[-1]:
            return None  # running statistics describe data, not what the channel contributes
        if s not in cache:
            w = _weights(gm, slot.param).detach().float().movedim(slot.dim, 0).reshape(slot.ids.size, -1)
            cache[s] = (w.abs() if p == 1 else w.pow(2)).sum(1).numpy()
        return cache[s]

    return {g.id: _reduce(g, coupling, per_position) for g in groups}


def l1(gm: torch.nn.Module, coupling: Coupling, groups: list[ChannelGroup], **_: object) -> Scores:
    return _norm_scores(gm, coupling, groups, 1)


def l2(gm: torch.nn.Module, coupling: Coupling, groups: list[ChannelGroup], **_: object) -> Scores:
    return _norm_scores(gm, coupling, groups, 2)


def bn_scale(gm: torch.nn.Module, coupling: Coupling, groups: list[ChannelGroup], **_: object) -> Scores:
    """|gamma| of the group's norm layers (Liu et al. 2017); L1 where a group has none."""
    fallback = l1(gm, coupling, groups)
    scores = {}
    for g in groups:
        gammas = [s for s in g.slots if "norm" in coupling.slots[s].roles
                  and coupling.slots[s].param.endswith("weight")]
        if not gammas:
            scores[g.id] = fallback[g.id]
            continue
        total = np.zeros(len(g.classes))
        for s in gammas:
            w = _weights(gm, coupling.slots[s].param).detach().abs().float().numpy()
            total += [w[g.members[r][s]].sum() for r in g.classes]
        scores[g.id] = total
    return scores


def calibration_batches(example_inputs: tuple, calibration: object | None, criterion: str) -> list[tuple]:
    """The batches a data-aware criterion runs: `calibration`, checked against the example
    inputs, or the example inputs themselves."""
    if calibration is None:
        if not example_inputs:
            raise PruneError(f"importance={criterion!r} needs data: pass calibration=batches of real inputs")
        return [tuple(example_inputs)]
    return in_example_batches(batches(calibration), tuple(example_inputs))


def wanda(gm: torch.nn.Module, coupling: Coupling, groups: list[ChannelGroup], example_inputs: tuple = (),
          calibration: object | None = None, **_: object) -> Scores:
    """Activation-aware magnitude (Wanda, Sun et al. 2023), summed over the weights a unit removes:
    |W_ij| * ||X_j||_2, where ||X_j|| is the norm over the calibration batches of input channel j of
    the layer W belongs to. A unit with small weights that sees (or, for its consumers, makes)
    large activations scores high. Groups whose layers record no activation fall back to L1."""
    norms = input_norms(gm, calibration_batches(example_inputs, calibration, "wanda"))
    cache: dict[int, np.ndarray] = {}

    def per_position(s: int) -> np.ndarray | None:
        slot = coupling.slots[s]
        if slot.param not in norms:
            return None
        if s not in cache:
            w = _weights(gm, slot.param).detach().float().abs()
            scale = torch.from_numpy(norms[slot.param]).view(1, -1, *[1] * (w.dim() - 2))
            cache[s] = (w * scale).movedim(slot.dim, 0).reshape(slot.ids.size, -1).sum(1).numpy()
        return cache[s]

    fallback = None
    scores = {}
    for g in groups:
        if any(coupling.slots[s].param in norms for s in g.slots):
            scores[g.id] = _reduce(g, coupling, per_position, roles=None)
        else:
            fallback = fallback if fallback is not None else l1(gm, coupling, groups)
            scores[g.id] = fallback[g.id]
    return scores


def taylor(gm: torch.nn.Module, coupling: Coupling, groups: list[ChannelGroup], example_inputs: tuple = (),
           loss_fn: Callable | None = None, calibration: object | None = None, **_: object) -> Scores:
    """First-order Taylor |sum(w * dL/dw)| over the calibration batches (Molchanov et al. 2019).

    `loss_fn(output)` is the loss; without one, `calibration.default_loss` (next-token
    cross-entropy for a language model, the model's own top-1 for a classifier)."""
    runs = calibration_batches(example_inputs, calibration, "taylor")
    params = {coupling.slots[s].param for g in groups for s in g.slots}
    tensors = {name: _weights(gm, name) for name in params}
    grads_on = {name: t.requires_grad for name, t in tensors.items()}
    for t in tensors.values():
        if isinstance(t, torch.nn.Parameter):  # buffers (running statistics) take no gradient
            t.requires_grad_(True)
    was_training = gm.training
    gm.eval()
    try:
        gm.zero_grad(set_to_none=True)
        for batch in runs:  # gradients accumulate: the sum over batches, then |w * grad|
            out = main_output(gm(*batch))
            loss = loss_fn(out) if loss_fn is not None else default_loss(out, batch)
            loss.backward()
        products = {name: (t.detach() * t.grad).float() if t.grad is not None else None for name, t in tensors.items()}
    finally:
        gm.train(was_training)
        for name, t in tensors.items():
            t.grad = None
            t.requires_grad_(grads_on[name])

    def per_position(s: int) -> np.ndarray | None:
        slot = coupling.slots[s]
        prod = products.get(slot.param)
        if prod is None:
            return None
        return prod.movedim(slot.dim, 0).reshape(slot.ids.size, -1).sum(1).abs().numpy()

    return {g.id: _reduce(g, coupling, per_position) for g in groups}


def random(gm: torch.nn.Module, coupling: Coupling, groups: list[ChannelGroup], seed: int = 0, **_: object) -> Scores:
    rng = np.random.default_rng(seed)
    return {g.id: rng.random(len(g.classes)) for g in groups}


IMPORTANCE: dict[str, Callable[..., Scores]] = {
    "l1": l1, "l2": l2, "bn_scale": bn_scale, "taylor": taylor, "wanda": wanda, "random": random,
}


def resolve(importance: str | Callable[..., Scores]) -> Callable[..., Scores]:
    if callable(importance):
        return importance
    if importance not in IMPORTANCE:
        raise PruneError(f"unknown importance {importance!r}; use one of {', '.join(IMPORTANCE)} or a callable")
    return IMPORTANCE[importance]
