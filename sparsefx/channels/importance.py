"""Analysis pass: importance of every removable unit (class) of every group.

A class's score sums, over the group's own parameters (producer weights and biases,
norm affine terms, depthwise filters), the chosen statistic of its positions:
pruning a channel removes its producer, so the producer's weights say what is lost
(Li et al. 2017). Scores never change the model.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import numpy as np
import torch

from sparsefx.channels.coupling import ChannelGroup, Coupling
from sparsefx.errors import PruneError

OWN_ROLES = frozenset({"out", "norm", "param"})
Scores = dict[int, np.ndarray]  # group id -> one score per class, in group.classes order


def _weights(gm: torch.nn.Module, name: str) -> torch.Tensor:
    return operator.attrgetter(name)(gm)


def _reduce(group: ChannelGroup, coupling: Coupling, per_position: Callable[[int], np.ndarray | None]) -> np.ndarray:
    scores = np.zeros(len(group.classes))
    for s in group.slots:
        if not coupling.slots[s].roles & OWN_ROLES:
            continue
        values = per_position(s)
        if values is None:
            continue
        for i, root in enumerate(group.classes):
            scores[i] += values[group.members[root][s]].sum()
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


def taylor(gm: torch.nn.Module, coupling: Coupling, groups: list[ChannelGroup], example_inputs: tuple = (),
           loss_fn: Callable | None = None, **_: object) -> Scores:
    """First-order Taylor |sum(w * dL/dw)| over a calibration batch (Molchanov et al. 2019).

    Without a loss, the model's own top-1 predictions serve as labels for (N, classes)
    outputs and half the squared output norm otherwise."""
    if not example_inputs:
        raise PruneError("importance='taylor' needs a calibration batch: pass example_inputs with real data")
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
        out = gm(*example_inputs)
        out = out[0] if isinstance(out, (tuple, list)) else getattr(out, "logits", getattr(out, "last_hidden_state", out))
        if loss_fn is not None:
            loss = loss_fn(out)
        elif out.dim() == 2:
            loss = torch.nn.functional.cross_entropy(out, out.argmax(1))
        else:
            loss = 0.5 * out.pow(2).sum()
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
    "l1": l1, "l2": l2, "bn_scale": bn_scale, "taylor": taylor, "random": random,
}


def resolve(importance: str | Callable[..., Scores]) -> Callable[..., Scores]:
    if callable(importance):
        return importance
    if importance not in IMPORTANCE:
        raise PruneError(f"unknown importance {importance!r}; use one of {', '.join(IMPORTANCE)} or a callable")
    return IMPORTANCE[importance]
