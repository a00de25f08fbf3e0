"""Analysis pass: run the graph once and record what every node produced.

Facts written (node.meta):
- ``sfx_shape``: output shape as a tuple of ints; a list of shapes (None for non-tensor
  items) for tuple/list outputs holding tensors; None for non-tensor outputs.
- ``sfx_dtype``: output dtype (or list of dtypes), None for non-tensors.
- ``sfx_value``: the concrete value of a non-tensor output (ints, sizes, tuples), so that
  later passes can read shape arguments that the graph computes.
"""

from __future__ import annotations

import torch
import torch.fx


def _describe(value: object) -> tuple[object, object]:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape), value.dtype
    if isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value):
        tensors = [v if isinstance(v, torch.Tensor) else None for v in value]
        return ([None if t is None else tuple(t.shape) for t in tensors],
                [None if t is None else t.dtype for t in tensors])
    return None, None


class ShapeProp(torch.fx.Interpreter):
    def run_node(self, n: torch.fx.Node) -> object:
        result = super().run_node(n)
        n.meta["sfx_shape"], n.meta["sfx_dtype"] = _describe(result)
        if n.meta["sfx_shape"] is None and not isinstance(result, torch.Tensor):
            n.meta["sfx_value"] = _plain(result)
        return result


def _plain(value: object) -> object:
    """Keep small Python values (ints, sizes, slices); drop anything heavy."""
    if isinstance(value, (int, float, bool, str, type(None), slice, torch.dtype, torch.device)):
        return value
    if isinstance(value, torch.Size):
        return tuple(value)
    if isinstance(value, (tuple, list)):
        items = [_plain(v) for v in value]
        return tuple(items) if isinstance(value, tuple) else items
    return None
