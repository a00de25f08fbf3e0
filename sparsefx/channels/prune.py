"""Public pruning API: analyze a model's channel groups and physically remove channels."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx
from torch import nn

from sparsefx.capture.annotate import total_macs
from sparsefx.capture.trace import as_inputs, no_kv_cache, trace
from sparsefx.channels import importance as importance_mod
from sparsefx.channels import moe, moe_scores
from sparsefx.channels.attention import split_attention
from sparsefx.channels.coupling import ChannelGroup, Coupling, analyze_coupling
from sparsefx.channels.hf_config import head_dim, linear_widths, splits_heads, sync_config, sync_decoder
from sparsefx.channels.moe_layout import moe_blocks
from sparsefx.channels.record import attach, history, removal_step
from sparsefx.channels.remove import remove_channels
from sparsefx.channels.select import (
    Ratio,
    as_names,
    check_names,
    ignored,
    name_ratio,
    ratio_rule,
    select,
    under,
)
from sparsefx.errors import PruneError
from sparsefx.log import get_logger

LOG = get_logger("channels")


@dataclass
class Analysis:
    """A traced graph and its channel-coupling groups."""

    gm: torch.fx.GraphModule
    coupling: Coupling

    @property
    def groups(self) -> list[ChannelGroup]:
        return self.coupling.groups

    @property
    def macs(self) -> int:
        return total_macs(self.gm)

    def __str__(self) -> str:
        prunable = [g for g in self.groups if g.prunable]
        lines = [f"{len(self.groups)} channel groups, {len(prunable)} prunable "
                 f"({sum(g.size for g in prunable)} channels)"]
        lines += [str(g) for g in self.groups]
        return "\n".join(lines)


def analyze(model: nn.Module, example_inputs: object, method: str = "auto") -> Analysis:
    """Trace a copy of `model` and compute its channel-coupling groups; nothing is modified.

    Packed `nn.MultiheadAttention` layers are analysed as separate q/k/v/out projections
    (`HeadAttention`), which is also what `prune` hands back when it removes heads."""
    inputs = as_inputs(example_inputs)
    work = working_copy(model)
    gm = trace(work, inputs, method)
    return Analysis(gm, analyze_coupling(gm))


def working_copy(model: nn.Module) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise PruneError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    work = copy.deepcopy(model).eval()
    split_attention(work)
    return work


def count_macs(model: nn.Module, example_inputs: object, method: str = "auto") -> int:
    was_training = model.training
    model.eval()
    try:
        return total_macs(trace(model, as_inputs(example_inputs), method))
    finally:
        model.train(was_training)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def prune(
    model: nn.Module,
    example_inputs: object,
    ratio: Ratio = 0.5,
    importance: str | Callable = "l1",
    round_to: int = 1,
    global_ranking: bool = False,
    ignore: Iterable[str] = (),
    method: str = "auto",
    **importance_options: object,
) -> nn.Module:
    """Return a new, physically smaller copy of `model` with a fraction `ratio` of the
    channels of every prunable group removed (lowest importance first).

    `ratio` may be a dict {module name prefix: ratio} ("*" for the rest); `ignore` names
    modules whose output channels stay. The input model is never modified. The result is
    the model's own class when its forward still holds after removal, otherwise the
    rewritten `torch.fx.GraphModule` (its shape constants patched).

    Mixture-of-experts layers (`channels.moe`): the ratio of a block's `experts` module removes
    that fraction of every expert's hidden units, each expert ranking its own, per layer even
    with `global_ranking`; whole experts go with `sparsefx.prune_experts`.
    """
    ratio_of = ratio_rule(ratio)
    if not isinstance(round_to, int) or round_to < 1:
        raise PruneError(f"round_to must be a positive integer, got {round_to!r}")
    ratio_names = [k for k in ratio if k != "*"] if isinstance(ratio, dict) else []
    scored = score_groups(model, example_inputs, importance, method, ignore, ratio_names,
                          keep=lambda group: ratio_of(group) > 0, **importance_options)
    experts = expert_units(scored, ratio, importance, round_to, importance_options)
    if not scored.groups and not experts:
        warnings.warn(f"sparsefx: nothing to prune in {type(model).__name__}: no channel group is both prunable "
                      f"and selected{frozen_summary(scored.coupling.groups)} (see sparsefx inspect); "
                      "returning an unchanged copy", stacklevel=2)
        return scored.work.train(model.training)
    result = scored.work
    if scored.groups:
        result = scored.remove(select(scored.groups, scored.scores, ratio_of, round_to, global_ranking))
    if experts and not moe_blocks(result):  # the rewritten graph came back: its experts cannot be found
        warnings.warn("sparsefx: the expert hidden units were not pruned: the result is a graph module, not "
                      f"{type(model).__name__}", stacklevel=2)
    elif experts:
        result = moe.carry_out(result, experts)
    return result.train(model.training)


def expert_units(scored: Scored, ratio: Ratio, importance: str | Callable, round_to: int,
                 options: dict) -> list[dict]:
    """The mixture-of-experts layers' hidden units to remove (`channels.moe`), scored on the dense
    working copy: the ratio and `ignore` apply by the name of each block's `experts` module."""
    ratio_of = name_ratio(ratio)
    blocks = [b for b in moe_blocks(scored.work) if ratio_of(f"{b.name}.experts") > 0
              and not any(under(f"{b.name}.experts", name) for name in scored.ignore)]
    if not blocks:
        return []
    criterion = importance if importance in moe_scores.CRITERIA else "l1"
    if criterion != importance:
        LOG.info(f"importance {importance!r} does not apply to expert hidden units; they are ranked by l1")
    scores = moe_scores.score(scored.work, blocks, criterion, whole=False,
                              example_inputs=scored.inputs, calibration=options.get("calibration"),
                              loss_fn=options.get("loss_fn"), seed=options.get("seed", 0))
    return moe.unit_changes(blocks, scores, lambda name: ratio_of(f"{name}.experts"), round_to)


def frozen_summary(groups: list[ChannelGroup], count: int = 3) -> str:
    """'; frozen: <why> (<layer>, N channels), ...' for the widest groups with a producer that cannot
    shrink: which op holds which layers, the first thing a user of an unsupported model needs."""
    frozen = sorted((g for g in groups if not g.prunable and g.producers() and g.frozen),
                    key=lambda g: -g.size)[:count]
    parts = [f"{sorted(set(g.frozen.values()))[0]} ({g.producers()[0].layer}, {g.size} channels)" for g in frozen]
    return f"; frozen: {', '.join(parts)}" if parts else ""


@dataclass
class Scored:
    """A working copy of a model traced, its channels coupled and the selectable groups scored:
    where `prune`, the planner and `planning.apply` all start; `remove` finishes the job."""

    work: nn.Module
    gm: torch.fx.GraphModule
    coupling: Coupling
    inputs: tuple
    groups: list[ChannelGroup]
    scores: dict[int, np.ndarray]
    ignore: list[str]

    def remove(self, removed: set[int]) -> nn.Module:
        return remove(self.work, self.gm, self.coupling, removed, self.inputs)


def score_groups(model: nn.Module, example_inputs: object, importance: str | Callable = "l1", method: str = "auto",
                 ignore: str | Iterable[str] = (), ratio_names: Iterable[str] = (),
                 keep: Callable[[ChannelGroup], bool] = lambda group: True,
                 **importance_options: object) -> Scored:
    """Trace a working copy of `model`, couple its channels and score every prunable group that
    `keep` accepts and no module in `ignore` produces. `ignore` and `ratio_names` must name
    modules of the model (one-line PruneError with the closest name otherwise)."""
    score = importance_mod.resolve(importance)
    inputs = as_inputs(example_inputs)
    ignore = as_names(ignore)
    work = working_copy(model)
    gm = trace(work, inputs, method)
    names = [n for n, _ in work.named_modules() if n] + [n for n, _ in gm.named_modules() if n]
    check_names(ignore, names, "ignore")
    check_names(list(ratio_names), names, "ratio")
    coupling = analyze_coupling(gm)
    width = head_dim(work)
    groups = [g for g in coupling.groups
              if g.prunable and not ignored(g, ignore) and keep(g) and not splits_heads(g, width)]
    scores = score(gm, coupling, groups, example_inputs=inputs, **importance_options) if groups else {}
    return Scored(work, gm, coupling, inputs, groups, scores, ignore)


def remove(work: nn.Module, gm: torch.fx.GraphModule, coupling: Coupling, removed: set[int],
           inputs: tuple) -> nn.Module:
    """Remove the classes `removed` from `work` (a working copy) and its trace `gm`; returns
    the module to hand back (see `_choose_result`), carrying the removal record `sparsefx.save` writes."""
    record, step = history(work), removal_step(coupling, removed, inputs, gm.meta.get("sfx_method", "fx"))
    code_before, widths, width = gm.code, linear_widths(work), head_dim(work)
    remove_channels([gm, work], coupling, removed)
    # the config must describe the layers for save_pretrained, and some forwards read head counts off it
    sync_config(work, widths)
    sync_decoder(work, width, gm.meta.get("sfx_norm_rescale", {}), gm.meta.get("sfx_norm_offset", set()))
    with no_kv_cache(work):
        result = _choose_result(work, gm, inputs, graph_changed=gm.code != code_before)
    record["steps"].append({**step, "result": "graph" if result is gm else "module"})
    return attach(result, record)


def _choose_result(work: nn.Module, gm: torch.fx.GraphModule, inputs: tuple, graph_changed: bool) -> nn.Module:
    """Prefer the user's own class when it still computes what the rewritten graph does.

    With no graph constant rewritten, the trace of the user's forward is unchanged, so
    the user's class is that graph; otherwise compare the two on the example inputs."""
    if not graph_changed:
        with torch.no_grad():
            work(*inputs)  # surfaces a broken rewrite here, not in the user's hands
        return work
    with torch.no_grad():
        expected = gm(*inputs)
        try:
            actual = work(*inputs)
        except Exception:  # its forward hard-codes a pruned size: the graph carries the fix
            return gm
    flat_expected = [t for t in torch.utils._pytree.tree_leaves(expected) if isinstance(t, torch.Tensor)]
    flat_actual = [t for t in torch.utils._pytree.tree_leaves(actual) if isinstance(t, torch.Tensor)]
    same = len(flat_expected) == len(flat_actual) and all(
        a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(flat_expected, flat_actual))
    return work if same else gm
