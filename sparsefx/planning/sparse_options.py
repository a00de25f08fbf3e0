"""The planner's sparse-kernel candidates: for each Linear / Conv2d node, the block and N:M
levels the TIR kernels offer, with their measured latency and the importance they lose.

Importance uses the planner's unit (weights, magnitude-weighted against the layer's mean,
counted once per coupled dimension: twice), so a sparse level competes with channel removal
on one scale."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx
from torch import nn

from sparsefx.sparse.masks import Sparsity

BLOCKS = ((16, 1), (4, 4))
DENSITIES = (0.5, 0.3, 0.2, 0.1)
NM = (Sparsity(0.5, "nm", m=4), Sparsity(0.25, "nm", m=4))


@dataclass
class SparseOption:
    node: torch.fx.Node
    layer: str
    spec: Sparsity
    ms: float
    loss: float


def candidates(granularities: tuple[str, ...], density: float | None = None) -> list[Sparsity]:
    """The levels to consider: the catalogue, or one level per pattern when forced."""
    specs = []
    if "block" in granularities:
        specs += [Sparsity(d, "block", block) for block in BLOCKS for d in ((density,) if density else DENSITIES)]
    if "nm" in granularities:
        specs += [Sparsity(density, "nm", m=4)] if density else list(NM)
    return specs


def _fits(spec: Sparsity, rows: int, cols: int) -> bool:
    if spec.pattern == "block":
        return rows % spec.block[0] == 0 and cols % spec.block[1] == 0
    return cols % spec.m == 0 and round(spec.density * spec.m) >= 1


def _shape(node: torch.fx.Node, layer: nn.Module | None, weight: torch.Tensor) -> tuple[int, int, int] | None:
    """(rows, cols, batch) of the matmul a sparse kernel would run for `node`."""
    out = node.meta.get("sfx_shape")
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1 or isinstance(layer.padding, str) or layer.padding_mode != "zeros":
            return None
        return layer.out_channels, layer.weight[0].numel(), out[0] * out[2] * out[3]
    if weight.dim() == 2 and isinstance(out, tuple):  # nn.Linear, or aten.linear on an exported graph
        return weight.shape[0], weight.shape[1], math.prod(out[:-1])
    return None


def layer_weights(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, tuple[str, nn.Module | None, torch.Tensor]]:
    """The Linear / Conv2d weight each node multiplies by, with its layer's name."""
    found = {}
    for node in gm.graph.nodes:
        name = _layer_name(node)
        if name is None:
            continue
        layer = gm.get_submodule(name)
        if node.op == "call_module" and not isinstance(layer, (nn.Linear, nn.Conv2d)):
            continue
        found[node] = (name, layer if node.op == "call_module" else None, layer.weight.detach())
    return found


def _layer_name(node: torch.fx.Node) -> str | None:
    """The module a node runs: its target (fx), or the owner of its weight (aten.linear, export)."""
    if node.op == "call_module":
        return str(node.target)
    if node.op == "call_function" and node.target in (torch.ops.aten.linear.default, torch.nn.functional.linear):
        weight = node.args[1] if len(node.args) > 1 else None
        if isinstance(weight, torch.fx.Node) and weight.op == "get_attr" and weight.target.endswith(".weight"):
            return weight.target.removesuffix(".weight")
    return None


def sparse_options(gm: torch.fx.GraphModule, specs: list[Sparsity], target: object,
                   skip: set[str] = frozenset()) -> dict[torch.fx.Node, list[SparseOption]]:
    """Every node's sparse options, each timed on the target (one TIR build for all)."""
    from sparsefx.backends.tvm.sparse.latency import measure_sparse_latencies

    found = []
    for node, (name, layer, weight) in layer_weights(gm).items():
        shape = None if name in skip else _shape(node, layer, weight)
        if shape is None:
            continue
        magnitude = weight.abs()
        mean = float(magnitude.mean()) or 1.0
        for spec in specs:
            if _fits(spec, *shape[:2]):
                kept = spec.mask(weight)  # masks view conv weights as (rows, cols) themselves
                loss = 2 * float(magnitude[~kept].sum()) / mean
                found.append((node, spec, shape, loss))
    if not found:
        return {}
    with torch.no_grad():
        times = measure_sparse_latencies([(spec, *shape) for _, spec, shape, _ in found], target)
    options: dict[torch.fx.Node, list[SparseOption]] = {}
    for (node, spec, _, loss), ms in zip(found, times):
        options.setdefault(node, []).append(SparseOption(node, _layer_name(node), spec, ms, loss))
    return options
