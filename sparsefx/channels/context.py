"""What a coupling rule works on: `Ctx` (the graph, the channel-id union-find and the table of
parameter slots), the `TensorInfo` of an argument and the `Slot` of a parameter dimension.

Its own module so that the rules (`channels.rules`) and the pass that runs them
(`channels.coupling`) both import it, one way.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx

from sparsefx.channels.ids import ChannelIds, Factor


@dataclass
class Slot:
    """One dimension of one parameter whose indices are channel ids."""

    param: str
    dim: int
    ids: np.ndarray
    roles: set[str]
    layer: str

    def __str__(self) -> str:
        return f"{self.layer}:{'/'.join(sorted(self.roles))}[{self.param.rsplit('.', 1)[-1]}.{self.dim}]"


@dataclass
class TensorInfo:
    node: torch.fx.Node
    shape: tuple[int, ...]
    cmap: list[Factor]


class Ctx:
    """What a coupling rule sees: the graph, the union-find and the slot table."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        self.gm = gm
        self.uf = ChannelIds()
        self.slots: dict[tuple[str, int], Slot] = {}
        self.env: dict[torch.fx.Node, object] = {}
        self.patches: list[tuple[torch.fx.Node, str, dict]] = []
        # Non-tensor nodes computed from tensor sizes: node -> {(tensor node, axis or None)}.
        self.size_origins: dict[torch.fx.Node, set[tuple[torch.fx.Node, int | None]]] = {}
        # Ids an expand gave the copies of a size-1 axis (multi-query attention's one kv head
        # repeated per query head): removable with whatever they meet, owned by no parameter.
        self.replicas: set[int] = set()
        self.modules = dict(gm.named_modules())
        self._canonical: dict[int, str] = {}
        for name, tensor in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
            self._canonical.setdefault(id(tensor), name)

    # --- parameters -------------------------------------------------------------------
    def tensor(self, name: str) -> torch.Tensor:
        return operator.attrgetter(name)(self.gm)

    def param_ids(self, name: str, dim: int, role: str, layer: str | None = None) -> np.ndarray:
        """The channel ids of dimension `dim` of parameter `name` (tied weights share them)."""
        tensor = self.tensor(name)
        name = self._canonical.get(id(tensor), name)
        key = (name, dim)
        slot = self.slots.get(key)
        if slot is None:
            slot = Slot(name, dim, self.uf.new(tensor.shape[dim]), set(), layer or name.rsplit(".", 1)[0])
            self.slots[key] = slot
        slot.roles.add(role)
        return slot.ids

    def param_name(self, arg: object) -> str | None:
        return arg.target if isinstance(arg, torch.fx.Node) and arg.op == "get_attr" else None

    # --- values -------------------------------------------------------------------------
    def info(self, arg: object) -> TensorInfo | None:
        if not isinstance(arg, torch.fx.Node):
            return None
        shape = arg.meta.get("sfx_shape")
        if not isinstance(shape, tuple):
            return None
        if arg not in self.env and arg.op == "get_attr":
            self.env[arg] = self._param_factors(arg.target, shape)
        cmap = self.env.get(arg)
        return TensorInfo(arg, shape, cmap if isinstance(cmap, list) else [])

    def _param_factors(self, name: str, shape: tuple[int, ...]) -> list[Factor]:
        return [Factor((a,), self.param_ids(name, a, "param")) for a, size in enumerate(shape) if size > 1]

    def value(self, arg: object) -> object:
        """Concrete value of a non-tensor argument (sizes the graph computes included)."""
        if isinstance(arg, torch.fx.Node):
            return arg.meta.get("sfx_value")
        if isinstance(arg, (list, tuple)):
            return type(arg)(self.value(a) for a in arg)
        return arg

    def tensor_args(self, node: torch.fx.Node) -> list[TensorInfo]:
        found = []
        for arg in [*node.args, *node.kwargs.values()]:
            for item in arg if isinstance(arg, (list, tuple)) else [arg]:
                info = self.info(item)
                if info is not None:
                    found.append(info)
        return found

    def freeze(self, cmap: list[Factor] | TensorInfo | None, reason: str) -> None:
        if isinstance(cmap, TensorInfo):
            cmap = cmap.cmap
        for factor in cmap or []:
            self.uf.freeze(factor.ids, reason)

    def patch(self, node: torch.fx.Node, kind: str, **payload: object) -> None:
        self.patches.append((node, kind, payload))


def describe_node(node: torch.fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    return f"{node.name} ({getattr(node.target, '__name__', node.target)})"
