"""Coupling rules for decoder language models: RMSNorm on the residual stream.

RMSNorm computes ``w * x / sqrt(mean(x^2) + eps)`` over the hidden channels. The generic
reduction rule freezes any mean over channels; this one lets the hidden size shrink and makes
the result exact when the removed channels are zero: with n of N channels left, the sum of
squares is unchanged, so ``mean`` grows by r = N / n, and

    w * x / sqrt(S / N + eps) == (w * sqrt(r)) * x / sqrt(S / n + eps * r)

Removal (the ``rms_width`` patch, `channels.remove`) scales the weight by sqrt(r) (Gemma's
``(1 + w)`` by the same factor) and eps by r. Only the pattern above is recognised: the
mean's input is ``x ** 2`` of the channels, its one user adds a constant eps, then rsqrt,
a multiply with x and one with a weight parameter. Any other mean over channels freezes them
as before. Rotary embeddings and grouped-query attention need no rule of their own: heads are
whole units (`layout.drop_whole_axes`), and a key/value head repeated for its query heads is
tied to them by the attention rule.
"""

from __future__ import annotations

import numbers

import torch
import torch.fx

from sparsefx.capture import ops
from sparsefx.capture.annotate import node_arg
from sparsefx.channels import layout
from sparsefx.channels.context import Ctx
from sparsefx.channels.ids import Factor
from sparsefx.channels.rules import RULES, passthrough, reduction

aten = torch.ops.aten
PASS_THROUGH = (ops.CAST, ops.CLONE, ops.CONTIGUOUS, ops.DETACH, aten.type_as)
RULES.add(passthrough, aten.type_as)  # Gemma's RMSNorm ends in output.type_as(x)


def _only_user(node: torch.fx.Node, *wanted: object) -> torch.fx.Node | None:
    """The single user of `node`, skipping casts, if its op is one of `wanted`."""
    while True:
        users = [u for u in node.users if u.meta.get("sfx_shape") is not None]  # not torch.export's asserts
        if len(users) != 1:
            return None
        node = users[0]
        if ops.op_key(node.target) in wanted:
            return node
        if ops.op_key(node.target) not in PASS_THROUGH:
            return None


def _scalar_position(node: torch.fx.Node) -> int | None:
    return next((i for i, a in enumerate(node.args[:2]) if isinstance(a, numbers.Number)), None)


def rms_pattern(ctx: Ctx, mean: torch.fx.Node) -> dict | None:
    """eps node, eps position, weight parameter and offset style of the RMSNorm whose mean this is."""
    power = mean.args[0]
    if not isinstance(power, torch.fx.Node) or ops.op_key(power.target) is not ops.POW or power.args[1:2] != (2,):
        return None
    add = _only_user(mean, ops.ADD)
    if add is None or _scalar_position(add) is None:
        return None
    rsqrt = _only_user(add, ops.RSQRT)
    scaled = _only_user(rsqrt, ops.MUL) if rsqrt is not None else None
    if scaled is None or power.args[0] not in scaled.args:  # x * rsqrt(mean(x^2) + eps), the same x
        return None
    weighted = _only_user(scaled, ops.MUL)
    other = next((a for a in weighted.args if a is not scaled), None) if weighted is not None else None
    weight, offset = ctx.param_name(other), False
    if (weight is None and isinstance(other, torch.fx.Node) and ops.op_key(other.target) is ops.ADD
            and _scalar_position(other) is not None and other.args[_scalar_position(other)] == 1):
        source = other.args[1 - _scalar_position(other)]  # Gemma: x * (1 + w), w possibly cast first
        while isinstance(source, torch.fx.Node) and ops.op_key(source.target) in PASS_THROUGH:
            source = source.args[0]
        weight, offset = ctx.param_name(source), True
    if weight is None:
        return None
    return {"eps": add, "eps_at": _scalar_position(add), "weight": weight, "offset": offset}


@RULES.register(ops.MEAN)
def mean(ctx: Ctx, node: torch.fx.Node) -> list[Factor]:
    """An RMSNorm's mean of squares over the channel axis keeps the channels; other means reduce."""
    x = ctx.info(node.args[0])
    dims = ctx.value(node_arg(node, 1, "dim"))
    keepdim = ctx.value(node_arg(node, 2, "keepdim", False))
    last = len(x.shape) - 1 if x is not None else -1
    over_last = x is not None and keepdim and dims in ([-1], [last], -1, last)
    channel = next((f for f in x.cmap if f.axes == (last,)), None) if over_last else None
    pattern = rms_pattern(ctx, node) if channel is not None else None
    if pattern is None:
        # a norm inside each head (Qwen3's q_norm over head_dim): whole heads stay removable units
        heads = [(f, layout.drop_whole_axes(ctx.uf, f, [last])) for f in x.cmap if last in f.axes] if over_last else []
        if not heads or any(inside is None for _, inside in heads):
            return reduction(ctx, node)
        return [f for f in x.cmap if last not in f.axes] + [inside for _, inside in heads]
    ctx.patch(node, "rms_width", ids=channel.ids, **pattern)
    return [f for f in x.cmap if f is not channel]
