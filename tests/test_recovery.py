"""Fine-tuning, distillation and pruning schedules on small synthetic data."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import sparsefx
from sparsefx import (
    Gradual,
    GradualPruner,
    Iterative,
    OneShot,
    SparsefxError,
    Sparsity,
    cubic_sparsity,
    finetune,
)
from sparsefx.recovery.data import batches
from sparsefx.recovery.finetune import distillation_loss


def _data(n: int = 256, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    teacher = torch.randn(64, 4, generator=torch.Generator().manual_seed(99))  # labels a linear model can learn
    return TensorDataset(x, (x.flatten(1) @ teacher).argmax(1))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 8 * 8, 32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    return ConvNet()


def test_finetune_lowers_the_loss(model):
    loader = batches(_data(), 32, shuffle=True)
    history = finetune(model, loader, epochs=4, lr=1e-2, val_loader=batches(_data(seed=1), 64), progress=False)
    assert history.loss[-1] < 0.7 * history.loss[0]
    assert len(history.val_accuracy) == 4 and history.val_accuracy[-1] > 0.4 and history.model is model  # chance: 0.25


def test_distillation_follows_the_teacher(model):
    teacher = ConvNet()
    x = _data(seed=2).tensors[0]

    def divergence() -> float:  # KL ignores a constant shift of the logits, so compare distributions
        with torch.no_grad():
            return float(distillation_loss(model(x), teacher(x), torch.zeros(len(x), dtype=torch.long), 1.0, 1.0))

    before = divergence()
    finetune(model, batches(_data(), 32, shuffle=True), epochs=3, lr=1e-2, distill_from=teacher, alpha=1.0,
             progress=False)
    assert divergence() < 0.5 * before
    logits = torch.randn(5, 4)
    assert distillation_loss(logits, logits, torch.zeros(5, dtype=torch.long), alpha=1.0).abs() < 1e-6


def test_cubic_schedule_endpoints():
    args = dict(initial=0.1, final=0.9, start=10, steps=4, every=5)
    assert cubic_sparsity(0, **args) == 0.0  # nothing before t0
    assert cubic_sparsity(10, **args) == pytest.approx(0.1)
    assert cubic_sparsity(30, **args) == pytest.approx(0.9) and cubic_sparsity(1000, **args) == pytest.approx(0.9)
    values = [cubic_sparsity(t, **args) for t in range(10, 31)]
    assert values == sorted(values) and cubic_sparsity(14, **args) == cubic_sparsity(10, **args)  # steps of Δt
    # cubic: the first interval prunes the most
    jumps = [cubic_sparsity(10 + 5 * (k + 1), **args) - cubic_sparsity(10 + 5 * k, **args) for k in range(4)]
    assert jumps == sorted(jumps, reverse=True)


def test_iterative_and_one_shot_reach_the_final_sparsity():
    iterative = Iterative(steps=3, every=10)
    assert iterative.sparsity(0, 0.875) == pytest.approx(0.5)  # kept halves each round: 1/2, 1/4, 1/8
    assert iterative.sparsity(15, 0.875) == pytest.approx(0.75) and iterative.sparsity(99, 0.875) == pytest.approx(0.875)
    assert OneShot(at=5).sparsity(4, 0.9) == 0.0 and OneShot(at=5).sparsity(5, 0.9) == 0.9


@pytest.mark.parametrize("schedule", [OneShot(), Iterative(steps=3, every=8), Gradual(steps=4, every=4)])
def test_mask_schedules_reach_the_density_during_training(model, schedule):
    plan = {"fc1": Sparsity(0.125, "block", (1, 4)), "conv": Sparsity(1 / 3, "nm", m=3)}
    pruner = GradualPruner(model, schedule, masks=plan)
    history = finetune(model, batches(_data(), 32), epochs=3, lr=1e-3, pruner=pruner, progress=False)
    assert history.model is model
    sparsefx.remove_masks(model)
    assert (model.fc1.weight != 0).float().mean() == pytest.approx(0.125)
    assert ((model.conv.weight.reshape(8, 3, 3) != 0).sum(-1) == 1).all()  # 1:3 along each kernel row


@pytest.mark.parametrize("schedule", [OneShot(), Iterative(steps=2, every=8), Gradual(steps=3, every=4)])
def test_channel_schedules_shrink_the_model(model, schedule):
    pruner = GradualPruner(model, schedule, channels=0.5, example_inputs=(torch.randn(1, 1, 8, 8),))
    history = finetune(model, batches(_data(), 32), epochs=2, lr=1e-3, pruner=pruner, progress=False)
    pruned = history.model
    assert pruned is not model and pruned.conv.out_channels == 4 and pruned.fc1.out_features == 16
    assert pruned(torch.randn(2, 1, 8, 8)).shape == (2, 4)


@pytest.mark.parametrize("call, message", [
    (lambda m: finetune(m, batches(_data(), 32), epochs=0), "epochs must be"),
    (lambda m: finetune(m, batches(_data(), 32), lr=-1), "lr must be"),
    (lambda m: finetune(m, batches(_data(), 32), alpha=2), "alpha must be"),
    (lambda m: finetune(m, batches(_data(0), 32)), "no batches"),
    (lambda m: GradualPruner(m, OneShot()), "exactly one of"),
    (lambda m: GradualPruner(m, OneShot(), channels=0.5), "example_inputs"),
    (lambda m: GradualPruner(m, OneShot(), masks=Sparsity(0.5, "block", (1, 5))), "does not divide"),
    (lambda m: Gradual(steps=0), "steps must be"),
])
def test_bad_arguments(model, call, message):
    with pytest.raises(SparsefxError, match=message) as info:
        call(model)
    assert "\n" not in str(info.value)
