"""One way to compare a model's outputs with a reference, for every test and benchmark.

A relative error is only a measure when its reference means something. Divided by a floored
max|expected|, torchvision's EfficientNets (random init, outputs of 1e-14) passed a 1e-4 mark with
an all-zero output, and GoogLeNet (output = its classifier's bias, whatever the input) matched any
build exactly. So `output_error` refuses a reference that is near zero, and `check_reference`
also refuses a model whose output does not depend on its input; both raise VacuousComparisonError
naming the fix (`calibrate_norm_statistics` is the usual one for randomly initialised networks).

The measure is the relative L2 error ||actual - expected|| / ||expected|| over every element
(with the cosine between the two for reference), computed in float64. Float32 arithmetic puts a
floor under it: a correct float32 build differs from eager by reordered sums, about 1e-7 to 1e-6;
TOLERANCE is well above that floor and far below any real mistake (a wrong channel order or a
dropped bias gives 1e-2 to 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sparsefx.errors import SparsefxError

TOLERANCE = 1e-4  # relative L2 error under which a compiled or pruned output counts as equal
REFERENCE_RMS_FLOOR = 1e-5  # root-mean-square below which a float32 reference is rounding residue, not output
DEPENDENCE_FLOOR = 1e-3  # two different inputs must move the output by at least this much of its norm
NORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class VacuousComparisonError(SparsefxError):
    """The reference output cannot tell a right answer from a wrong one."""


@dataclass(frozen=True)
class Error:
    """How far an output is from its reference."""

    relative_l2: float  # ||actual - expected|| / ||expected||
    cosine: float  # cosine of the angle between actual and expected, flattened
    reference_rms: float  # root-mean-square of the reference, above REFERENCE_RMS_FLOOR by construction

    def ok(self, tolerance: float = TOLERANCE) -> bool:
        return self.relative_l2 <= tolerance

    def __str__(self) -> str:
        return f"relative L2 error {self.relative_l2:.1e} (cosine {self.cosine:.7f}, reference rms {self.reference_rms:.1e})"


def first_tensor(output: object) -> torch.Tensor:
    """The first tensor of a model's output (a tensor, tuple, dict or HF ModelOutput)."""
    leaves = [leaf for leaf in torch.utils._pytree.tree_leaves(output) if isinstance(leaf, torch.Tensor)]
    if not leaves:
        raise SparsefxError(f"the output ({type(output).__name__}) holds no tensor to compare")
    return leaves[0]


def output_error(expected: torch.Tensor, actual: torch.Tensor) -> Error:
    """Relative L2 error and cosine of `actual` against `expected`; raises VacuousComparisonError when
    `expected` is near zero or not finite, since any output would then pass."""
    if expected.shape != actual.shape:
        raise SparsefxError(f"output shapes differ: expected {tuple(expected.shape)}, got {tuple(actual.shape)}")
    want, got = expected.detach().double().flatten(), actual.detach().double().flatten()
    rms = _rms(want)
    _check_not_vacuous(want, rms)
    if not torch.isfinite(got).all():
        return Error(float("inf"), float("nan"), rms)
    difference = float((got - want).norm() / want.norm())
    cosine = float(torch.dot(got, want) / (got.norm() * want.norm()).clamp_min(1e-300))
    return Error(difference, cosine, rms)


def check_reference(model: nn.Module, inputs: tuple) -> torch.Tensor:
    """The model's output on `inputs` (first tensor), after checking it can serve as a reference:
    finite, not near zero, and changed by a different random input. Raises VacuousComparisonError."""
    with torch.no_grad():
        first = first_tensor(model(*inputs)).detach()
        second = first_tensor(model(*random_like(inputs))).detach()
    want = first.double().flatten()
    _check_not_vacuous(want, _rms(want))
    moved = float((second.double().flatten() - want).norm() / want.norm())
    if moved < DEPENDENCE_FLOOR:
        raise VacuousComparisonError(
            f"the reference output does not depend on the input (another random input moves it by {moved:.1e} of "
            f"its norm, under {DEPENDENCE_FLOOR:.0e}): any build that returns it would match; re-initialise the "
            "norm statistics (calibrate_norm_statistics) or zero the biases the output reduces to")
    return first


def random_like(inputs: tuple) -> tuple:
    """Different inputs of the same kind: floats with the same root-mean-square, integers (token ids)
    drawn over the same range, anything else unchanged."""
    out = []
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            out.append(torch.randn_like(x) * float(_rms(x.double().flatten()) or 1.0))
        elif isinstance(x, torch.Tensor) and x.dtype == torch.bool:
            out.append(torch.rand(x.shape) < 0.5)
        elif isinstance(x, torch.Tensor):
            out.append(torch.randint(0, max(2, int(x.max()) + 1), x.shape, dtype=x.dtype))
        else:
            out.append(x)
    return tuple(out)


def calibrate_norm_statistics(model: nn.Module, inputs: tuple, batches: int = 2, batch_size: int = 4) -> int:
    """Set every batch norm's running mean and variance from random inputs like `inputs`, so that a
    randomly initialised network's activations stay O(1) instead of vanishing with depth (torchvision's
    EfficientNets: outputs of 1e-14 under the default statistics; GoogLeNet: features gone, output =
    bias). Leaves the model in eval mode; returns how many norm layers were recalibrated."""
    norms = [m for m in model.modules() if isinstance(m, NORM_LAYERS) and m.track_running_stats]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the calibration batches
    # inputs' own batch, at least `batch_size` (a norm in training mode needs more than one value per
    # channel); the values are random_like's. A traced model may have its batch size built in (ViT's
    # class token expanded to it), so a larger batch is kept as it is
    batch = tuple(x[:1].expand(max(batch_size, len(x)), *x.shape[1:]) if isinstance(x, torch.Tensor) and x.dim() else x
                  for x in inputs)
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(*random_like(batch))
    model.eval()
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    return len(norms)


def _rms(values: torch.Tensor) -> float:
    return float(values.pow(2).mean().sqrt()) if values.numel() else 0.0


def _check_not_vacuous(want: torch.Tensor, rms: float) -> None:
    if not torch.isfinite(want).all():
        raise VacuousComparisonError("the reference output is not finite (inf or nan): fix the model or its inputs first")
    if rms < REFERENCE_RMS_FLOOR:
        raise VacuousComparisonError(
            f"the reference output is near zero (rms {rms:.1e} < {REFERENCE_RMS_FLOOR:.0e}), so a comparison with it "
            "would pass any output: rescale the inputs or re-initialise the norm statistics (calibrate_norm_statistics) "
            "or biases so the outputs are O(1)")
