"""How much faster a pruned model can be than its dense original, per op class.

The MACs ratio bounds the speedup only where time follows MACs. Pruning a fraction of channels
cuts a 1x1 or k x k convolution's or a matmul's MACs by both its input and output widths
(quadratically), but a depthwise convolution's and element-wise work (norms, activations,
residual adds, pooling) only by the channel ratio, and those are memory-bound: a large share of a
MobileNet's time for a small share of its MACs. So each op class shrinks by its own ratio
(MACs for "conv1x1", "conv_kxk", "matmul"; output elements, i.e. channels, for "depthwise" and
"elementwise") and the classes are weighed by their share of the dense model's time: measured
shares when given, else a roofline estimate from the traced graph's facts (time of a node ~
max(2 MACs / peak FLOP/s, bytes / bandwidth), `sfx_macs` and `sfx_bytes` of `capture.annotate`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx
from torch import nn

from sparsefx.capture import ops
from sparsefx.capture.annotate import is_transposed, node_arg, numel, total_macs

MAC_CLASSES = ("conv1x1", "conv_kxk", "matmul")  # shrink by their MACs ratio
CHANNEL_CLASSES = ("depthwise", "elementwise")  # shrink by their channel (output elements) ratio
CLASSES = MAC_CLASSES + CHANNEL_CLASSES
# ops that move no data or only relabel it: no kernel of their own in any runtime measured here
FREE = {"flatten", "view", "reshape", "permute", "transpose", "t", "contiguous", "unsqueeze", "squeeze",
        "expand", "getitem", "getattr", "size", "dim", "dropout", "identity", "unflatten", "split", "chunk",
        "alias", "detach", "_assert_tensor_metadata", "sym_size", "unbind", "select", "slice", "clone",
        # inference batch norm folds into the convolution before it in every runtime measured here
        "batchnorm1d", "batchnorm2d", "batch_norm", "_native_batch_norm_legit_no_training"}


@dataclass(frozen=True)
class ClassWork:
    """One op class of one model: the work it shrinks by, and its roofline time weight (FLOP units)."""

    work: int  # MACs (MAC_CLASSES) or output elements (CHANNEL_CLASSES)
    weight: float  # sum over nodes of max(2 MACs, flops_per_byte * bytes)


@dataclass(frozen=True)
class Bound:
    """Pruned-vs-dense speedup bounds: by total MACs, and per op class."""

    macs: float  # dense MACs / pruned MACs
    per_class: float  # 1 / sum(share_c * pruned_c / dense_c)
    ratios: dict[str, float]  # per class: pruned work / dense work
    shares: dict[str, float]  # per class: share of the dense model's time the bound assumes


def op_class(node: torch.fx.Node, gm: torch.fx.GraphModule) -> str | None:
    """The op class a node's work belongs to; None for nodes that run no kernel (inputs, views)."""
    if node.op not in ("call_module", "call_function", "call_method") or node.meta.get("sfx_shape") is None:
        return None
    weight = _conv_weight_shape(node, gm)
    if weight is not None:
        if len(weight) > 2 and weight[1] == 1 and weight[0] > 1 and _groups(node, gm) > 1:
            return "depthwise"
        return "conv1x1" if all(k == 1 for k in weight[2:]) else "conv_kxk"
    if node.meta.get("sfx_macs", 0):
        return "matmul"  # linear, matmul, addmm, attention, transposed convolutions counted by MACs
    return None if _name(node, gm) in FREE else "elementwise"


def class_work(gm: torch.fx.GraphModule, flops_per_byte: float) -> dict[str, ClassWork]:
    """Work and roofline weight per op class of a traced (annotated) graph."""
    work = dict.fromkeys(CLASSES, 0)
    weight = dict.fromkeys(CLASSES, 0.0)
    for node in gm.graph.nodes:
        kind = op_class(node, gm)
        if kind is None:
            continue
        macs = node.meta.get("sfx_macs", 0)
        work[kind] += macs if kind in MAC_CLASSES else numel(node.meta["sfx_shape"])
        weight[kind] += max(2.0 * macs, flops_per_byte * node.meta.get("sfx_bytes", 0))
    return {kind: ClassWork(work[kind], weight[kind]) for kind in CLASSES}


def pruning_bound(dense: torch.fx.GraphModule, pruned: torch.fx.GraphModule, flops_per_byte: float = 10.0,
                  shares: dict[str, float] | None = None) -> Bound:
    """Speedup bounds of `pruned` over `dense` (both traced with `capture.trace`). `flops_per_byte`: the
    machine balance (peak FLOP/s over bandwidth) of the roofline shares; `shares` (per class, summing
    to 1) replace those with measured ones."""
    before, after = class_work(dense, flops_per_byte), class_work(pruned, flops_per_byte)
    ratios = {kind: after[kind].work / before[kind].work for kind in CLASSES if before[kind].work}
    if shares is None:
        total = sum(before[kind].weight for kind in ratios) or 1.0
        shares = {kind: before[kind].weight / total for kind in ratios}
    time_left = sum(share * ratios.get(kind, 1.0) for kind, share in shares.items())
    macs_before, macs_after = total_macs(dense), total_macs(pruned)
    return Bound(macs_before / macs_after if macs_after else float("inf"),
                 1.0 / time_left if time_left else float("inf"), ratios, dict(shares))


def _conv_weight_shape(node: torch.fx.Node, gm: torch.fx.GraphModule) -> tuple | None:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return tuple(module.weight.shape) if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) else None
    if ops.op_key(node.target) is not ops.CONV or is_transposed(node):
        return None  # not a convolution, or aten.convolution spelling a transposed one
    weight = node_arg(node, 1, "weight")
    return weight.meta.get("sfx_shape") if isinstance(weight, torch.fx.Node) else None


def _groups(node: torch.fx.Node, gm: torch.fx.GraphModule) -> int:
    if node.op == "call_module":
        return gm.get_submodule(node.target).groups
    index = 8 if len(node.args) > 8 else 6  # aten.convolution(..., transposed, output_padding, groups)
    return int(node_arg(node, index, "groups", 1))


def _name(node: torch.fx.Node, gm: torch.fx.GraphModule) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__.lower()
    if node.op == "call_method":
        return node.target
    return getattr(node.target, "_opname", None) or getattr(node.target, "__name__", str(node.target))
