"""Calibration data: the batches that data-aware importance (Wanda, Taylor) and depth pruning run.

`calibration` is a tensor (one batch), a tuple of tensors (one batch of several inputs) or an
iterable of either (a list, a DataLoader yielding inputs only). A batch must look like the example inputs the model
was traced with: the same number of tensors, each with the same dtype kind and the same size
in every dimension but the first (the batch dimension), because a traced graph may have
specialised the others. Anything else is one `CalibrationError` naming the batch and the fix.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from sparsefx.errors import PruneError, one_line

MAX_BATCHES = 64  # a calibration set is a sample: more batches cost time and change scores little


class CalibrationError(PruneError):
    """Calibration data that cannot be run through the model."""


def batches(calibration: object) -> list[tuple]:
    """The calibration data as a list of input tuples (at most MAX_BATCHES)."""
    if isinstance(calibration, torch.Tensor) or (isinstance(calibration, tuple) and is_tensor_tuple(calibration)):
        items: Iterable = [calibration]  # one batch; a list is a list of batches
    elif isinstance(calibration, Iterable) and not isinstance(calibration, (str, bytes, dict)):
        items = calibration
    else:
        raise CalibrationError(f"calibration must be a tensor, a tuple of tensors or an iterable of them "
                               f"(a DataLoader), got {type(calibration).__name__}")
    out = []
    for i, item in enumerate(items):
        if i == MAX_BATCHES:
            break
        batch = (item,) if isinstance(item, torch.Tensor) else item
        if not is_tensor_tuple(batch):
            raise CalibrationError(f"calibration batch {i} is a {type(item).__name__}, not a tensor or a tuple "
                                   "of tensors; yield model inputs only (drop the labels)")
        out.append(tuple(batch))
    if not out:
        raise CalibrationError("calibration yields no batches; pass at least one batch of model inputs")
    return out


def is_tensor_tuple(x: object) -> bool:
    return isinstance(x, (tuple, list)) and len(x) > 0 and all(isinstance(t, torch.Tensor) for t in x)


def check_like(calibration: list[tuple], example_inputs: tuple) -> None:
    """Every batch shaped like `example_inputs` (all dimensions but the first, dtype kind)."""
    expected = [t for t in example_inputs if isinstance(t, torch.Tensor)]
    for i, batch in enumerate(calibration):
        if len(batch) != len(expected):
            raise CalibrationError(f"calibration batch {i} has {len(batch)} tensors, the model was traced with "
                                   f"{len(expected)}; yield the same inputs as example_inputs")
        for j, (got, want) in enumerate(zip(batch, expected)):
            if got.dim() != want.dim() or got.shape[1:] != want.shape[1:] or got.is_floating_point() != \
                    want.is_floating_point():
                raise CalibrationError(
                    f"calibration batch {i} input {j} is {dtype_shape(got)}, expected {want.dtype} "
                    f"(N, {', '.join(map(str, want.shape[1:]))}) like example_inputs; reshape the calibration data")


def in_example_batches(calibration: list[tuple], example_inputs: tuple) -> list[tuple]:
    """The batches split into pieces of the example inputs' batch size: a graph captured by
    torch.export may have specialised it. A batch that does not split evenly is refused."""
    check_like(calibration, example_inputs)
    sizes = [t.shape[0] for t in example_inputs if isinstance(t, torch.Tensor) and t.dim()]
    if not sizes:
        return calibration
    size = sizes[0]
    pieces = []
    for i, batch in enumerate(calibration):
        n = batch[0].shape[0]
        if n % size or any(t.shape[0] != n for t in batch):
            raise CalibrationError(f"calibration batch {i} holds {n} samples, which does not split into the "
                                   f"example inputs' batch of {size}; use batches of a multiple of {size}")
        pieces += [tuple(t[j:j + size] for t in batch) for j in range(0, n, size)]
    return pieces


def dtype_shape(t: torch.Tensor) -> str:
    return f"{t.dtype} {tuple(t.shape)}"


def main_output(out: object) -> torch.Tensor:
    """The tensor a model's output leads with: logits, a last hidden state or the first of a tuple."""
    if isinstance(out, (tuple, list)):
        return main_output(out[0])
    for name in ("logits", "last_hidden_state"):
        if getattr(out, name, None) is not None:
            return getattr(out, name)
    return out


def default_loss(out: torch.Tensor, inputs: tuple) -> torch.Tensor:
    """The loss Taylor scores differentiate when none is given: next-token cross-entropy for a
    language model ((N, T, vocab) logits of (N, T) token ids), cross-entropy on its own top-1
    prediction for a classifier, half the squared output norm otherwise (hidden states of a bare
    decoder `*Model`: token ids past their last dimension show they are not vocabulary logits)."""
    ids = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
    if (out.dim() == 3 and ids is not None and not ids.is_floating_point() and ids.shape == out.shape[:2]
            and int(ids.max()) < out.shape[-1]):
        return F.cross_entropy(out[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    if out.dim() == 2:
        return F.cross_entropy(out, out.argmax(1))
    return 0.5 * out.float().pow(2).sum()


LINEAR_FUNCTIONS = {F.linear, torch.ops.aten.linear.default}
CONV_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, torch.ops.aten.conv1d.default, torch.ops.aten.conv2d.default,
                  torch.ops.aten.conv3d.default, torch.ops.aten.convolution.default}


def weight_of(gm: torch.fx.GraphModule, node: torch.fx.Node) -> tuple[torch.Tensor, torch.fx.Node, int] | None:
    """(weight, input node, channel axis of the input) when `node` is a linear or convolution."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, nn.Linear):
            return module.weight, node.args[0], -1
        if isinstance(module, nn.modules.conv._ConvNd) and not isinstance(module, nn.modules.conv._ConvTransposeNd):
            return module.weight, node.args[0], 1
        return None
    if node.op == "call_function" and (node.target in LINEAR_FUNCTIONS or node.target in CONV_FUNCTIONS):
        w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        if isinstance(w, torch.fx.Node) and w.op == "get_attr":
            weight = operator.attrgetter(w.target)(gm)
            transposed = node.target == torch.ops.aten.convolution.default and node.args[6]
            if isinstance(weight, torch.Tensor) and weight.dim() >= 2 and not transposed:
                return weight, node.args[0], -1 if node.target in LINEAR_FUNCTIONS else 1
    return None


class InputNorms(torch.fx.Interpreter):
    """Runs the graph and sums, per input channel of every linear and convolution, the squares
    of what it receives (Wanda's ||X_j||_2, Sun et al. 2023)."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__(gm)
        self.sums: dict[int, torch.Tensor] = {}  # id(weight) -> sum of squares per input channel
        self.weights: dict[int, torch.Tensor] = {}

    def run_node(self, node: torch.fx.Node) -> object:
        found = weight_of(self.module, node)
        if found is not None:
            weight, source, axis = found
            x = self.env.get(source) if isinstance(source, torch.fx.Node) else None
            if isinstance(x, torch.Tensor) and x.shape[axis] == weight.shape[1]:
                squares = x.detach().float().movedim(axis, 0).reshape(x.shape[axis], -1).pow(2).sum(1)
                key = id(weight)
                self.sums[key] = self.sums.get(key, 0) + squares
                self.weights[key] = weight
        return super().run_node(node)


def input_norms(gm: torch.fx.GraphModule, calibration: list[tuple]) -> dict[str, np.ndarray]:
    """{parameter name: ||X_j||_2 per input channel} of every linear and convolution weight
    over the calibration batches (names as `gm.named_parameters` first gives them)."""
    recorder = InputNorms(gm)
    with torch.no_grad():
        for i, batch in enumerate(calibration):
            try:
                recorder.run(*batch)
            except Exception as error:
                raise CalibrationError(f"running the model on calibration batch {i} failed ({one_line(error)}); "
                                       "pass batches shaped like example_inputs") from None
    names = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), name)
    return {names[k]: s.sqrt().numpy() for k, s in recorder.sums.items() if k in names}
