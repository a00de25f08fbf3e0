"""Bad input: one clear line naming the problem and the fix; the user's model is untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsefx

from .models_zoo import CASES


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = Gate()
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.gate(x))


class Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: neither fx nor export can capture it
            return x * 2
        return x


@pytest.fixture
def residual() -> tuple[nn.Module, tuple[torch.Tensor]]:
    build, make_inputs = CASES["residual"]
    return build().eval(), make_inputs()


def _one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


def _unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, {"a": 2.0}, "half"])
def test_ratio_out_of_range(residual, ratio):
    model, inputs = residual
    if isinstance(ratio, dict):
        ratio = {"a": 2.0}
    with pytest.raises(sparsefx.SparsefxError) as error:
        sparsefx.prune(model, inputs, ratio=ratio)
    assert "ratio must be in [0, 1)" in _one_line(error)


def test_unknown_importance(residual):
    model, inputs = residual
    with pytest.raises(sparsefx.SparsefxError) as error:
        sparsefx.prune(model, inputs, importance="l3")
    assert "unknown importance 'l3'" in _one_line(error) and "l1" in str(error.value)


def test_unknown_ignore_name_suggests_the_closest(residual):
    model, inputs = residual
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(sparsefx.SparsefxError) as error:
        sparsefx.prune(model, inputs, ignore=["stemm"])
    assert "'stemm'" in _one_line(error) and "did you mean 'stem'" in str(error.value)
    assert _unchanged(model, before)


def test_unknown_ratio_key(residual):
    model, inputs = residual
    with pytest.raises(sparsefx.SparsefxError, match="ratio names module 'nope'"):
        sparsefx.prune(model, inputs, ratio={"nope": 0.5})


def test_untraceable_model_names_module_and_line():
    model, inputs = DataDependent(), (torch.randn(2, 4),)
    with pytest.raises(sparsefx.TraceError) as error:
        sparsefx.trace(model, inputs)
    text = _one_line(error)
    assert "module gate (Gate)" in text and "test_errors.py:" in text and "method='export'" in text
    with pytest.raises(sparsefx.SparsefxError) as error:
        sparsefx.prune(model, inputs)
    assert "torch.export also failed" in _one_line(error)


def test_nothing_prunable_warns_and_returns_a_copy():
    model, inputs = nn.Sequential(nn.Linear(4, 3)), (torch.randn(2, 4),)
    with pytest.warns(UserWarning, match="nothing to prune"):
        pruned = sparsefx.prune(model, inputs, ratio=0.5)
    assert pruned is not model and torch.equal(pruned(*inputs), model(*inputs))


def test_bad_arguments():
    with pytest.raises(sparsefx.SparsefxError, match="torch.nn.Module"):
        sparsefx.trace(lambda x: x, (torch.randn(1),))
    with pytest.raises(sparsefx.SparsefxError, match="unknown trace method"):
        sparsefx.trace(nn.Linear(2, 2), (torch.randn(1, 2),), method="jit")
    with pytest.raises(sparsefx.SparsefxError, match="round_to"):
        sparsefx.prune(nn.Linear(2, 2), (torch.randn(1, 2),), round_to=0)
    with pytest.raises(sparsefx.SparsefxError, match="does not run on the example inputs"):
        sparsefx.trace(nn.Linear(2, 2), (torch.randn(1, 3),))
