"""Sparse formats and the sparsify / to_sparse rewrite pass (PyTorch side, no TVM)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from sparsefx import SparsefxError
from sparsefx.sparse.formats import BSR, NM, detect, from_dense
from sparsefx.sparse.layers import SparseConv2d, SparseLinear
from sparsefx.sparse.masks import Sparsity, apply_masks, compute_masks, current_masks
from sparsefx.sparse.sparsify import sparsify, to_sparse

BLOCKS = [(1, 4), (1, 16), (4, 4), (16, 1), (32, 1), (2, 8)]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 1, stride=2), nn.Flatten(),
                         nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 16)).eval()


SPECS = {"0": Sparsity(0.5, "nm", m=4), "2": Sparsity(0.25, "block", block=(4, 4)),
         "4": Sparsity(0.1, "block", block=(16, 1)), "6": Sparsity(0.3)}


@pytest.mark.parametrize("block", BLOCKS)
def test_bsr_round_trip(block: tuple[int, int]) -> None:
    weight = torch.randn(64, 8, 2, 2)
    mask = Sparsity(0.3, "block", block=block).mask(weight)
    bsr = BSR.from_dense(weight, block, mask)
    assert bsr.block == block and bsr.density == pytest.approx(0.3, abs=0.02)
    assert torch.equal(bsr.to_dense(), (weight * mask).reshape(64, -1))
    assert detect(mask).pattern == "block"


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8)])
def test_nm_round_trip(n: int, m: int) -> None:
    weight = torch.randn(32, 64)
    mask = Sparsity(n / m, "nm", m=m).mask(weight)
    nm = NM.from_dense(weight, n, m, mask)
    assert nm.values.shape == (32, 64 * n // m) and nm.indices.dtype == torch.int8
    assert torch.equal(nm.to_dense(), weight * mask)
    assert detect(mask) == Sparsity(n / m, "nm", m=m)


def test_bad_input_is_one_line_error() -> None:
    weight = torch.randn(30, 64)
    cases = [lambda: BSR.from_dense(weight, (4, 4)), lambda: NM.from_dense(weight, 4, 4),
             lambda: from_dense(weight, Sparsity(1.0, "nm", m=4)), lambda: Sparsity(1.5, "block"),
             lambda: Sparsity(0.0), lambda: NM.from_dense(weight, 2, 4, torch.ones_like(weight)),
             lambda: sparsify(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), {"0": Sparsity(0.5)}),
             lambda: sparsify(nn.Sequential(nn.Linear(4, 4)), {"1": Sparsity(0.5)})]
    for case in cases:
        with pytest.raises(SparsefxError) as info:
            case()
        assert "\n" not in str(info.value)


def test_sparsify_matches_masked_model_and_leaves_input() -> None:
    model, x = _model(), torch.randn(2, 8, 8, 8)
    before = copy.deepcopy(model.state_dict())
    sparse = sparsify(model, SPECS)
    masked = copy.deepcopy(model)
    apply_masks(masked, compute_masks(masked, SPECS))
    assert isinstance(sparse[0], SparseConv2d) and isinstance(sparse[6], SparseLinear)
    torch.testing.assert_close(sparse(x), masked(x), rtol=1e-4, atol=1e-5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_to_sparse_after_masked_training_keeps_pattern() -> None:
    model, x = _model(), torch.randn(4, 8, 8, 8)
    apply_masks(model, compute_masks(model, SPECS))
    masks = {k: v.clone() for k, v in current_masks(model).items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    sparse = to_sparse(model)
    for name, spec in SPECS.items():
        layer = sparse.get_submodule(name)
        assert layer.sparsity.pattern == spec.pattern
        assert not (layer.dense_weight().ne(0) & ~masks[name].reshape(layer.rows, -1)).any()
    torch.testing.assert_close(sparse(x), model(x), rtol=1e-4, atol=1e-5)


def test_save_load_and_fx_trace() -> None:
    sparse, x = sparsify(_model(), SPECS), torch.randn(1, 8, 8, 8)
    buffer = io.BytesIO()
    torch.save(sparse, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded(x), sparse(x))
    traced = torch.fx.symbolic_trace(sparse)
    assert any("bsr_linear" in str(n.target) for n in traced.graph.nodes)
    torch.testing.assert_close(traced(x), sparse(x))
