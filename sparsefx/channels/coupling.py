"""Analysis pass: channel-coupling groups.

Walks the annotated graph once, giving every tensor a channel layout (`Factor`s of
channel ids, see `channels.ids`) through per-op rules (`channels.rules`, run on a
`channels.context.Ctx`). Ops that
tie channels together (residual adds, concat, norms, depthwise convolutions, attention
heads, flatten -> linear...) unify ids; ops whose effect on channels is unknown, model
inputs and model outputs *freeze* them. The graph is never changed.

Facts written (node.meta):
- ``sfx_chan``: the output's channel layout, a list of `Factor` (tuple of lists for
  tuple outputs, None for non-tensors).

Result: `Coupling` — one `Slot` per prunable parameter dimension and the
`ChannelGroup`s, each a set of slots whose channels are removed together, class by class.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx

from sparsefx.channels import decoder  # noqa: F401  (registers the decoder-LLM rules: RMSNorm)
from sparsefx.channels.context import Ctx, Slot, describe_node
from sparsefx.channels.rules import RULES, default_rule

PRODUCER_ROLES = frozenset({"out"})


@dataclass
class ChannelGroup:
    """Slots whose channels must be removed together; `classes` are the removable units."""

    id: int
    slots: list[int]
    classes: list[int]  # union-find roots, one per removable unit, in channel order
    frozen: dict[int, str]  # root -> why it cannot be removed
    members: dict[int, dict[int, np.ndarray]]  # root -> slot index -> positions along the slot dim
    slot_objs: list[Slot] = field(repr=False, default_factory=list)

    @property
    def free(self) -> list[int]:
        return [c for c in self.classes if c not in self.frozen]

    @property
    def prunable(self) -> bool:
        return len(self.free) >= 2 and any(self.slot_objs[s].roles & PRODUCER_ROLES for s in self.slots)

    @property
    def size(self) -> int:
        """Channels in the group, counted on its widest producer slot."""
        widths = [self.slot_objs[s].ids.size for s in self.slots if self.slot_objs[s].roles & PRODUCER_ROLES]
        return max(widths) if widths else self.slot_objs[self.slots[0]].ids.size

    @property
    def layers(self) -> list[str]:
        return sorted({self.slot_objs[s].layer for s in self.slots})

    def producers(self) -> list[Slot]:
        return [self.slot_objs[s] for s in self.slots if self.slot_objs[s].roles & PRODUCER_ROLES]

    def as_dict(self) -> dict:
        """Plain data (JSON-ready): what the group holds and why it can or cannot shrink."""
        return {
            "id": self.id, "channels": self.size, "units": len(self.classes), "free_units": len(self.free),
            "prunable": self.prunable, "reason": self.reason(),
            "slots": [{"param": self.slot_objs[s].param, "dim": self.slot_objs[s].dim, "layer": self.slot_objs[s].layer,
                       "roles": sorted(self.slot_objs[s].roles)} for s in self.slots],
        }

    def reason(self) -> str:
        if self.prunable:
            return "prunable"
        if not any(self.slot_objs[s].roles & PRODUCER_ROLES for s in self.slots):
            return "no producing layer"
        reasons = sorted(set(self.frozen.values()))
        return "frozen: " + ("; ".join(reasons) if reasons else "a single removable unit")

    def __str__(self) -> str:
        roles: dict[str, set[str]] = {}
        for s in self.slots:
            roles.setdefault(self.slot_objs[s].layer, set()).update(self.slot_objs[s].roles)
        layers = [f"{layer}({'/'.join(sorted(r))})" for layer, r in roles.items()]
        more = f" … +{len(layers) - 6} layers" if len(layers) > 6 else ""
        return (f"group {self.id}: {self.size} channels in {len(self.classes)} units, {self.reason()}: "
                f"{' '.join(layers[:6])}{more}")


@dataclass
class Coupling:
    slots: list[Slot]
    groups: list[ChannelGroup]
    roots: np.ndarray  # channel id -> class root
    patches: list[tuple[torch.fx.Node, str, dict]]  # shape constants to rewrite after removal


def analyze_coupling(gm: torch.fx.GraphModule) -> Coupling:
    """Run the rules over `gm` (annotated by ShapeProp) and build the channel groups."""
    ctx = Ctx(gm)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            ctx.env[node] = _empty_like(node.meta.get("sfx_shape"))
        elif node.op == "get_attr":
            continue  # materialised lazily by Ctx.info: only tensors that are used get slots
        elif node.op == "output":
            for item in node.all_input_nodes:
                _freeze_output(ctx, item)
        elif node.meta.get("sfx_shape") is None:
            ctx.env[node] = None  # sizes, flags, None results: no channels
            _record_size_origin(ctx, node)
        else:
            rule = RULES.lookup(node, ctx.gm) or default_rule
            ctx.env[node] = _checked(ctx, node, rule(ctx, node))
        node.meta["sfx_chan"] = ctx.env.get(node)
    return _build_groups(ctx)


def _record_size_origin(ctx: Ctx, node: torch.fx.Node) -> None:
    """Remember which tensor axes a size value was read from (x.size(1), x.shape, sym_size)."""
    args = node.args
    tensor = args[0] if args and isinstance(args[0], torch.fx.Node) and isinstance(
        args[0].meta.get("sfx_shape"), tuple) else None
    if tensor is not None and (node.target in ("size", getattr) or str(node.target).startswith("aten.sym_size")):
        if node.target is getattr and args[1] != "shape":
            return
        dim = args[1] if len(args) > 1 and isinstance(args[1], int) else None
        ndim = len(tensor.meta["sfx_shape"])
        ctx.size_origins[node] = {(tensor, None if dim is None else dim % ndim)}
        return
    origins = set().union(*(ctx.size_origins.get(a, set()) for a in node.all_input_nodes))
    if node.target is operator.getitem and isinstance(args[1], int) and len(origins) == 1:
        (tensor, dim), = origins
        if dim is None:
            origins = {(tensor, args[1] % len(tensor.meta["sfx_shape"]))}
    if origins:
        ctx.size_origins[node] = origins


def _checked(ctx: Ctx, node: torch.fx.Node, cmap: object) -> object:
    """A layout must fit the tensor it describes; a rule that got it wrong freezes, not breaks."""
    shape = node.meta["sfx_shape"]
    if isinstance(cmap, tuple):
        return tuple(_fit(ctx, node, c, s) for c, s in zip(cmap, shape, strict=True))
    return _fit(ctx, node, cmap, shape)


def _fit(ctx: Ctx, node: torch.fx.Node, cmap: list | None, shape: tuple | None) -> list | None:
    if cmap is None or shape is None:
        return [] if shape is not None else None
    good = []
    for factor in cmap:
        if all(a < len(shape) for a in factor.axes) and factor.ids.shape == tuple(shape[a] for a in factor.axes):
            good.append(factor)
        else:
            ctx.uf.freeze(factor.ids, f"layout mismatch at {describe_node(node)}")
    return good


def _empty_like(shape: object) -> object:
    if isinstance(shape, list):
        return tuple([] if s is not None else None for s in shape)
    return [] if shape is not None else None


def _freeze_output(ctx: Ctx, node: torch.fx.Node) -> None:
    cmap = ctx.env.get(node)
    for item in cmap if isinstance(cmap, tuple) else [cmap]:
        ctx.freeze(item if isinstance(item, list) else None, "reaches a model output")


def _build_groups(ctx: Ctx) -> Coupling:
    roots = ctx.uf.roots()
    slots = list(ctx.slots.values())
    members: dict[int, dict[int, np.ndarray]] = defaultdict(dict)
    if slots:
        root = np.concatenate([roots[slot.ids] for slot in slots])
        owner = np.concatenate([np.full(slot.ids.size, i) for i, slot in enumerate(slots)])
        position = np.concatenate([np.arange(slot.ids.size) for slot in slots])
        order = np.lexsort((position, owner, root))
        root, owner, position = root[order], owner[order], position[order]
        starts = np.flatnonzero(np.r_[True, (root[1:] != root[:-1]) | (owner[1:] != owner[:-1])])
        ends = np.r_[starts[1:], root.size]
        for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
            members[int(root[start])][int(owner[start])] = position[start:end]
    by_key: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for root, where in members.items():
        by_key[tuple(sorted(where))].append(root)
    groups = []
    for key, classes in by_key.items():
        classes.sort(key=lambda r: int(members[r][key[0]][0]))  # channel order of the first slot
        frozen = {r: ctx.uf.frozen[r] for r in classes if r in ctx.uf.frozen}
        groups.append(ChannelGroup(len(groups), list(key), classes, frozen,
                                   {r: members[r] for r in classes}, slots))
    groups.sort(key=lambda g: (not g.prunable, min(g.slots)))
    for index, group in enumerate(groups):
        group.id = index
    return Coupling(slots, groups, roots, ctx.patches)
