"""Analysis pass: the activation layout conversions a compiled model runs between its kernels.

A backend may run some convs in an activation layout of its own (the TVM backend's float32 blocked
kernels, NCHW16c: `backends.tvm.kernels.layout_chain`). A tensor handed from a kernel outside that
layout to a conv in it is converted in, and one handed from a conv in it to a kernel outside it is
converted out: once per tensor and direction. Which convs run in the layout is the backend's rule,
asked per conv at the shapes being priced (`InLayout`), so a plan that prunes a conv's input off the
layout (under a block of 16 channels, onto the NCHW `direct` kernel) is charged the conversions it
brings: Fashion-MNIST's small ResNet at batch 64 with its first stage at 8 channels spent 0.27 ms of
its 1.77 converting out of the layout, which no kernel's price held.

The walk follows the backend's chain pass: views that keep a 4-D shape and max-pools hand the layout
on, a per-(image, channel) scale of a tensor (squeeze-and-excitation's `x * s`) runs in its layout, a
global average pool reads either layout, and an op fused into a kernel (`Fusion.hosts`) reads its
inputs in that kernel's layout. Each conversion is charged to the node that writes the tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.fx
from torch import nn

from sparsefx.capture import ops
from sparsefx.capture.annotate import numel
from sparsefx.cost.kernel import LAYOUT_IN, LAYOUT_OUT, Kernel
from sparsefx.cost.latency import SCALES, Fusion, ShapeOf, node_kernels, priced_kernels

# (reads, writes): whether the backend's kernel for this conv reads its input, and writes its output
# (and takes a fused residual), in the backend's own layout
InLayout = Callable[[Kernel], tuple[bool, bool]]

PASSES_ON: ops.OpRegistry[bool] = ops.OpRegistry("layout")  # ops the chain pass runs in the layout
PASSES_ON.add(True, nn.MaxPool2d, ops.MAX_POOL)
ANY, NCHW = "any", "nchw"  # readers of either layout (a global average pool), of NCHW (any but a conv)


class Conversions:
    """Where a graph's tensors can be converted, found once from its structure (what writes a 4-D map,
    what reads it and how); `__call__` then says which conversions run at the shapes a plan prices."""

    def __init__(self, gm: torch.fx.GraphModule, fusion: Fusion) -> None:
        self.gm, self.fusion = gm, fusion
        self.layouts: dict[tuple, tuple[bool, bool]] = {}  # `_layout`'s answers
        self.shape = shape = lambda n: n.meta.get("sfx_shape")  # the traced shapes: the structure
        self.convs = {node for node in gm.graph.nodes if _is_conv(node, gm, shape)}
        # writer -> [(reader, reads it as a fused epilogue's operand (True) or its conv's input (False), or ANY / NCHW)]
        self.readers: dict[torch.fx.Node, list[tuple[torch.fx.Node, bool | str]]] = {}
        for node in gm.graph.nodes:
            out = shape(node)  # a (n, c, 1, 1) tensor (a squeeze-excite scale) is read as it is
            if node in fusion.fused or node.op in ("output", "get_attr") or not (isinstance(out, tuple) and len(out) == 4) \
                    or out[2] * out[3] == 1 or _hands_on(node, gm, shape, fusion):
                continue
            readers = [(reader, _how(reader, residual, gm, shape)) for reader, residual in _readers(node, node, gm, shape, fusion)]
            if node in self.convs or any(how in (True, False) for _, how in readers):  # layouts may differ
                self.readers[node] = readers

    def __call__(self, node: torch.fx.Node, shape_of: ShapeOf, lanes: int, in_layout: InLayout) -> list[Kernel]:
        """The conversion of the tensor `node` writes: in, where `node` writes outside the layout and a
        reader reads inside it; out, where the reverse."""
        readers = self.readers.get(node)
        if readers is None:
            return []
        mine = self._layout(node, shape_of, lanes, in_layout)[1]
        wanted = {False if how == NCHW else None if how == ANY else self._layout(reader, shape_of, lanes, in_layout)[how]
                  for reader, how in readers}
        if mine and False in wanted:
            return [Kernel(LAYOUT_OUT, (8 * numel(shape_of(node)),))]  # read once, written once
        if not mine and True in wanted:
            return [Kernel(LAYOUT_IN, (8 * numel(shape_of(node)),))]
        return []

    def writers(self, node: torch.fx.Node) -> set[torch.fx.Node]:
        """The nodes whose conversions depend on how `node` reads: those writing its inputs (a plan
        re-prices them when `node`'s shapes change)."""
        found = set()
        for arg in node.all_input_nodes:
            while arg in self.fusion.fused or _hands_on(arg, self.gm, self.shape, self.fusion):
                arg = self.fusion.hosts[arg] if arg in self.fusion.fused else arg.all_input_nodes[0]
            found.add(arg)
        return found

    def _layout(self, node: torch.fx.Node, shape_of: ShapeOf, lanes: int, in_layout: InLayout) -> tuple[bool, bool]:
        """(reads, writes) in the layout of `node`'s kernel: only convs do either (remembered by the
        shapes a conv reads and writes: a plan asks again for every move it weighs)."""
        if node not in self.convs:
            return False, False
        key = (node, shape_of(node.all_input_nodes[0]), shape_of(node))
        found = self.layouts.get(key)
        if found is None:
            kernels = priced_kernels(node, self.gm, shape_of, lanes, self.fusion)
            found = self.layouts[key] = in_layout(kernels[0]) if kernels and kernels[0].op == "conv2d" else (False, False)
        return found


def _readers(node: torch.fx.Node, writer: torch.fx.Node, gm: torch.fx.GraphModule, shape_of: ShapeOf,
             fusion: Fusion) -> Iterator[tuple[torch.fx.Node, bool]]:
    """(kernel or the graph's output, whether it reads this as a fused epilogue's operand) for what
    `writer` wrote, reached through `node`."""
    for user in node.users:
        host = fusion.hosts.get(user)
        if host is writer or (host is None and user.all_input_nodes[:1] == [node] and _hands_on(user, gm, shape_of, fusion)):
            yield from _readers(user, writer, gm, shape_of, fusion)  # its own epilogue, or a view of it
        elif host is not None:
            yield host, host not in user.users  # an add in its epilogue, not a scale folded into its input
        else:
            yield user, False


def _how(reader: torch.fx.Node, residual: bool, gm: torch.fx.GraphModule, shape_of: ShapeOf) -> bool | str:
    """How `reader` reads: NCHW, ANY (a global average pool, which the chain pass runs on the layout),
    or as its conv's input (False: `InLayout`'s reads) or residual (True: its writes)."""
    if reader.op == "output":
        return NCHW
    kernels = node_kernels(reader, gm, shape_of, 1)
    if len(kernels) == 1 and kernels[0].op in ("reduce", "pool"):
        x, out = shape_of(reader.all_input_nodes[0]), shape_of(reader)
        if isinstance(x, tuple) and len(x) == 4 and isinstance(out, tuple) and numel(out) == x[0] * x[1]:
            return ANY
    return residual if _is_conv(reader, gm, shape_of) else NCHW


def _is_conv(node: torch.fx.Node, gm: torch.fx.GraphModule, shape_of: ShapeOf) -> bool:
    kernels = node_kernels(node, gm, shape_of, 1)
    return len(kernels) == 1 and kernels[0].op == "conv2d"


def _hands_on(node: torch.fx.Node, gm: torch.fx.GraphModule, shape_of: ShapeOf, fusion: Fusion) -> bool:
    """Whether `node` hands its first input's layout on: a view keeping its 4-D shape (what a
    flatten or reshape reads must be NCHW), a max-pool, or a scale of that input by (n, c, 1, 1)."""
    if node.op not in ("call_module", "call_function", "call_method") or node in fusion.fused or not node.all_input_nodes:
        return False
    shape, first = shape_of(node), shape_of(node.all_input_nodes[0])
    if not (isinstance(shape, tuple) and len(shape) == 4 and isinstance(first, tuple) and len(first) == 4):
        return False
    if PASSES_ON.lookup(node, gm):
        return True
    if SCALES.lookup(node, gm) is not None:
        return first == shape and all(shape_of(a) in (shape, (*shape[:2], 1, 1)) for a in node.all_input_nodes)
    return first == shape and not node_kernels(node, gm, shape_of, 1)
