"""The output comparison cannot pass vacuously: near-zero or input-independent references raise."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsefx.capture.compare import (
    VacuousComparisonError,
    calibrate_norm_statistics,
    check_reference,
    output_error,
)
from sparsefx.capture.models import load_model


def test_error_is_relative_l2_and_catches_real_mismatches() -> None:
    torch.manual_seed(0)
    expected = torch.randn(4, 100)
    assert output_error(expected, expected.clone()).relative_l2 == 0.0
    noisy = expected + 1e-3 * torch.randn_like(expected)
    error = output_error(expected, noisy)
    independent = float((noisy - expected).double().norm() / expected.double().norm())
    assert error.relative_l2 == pytest.approx(independent) and 5e-4 < error.relative_l2 < 2e-3
    assert not error.ok(1e-4) and error.ok(1e-2)
    assert not output_error(expected, torch.zeros_like(expected)).ok()  # an all-zero output fails
    assert output_error(expected, -expected).cosine == pytest.approx(-1.0)
    assert not output_error(expected, expected.flip(1)).ok()  # a wrong channel order fails


def test_near_zero_reference_raises() -> None:
    expected = torch.randn(1, 1000) * 1e-14  # what torchvision's EfficientNets output with random init
    with pytest.raises(VacuousComparisonError, match="near zero"):
        output_error(expected, torch.zeros_like(expected))
    with pytest.raises(VacuousComparisonError, match="not finite"):
        output_error(torch.tensor([1.0, float("nan")]), torch.ones(2))


def test_constant_output_raises() -> None:
    model = nn.Linear(8, 4).eval()
    with torch.no_grad():
        model.weight.zero_()  # the output is the bias whatever the input (GoogLeNet under torchvision's init)
    with pytest.raises(VacuousComparisonError, match="does not depend on the input"):
        check_reference(model, (torch.randn(2, 8),))


def test_integer_inputs_are_varied() -> None:
    embed = nn.Embedding(100, 16).eval()
    reference = check_reference(embed, (torch.randint(0, 100, (2, 10)),))
    assert reference.shape == (2, 10, 16)


@pytest.mark.slow
def test_random_efficientnet_is_flagged_until_its_norms_are_calibrated() -> None:
    model, inputs = load_model("torchvision:efficientnet_b0")
    with pytest.raises(VacuousComparisonError, match="near zero"):
        check_reference(model, inputs)
    assert calibrate_norm_statistics(model, inputs) > 0
    assert not model.training
    reference = check_reference(model, inputs)
    assert reference.pow(2).mean().sqrt() > 1e-2


@pytest.mark.parametrize("batch", [1, 8])
def test_norm_calibration_takes_inputs_of_any_batch(batch: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    model[0].weight.data *= 100  # activations far from the default statistics' unit variance
    inputs = (torch.randn(batch, 3, 8, 8),)
    assert calibrate_norm_statistics(model, inputs) == 1
    out = model(*inputs).detach()
    assert out.shape[0] == batch and 0.3 < float(out.std()) < 3  # normalised by statistics of its own scale
