"""Weight masks: patterns and densities, masked training keeps zeros, bad arguments fail clearly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsefx
from sparsefx import MaskCallback, SparsefxError, Sparsity, apply_masks, block_mask, nm_mask, remove_masks
from sparsefx.sparse.masks import current_masks, unstructured_mask


@pytest.fixture
def weight() -> torch.Tensor:
    return torch.randn(8, 16, generator=torch.Generator().manual_seed(0))


def test_unstructured_keeps_the_largest(weight):
    mask = unstructured_mask(weight, 0.25)
    assert int(mask.sum()) == 32
    assert weight.abs()[mask].min() >= weight.abs()[~mask].max()


def test_block_mask_pattern_and_density(weight):
    mask = block_mask(weight, (2, 4), density=0.25)
    assert mask.shape == weight.shape and int(mask.sum()) == 0.25 * weight.numel()
    blocks = mask.reshape(4, 2, 4, 4).permute(0, 2, 1, 3).reshape(16, 8)
    assert all(row.all() or not row.any() for row in blocks)  # every 2x4 block is all kept or all pruned
    scores = weight.abs().reshape(4, 2, 4, 4).sum(dim=(1, 3)).flatten()
    kept = blocks.all(dim=1)
    assert scores[kept].min() >= scores[~kept].max()


def test_nm_mask_pattern(weight):
    mask = nm_mask(weight, 2, 4)
    assert (mask.reshape(8, 4, 4).sum(-1) == 2).all() and mask.float().mean() == 0.5
    groups, kept = weight.abs().reshape(8, 4, 4), mask.reshape(8, 4, 4)
    assert (groups.masked_fill(~kept, 0).amax(-1) >= groups.masked_fill(kept, 0).amax(-1)).all()


def test_conv_weight_is_viewed_as_output_rows():
    conv = torch.randn(4, 2, 3, 3)
    mask = nm_mask(conv, 1, 6)  # 18 inputs per output: three groups of 6
    assert (mask.reshape(4, 3, 6).sum(-1) == 1).all()
    assert block_mask(conv, (1, 9), 0.5).reshape(4, 2, 9).all(-1).sum() == 4


@pytest.mark.parametrize("call, message", [
    (lambda w: block_mask(w, (3, 4), 0.5), "does not divide"),
    (lambda w: block_mask(w, (1, 4), 0.0), "density must be in"),
    (lambda w: nm_mask(w, 4, 4), "1 <= N < M"),
    (lambda w: nm_mask(w, 2, 5), "M=5 does not divide"),
    (lambda w: unstructured_mask(w, 1.5), "density must be in"),
    (lambda w: Sparsity(0.1, "nm", m=4), "fewer than 1 of every 4"),
    (lambda w: Sparsity(0.5, "diagonal"), "unknown sparsity pattern"),
    (lambda w: block_mask(w[0], (1, 4), 0.5), "2 or more dimensions"),
])
def test_bad_arguments_fail_in_one_line(weight, call, message):
    with pytest.raises(SparsefxError, match=message) as info:
        call(weight)
    assert "\n" not in str(info.value)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def test_masks_survive_training_and_removal():
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)  # made before masking
    masks = sparsefx.compute_masks(model, {"0": Sparsity(0.25, "block", (1, 4)), "2": Sparsity(0.5, "nm", m=4)})
    apply_masks(model, masks)
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    for _ in range(5):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    for name, mask in masks.items():
        assert (model.get_submodule(name).weight[~mask] == 0).all()
        assert (model.get_submodule(name).weight[mask] != 0).all()
    assert current_masks(model).keys() == masks.keys()
    remove_masks(model)
    assert sorted(n for n, _ in model.named_parameters()) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert (model[0].weight[~masks["0"]] == 0).all() and sparsefx.weight_density(model) == pytest.approx(
        (0.25 * 512 + 0.5 * 128) / 640)


def test_updating_masks_keeps_one_parametrization():
    model = _mlp()
    apply_masks(model, sparsefx.compute_masks(model, {"0": Sparsity(0.5)}))
    apply_masks(model, sparsefx.compute_masks(model, {"0": Sparsity(0.25)}))
    assert len(model[0].parametrizations.weight) == 1
    assert int((model[0].weight != 0).sum()) == 128


def test_mask_callback_in_a_plain_loop():
    model = _mlp()
    masks = sparsefx.compute_masks(model, {"0": Sparsity(0.1)})
    callback = MaskCallback(model, masks)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(8, 16)).sum().backward()
        optimizer.step()
        callback.on_step()
    assert (model[0].weight[~masks["0"]] == 0).all() and isinstance(model[0].weight, nn.Parameter)


@pytest.mark.parametrize("call, message", [
    (lambda m: apply_masks(m, {"5": torch.ones(4, 32)}), "no layer named '5'"),
    (lambda m: apply_masks(m, {"1": torch.ones(1)}), "masks apply to Linear and Conv"),
    (lambda m: apply_masks(m, {"0": torch.ones(4, 4)}), "has shape"),
])
def test_bad_mask_targets(call, message):
    with pytest.raises(SparsefxError, match=message):
        call(_mlp())


def _lenet300() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


def _kept(model: nn.Module, masks: dict[str, torch.Tensor]) -> float:
    return sum(int(m.sum()) for m in masks.values()) / sum(model.get_submodule(n).weight.numel() for n in masks)


@pytest.mark.parametrize("pattern", ["unstructured", "block"])
@pytest.mark.parametrize("rule, power", [("uniform", 1.0), ("erk", 1.0), ("erk", 1.5)])
def test_allocate_keeps_the_total_and_each_layer_its_share(pattern, rule, power):
    model = _lenet300()
    plan = sparsefx.sparse.masks.allocate(model, 0.02, pattern, rule=rule, power=power)
    masks = sparsefx.compute_masks(model, plan)
    assert _kept(model, masks) == pytest.approx(0.02, abs=2e-4)
    for name, mask in masks.items():  # every layer holds the fraction it was allocated
        assert mask.float().mean().item() == pytest.approx(plan[name].density, abs=2e-3)
    densities = [plan[n].density for n in ("0", "2", "4")]
    if rule == "uniform":
        assert densities == pytest.approx([0.02] * 3)
    else:  # the smaller the layer, the denser; the 10-way output layer at power 1.5 is kept whole
        assert densities[0] < densities[1] < densities[2] <= 1
        assert (densities[2] == 1.0) == (power == 1.5)


@pytest.mark.parametrize("pattern", ["unstructured", "block"])
def test_allocate_marks_a_layer_that_keeps_every_unit_dense(pattern):
    """A share just under 1 that rounds to every weight (or block) is a dense layer: a masked layer
    that keeps everything has nothing to regrow into (LeNet-300-100 at 10% under ERK: the 10-way
    output layer's share rounds to all 1000 weights)."""
    model = _lenet300()
    for density in (0.05, 0.08, 0.1, 0.12, 0.15):
        for name, s in sparsefx.sparse.masks.allocate(model, density, pattern).items():
            units = model.get_submodule(name).weight.numel() // (4 if pattern == "block" else 1)
            assert s.density == 1.0 or round(s.density * units) < units, (density, name, s)


def test_allocate_nm_fits_each_layer_and_stays_within_the_budget():
    model = _lenet300()
    plan = sparsefx.sparse.masks.allocate(model, 0.02, "nm", max_m=128)
    masks = sparsefx.compute_masks(model, plan)
    assert 0.018 <= _kept(model, masks) <= 0.02
    for name, s in plan.items():
        cols = model.get_submodule(name).weight.shape[1]
        if s.density < 1:
            assert s.pattern == "nm" and cols % s.m == 0 and s.m <= 128
            n = round(s.density * s.m)  # exactly n of every m kept in every group
            assert (masks[name].reshape(-1, s.m).sum(-1) == n).all()


@pytest.mark.parametrize("call, message", [
    (lambda m: sparsefx.sparse.masks.allocate(m, 0.1, rule="random"), "unknown allocation rule"),
    (lambda m: sparsefx.sparse.masks.allocate(m, 0.1, "diagonal"), "unknown sparsity pattern"),
    (lambda m: sparsefx.sparse.masks.allocate(m, 0.1, power=0), "power must be"),
    (lambda m: sparsefx.sparse.masks.allocate(m, 0.1, "nm", max_m=3), "no M in 2..3 divides"),
])
def test_allocate_bad_arguments(call, message):
    with pytest.raises(SparsefxError, match=message):
        call(nn.Sequential(nn.Linear(5, 5)))


def test_allocate_fixed_layers_count_toward_the_total():
    model = _lenet300()
    plan = sparsefx.sparse.masks.allocate(model, 0.02, "block", power=1.5, fixed={"4": 0.4})
    assert plan["4"].density == pytest.approx(0.4) and plan["0"].density < plan["2"].density < 0.4
    assert _kept(model, sparsefx.compute_masks(model, plan)) == pytest.approx(0.02, abs=2e-4)
    with pytest.raises(SparsefxError, match="fixed names 'fc9'"):
        sparsefx.sparse.masks.allocate(model, 0.02, fixed={"fc9": 1.0})
