"""Compact sparse training: a Linear layer held as its kept weights only, and SET on it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsefx import finetune
from sparsefx.recovery.compact import CompactLinear, CompactSET, densify
from sparsefx.recovery.regrowth import RegrowthError


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(64, 48), nn.Linear(48, 32), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.fc2(F.relu(self.fc1(x)))))


def _positions(layer: CompactLinear) -> set[int]:
    return set((layer.rows.long() * layer.in_features + layer.cols.long()).tolist())


def test_compact_linear_matches_the_masked_dense_layer_forward_and_backward() -> None:
    torch.manual_seed(0)
    dense = nn.Linear(96, 40)
    compact = CompactLinear.from_linear(dense, 0.2, init="magnitude")
    reference = compact.to_linear()  # the same kept weights, zeros elsewhere
    assert int(torch.count_nonzero(reference.weight)) == compact.values.numel() == round(0.2 * 96 * 40)
    x = torch.randn(3, 7, 96, requires_grad=True)  # batch dims beyond the first are kept
    grad = torch.randn(3, 7, 40)
    out = compact(x)
    out.backward(grad)
    x_grad, x.grad = x.grad.clone(), None
    expected = reference(x)
    expected.backward(grad)
    assert out.shape == expected.shape
    assert torch.allclose(out, expected, atol=1e-5) and expected.abs().mean() > 0.1
    assert torch.allclose(x_grad, x.grad, atol=1e-5)
    kept_grad = reference.weight.grad[compact.rows.long(), compact.cols.long()]
    assert torch.allclose(compact.values.grad, kept_grad, atol=1e-4) and kept_grad.abs().mean() > 0.1
    assert torch.allclose(compact.bias.grad, reference.bias.grad, atol=1e-5)


def test_compact_set_keeps_the_count_moves_weights_and_never_holds_a_dense_tensor() -> None:
    torch.manual_seed(0)
    model = MLP()
    kept = {"fc1": 0.1, "fc2": 0.25, "out": 0.9}  # above half kept: regrown from the free positions
    pruner = CompactSET(model, kept, every=2, end=40, fraction=0.3, seed=1)
    x, y = torch.randn(32, 64), torch.randint(0, 4, (32,))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    pruner.bind(optimizer)
    before = {name: _positions(layer) for name, layer in pruner.layers.items()}
    for t in range(12):
        pruner.step(t)
        for name, layer in pruner.layers.items():
            positions = _positions(layer)
            assert len(positions) == layer.values.numel() == round(kept[name] * layer.in_features * layer.out_features)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert pruner.updates == 5
    assert all(_positions(layer) != before[name] for name, layer in pruner.layers.items())  # regrowth moved weights
    for name, layer in pruner.layers.items():  # weight, gradient and Adam's moments: nnz long, nothing dense
        dense_size = layer.in_features * layer.out_features
        state = [layer.values, layer.values.grad, *optimizer.state[layer.values].values()]
        assert all(t.numel() < dense_size for t in state if torch.is_tensor(t) and t.dim() > 0)
        assert isinstance(model.get_submodule(name), CompactLinear)


def test_regrown_weights_and_their_adam_moments_start_at_zero() -> None:
    torch.manual_seed(0)
    model = MLP()
    pruner = CompactSET(model, {"fc1": 0.1}, every=1, end=10, fraction=0.5, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    pruner.bind(optimizer)
    loss = model(torch.randn(8, 64)).square().mean()
    loss.backward()
    optimizer.step()
    layer = pruner.layers["fc1"]
    old = dict(zip((layer.rows.long() * 64 + layer.cols.long()).tolist(), layer.values.tolist(), strict=True))
    pruner.step(1)
    new_slots = [i for i, p in enumerate((layer.rows.long() * 64 + layer.cols.long()).tolist()) if p not in old]
    assert len(new_slots) == round(0.5 * layer.values.numel())
    assert bool((layer.values[new_slots] == 0).all())
    for moment in ("exp_avg", "exp_avg_sq"):
        assert bool((optimizer.state[layer.values][moment][new_slots] == 0).all())
    survivors = [i for i in range(layer.values.numel()) if i not in set(new_slots)]
    assert all(abs(layer.values[i].item()) >= max(abs(v) for p, v in old.items()
                                                  if p not in _positions(layer)) for i in survivors)


def test_layers_not_named_stay_as_they_were() -> None:
    model = MLP()
    CompactSET(model, {"fc1": 0.1})
    assert isinstance(model.fc1, CompactLinear) and type(model.fc2) is nn.Linear and type(model.out) is nn.Linear


def test_finetune_trains_a_compact_model_and_densify_keeps_its_function() -> None:
    torch.manual_seed(0)
    x = torch.randn(256, 64)
    y = (x[:, :4].argmax(dim=1))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    model = MLP()
    pruner = CompactSET(model, {"fc1": 0.3, "fc2": 0.3}, every=4, end=60, seed=0)
    history = finetune(model, loader, epochs=4, lr=1e-2, progress=False, pruner=pruner)
    assert history.loss[-1] < history.loss[0]
    with torch.no_grad():
        before = model(x)
        dense = densify(model)
        assert not any(isinstance(m, CompactLinear) for m in dense.modules())
        assert torch.allclose(dense(x), before, atol=1e-5)
    assert int(torch.count_nonzero(dense.fc1.weight)) == round(0.3 * 64 * 48)


@pytest.mark.parametrize(("kept", "message"), [
    ({"fc1": 0.0}, "must be in (0, 1]"),
    ({"fc1": 1.5}, "must be in (0, 1]"),
    ({"nope": 0.1}, "no such layer"),
    ({}, "at least one nn.Linear"),
])
def test_bad_plans_fail_in_one_line(kept: dict, message: str) -> None:
    model = MLP()
    with pytest.raises(RegrowthError) as error:
        CompactSET(model, kept)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert all(isinstance(m, nn.Linear) for m in (model.fc1, model.fc2, model.out))  # nothing replaced


def test_a_conv_layer_is_refused_with_the_alternative() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
    with pytest.raises(RegrowthError, match="nn.Linear layers only.*Conv2d.*SET"):
        CompactSET(model, {"0": 0.1})
    with pytest.raises(RegrowthError, match="fraction"):
        CompactSET(model, {"2": 0.1}, fraction=1.0)
