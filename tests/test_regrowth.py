"""Sparse training whose mask moves (SET, RigL), dense-sparse-dense and lottery tickets, on tiny models."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import sparsefx
from sparsefx import DSD, SET, GraNet, LotteryTicket, RegrowthError, RigL, Sparsity, finetune, to_sparse
from sparsefx.recovery.data import batches
from sparsefx.recovery.regrowth import drop_and_grow, parameters_by_name, unit_counts
from sparsefx.sparse.masks import current_masks, nm_mask

PATTERNS = [Sparsity(0.25), Sparsity(0.25, "block", block=(2, 4)), Sparsity(0.25, "nm", m=4),
            Sparsity(0.5, "nm", m=8)]


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def _loader(n: int = 256, seed: int = 0):  # noqa: ANN202
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 64, generator=g)
    teacher = torch.randn(64, 8, generator=torch.Generator().manual_seed(99))
    return batches(TensorDataset(x, (x @ teacher).argmax(1)), 16, shuffle=True)


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    return MLP()


def _check(model: nn.Module, plan: dict[str, Sparsity]) -> dict[str, torch.Tensor]:
    """Every layer keeps exactly its planned number of weights, N:M layers N in every group."""
    masks = current_masks(model)
    for name, sparsity in plan.items():
        mask = masks[name]
        kept, _ = unit_counts(mask.shape, sparsity)
        size = 1 if sparsity.pattern != "block" else sparsity.block[0] * sparsity.block[1]
        assert int(mask.sum()) == kept * size, name
        if sparsity.pattern == "nm":
            groups = mask.reshape(mask.shape[0], -1, sparsity.m).sum(dim=2)
            assert bool((groups == round(sparsity.density * sparsity.m)).all()), name
    return masks


class Watch:
    """A pruner that checks the masks after every step of the pruner it wraps."""

    def __init__(self, inner: SET | RigL) -> None:
        self.inner, self.changed, self.seen = inner, False, []

    def step(self, t: int) -> nn.Module:
        model = self.inner.step(t)
        self.seen.append(_check(model, self.inner.plan))
        return model


@pytest.mark.parametrize("method", [SET, RigL])
@pytest.mark.parametrize("sparsity", PATTERNS, ids=lambda s: f"{s.pattern}-{s.density}-m{s.m}")
def test_regrowth_keeps_the_kept_fraction_and_moves_the_mask(model, method, sparsity):
    pruner = method(model, sparsity, every=4, end=40, fraction=0.4)
    watch = Watch(pruner)
    finetune(model, _loader(), epochs=3, lr=1e-2, pruner=watch, progress=False)  # 48 steps: 9 updates
    assert pruner.updates == 9
    changes = [sum(int((a[n] != b[n]).sum()) for n in a) for a, b in zip(watch.seen, watch.seen[1:])]
    assert sum(c > 0 for c in changes) == 9  # every update moved the mask, nothing else did
    assert torch.count_nonzero(model(torch.randn(4, 64))) > 0


class WatchGraNet:
    """Checks a GraNet's masks after every step against the density its schedule asks for then."""

    def __init__(self, inner: GraNet) -> None:
        self.inner, self.changed, self.kept, self.seen = inner, False, [], []

    def step(self, t: int) -> nn.Module:
        model = self.inner.step(t)
        self.seen.append(_check(model, self.inner.now))
        self.kept.append(sum(int(m.sum()) for m in self.seen[-1].values()))
        return model


@pytest.mark.parametrize("sparsity", PATTERNS, ids=lambda s: f"{s.pattern}-{s.density}-m{s.m}")
def test_granet_prunes_gradually_to_the_plan_and_regrows(model, sparsity):
    pruner = GraNet(model, sparsity, every=4, end=40, fraction=0.3, prune_end=24)
    watch = WatchGraNet(pruner)
    assert all(int(m.sum()) == m.numel() for m in current_masks(model).values())  # starts from the dense model
    finetune(model, _loader(), epochs=3, lr=1e-2, pruner=watch, progress=False)  # 48 steps, updates every 4
    assert watch.kept == sorted(watch.kept, reverse=True)  # the kept count only falls
    assert len(set(watch.kept[:25])) > 3 and len(set(watch.kept[24:])) == 1  # gradually, then at the plan
    assert pruner.now == {name: sparsity for name in pruner.plan}
    _check(model, pruner.plan)
    late = watch.seen[24:]  # pruning has ended: regrowth still moves the mask at the same count
    assert any(any(bool((a[n] != b[n]).any()) for n in a) for a, b in zip(late, late[1:]))


def test_regrowth_on_conv_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 8))
    plan = {"0": Sparsity(1 / 3, "nm", m=3), "2": Sparsity(0.25, "block", block=(2, 4)), "4": Sparsity(0.2)}
    watch = Watch(RigL(model, plan, every=4, end=40))
    loader = _loader()
    images = batches(TensorDataset(loader.dataset.tensors[0].reshape(-1, 1, 8, 8), loader.dataset.tensors[1]), 16)
    finetune(model, images, epochs=1, lr=1e-2, pruner=watch, progress=False)
    assert watch.inner.updates == 3 and all(not torch.equal(watch.seen[0][n], watch.seen[-1][n]) for n in plan)


def test_drop_and_grow_drops_the_weakest_and_grows_the_highest_score():
    weight = torch.arange(1.0, 17.0).reshape(2, 8)  # magnitude rises along each row
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[:, 4:] = True  # keeps 5..8 and 13..16
    score = torch.zeros(2, 8)
    score[0, 1], score[1, 3] = 5.0, 7.0
    new = drop_and_grow(weight, mask, Sparsity(0.5), 0.25, score)  # 2 of 8 kept dropped: 5 and 6
    assert new.sum() == 8
    assert not new[0, 4] and not new[0, 5] and new[0, 1] and new[1, 3]


def test_nm_swaps_stay_inside_groups():
    torch.manual_seed(1)
    weight = torch.randn(8, 16)
    mask = nm_mask(weight, 2, 4)
    new = drop_and_grow(weight, mask, Sparsity(0.5, "nm", m=4), 0.25, torch.rand(8, 16))  # 16 of 32 groups swap
    assert bool((new.reshape(8, 4, 4).sum(dim=2) == 2).all()) and int((new != mask).sum()) == 2 * 16


def test_rigl_regrows_where_the_dense_gradient_is_large(model):
    pruner = RigL(model, Sparsity(0.25), every=2, end=100, fraction=0.3)
    x, y = torch.randn(16, 64), torch.randint(0, 8, (16,))
    pruner.step(1)  # the next step is an update: the hook keeps this backward's dense gradient
    nn.functional.cross_entropy(model(x), y).backward()
    before, grads = current_masks(model), {n: c.grad.abs() for n, c in pruner.catchers.items()}
    pruner.step(2)
    after = current_masks(model)
    for name in pruner.plan:
        grown = after[name] & ~before[name]
        pruned = ~after[name] & ~before[name]
        assert grown.any() and grads[name][grown].min() >= grads[name][pruned].max()
        assert bool((pruner.model.get_submodule(name).weight[grown] == 0).all())  # regrown at zero


def test_rigl_anneals_the_drop_fraction(model):
    pruner = RigL(model, Sparsity(0.25), every=10, end=100, fraction=0.3)
    assert pruner.drop_fraction(0) == pytest.approx(0.3) and pruner.drop_fraction(50) == pytest.approx(0.15)
    assert pruner.drop_fraction(99) < 0.001


def test_dsd_ends_dense_and_trains_the_pruned_weights(model):
    plan = {"fc1": Sparsity(0.2), "fc2": Sparsity(0.5)}
    seen = {}

    class Spy(DSD):
        def step(self, t: int) -> nn.Module:
            out = super().step(t)
            seen[t] = float((self.model.fc1.weight != 0).float().mean())
            return out

    pruner = Spy(model, plan, sparse_at=10, dense_at=30)
    finetune(model, _loader(), epochs=3, lr=1e-2, pruner=pruner, progress=False)
    assert seen[5] == 1.0 and seen[20] == pytest.approx(0.2, abs=1e-3) == seen[30]
    assert current_masks(model) == {} and float((model.fc1.weight != 0).float().mean()) == 1.0


def test_lottery_ticket_rewinds_the_surviving_weights(model):
    plan = {"fc1": Sparsity(0.1), "fc2": Sparsity(0.25, "block", block=(2, 4))}
    ticket = LotteryTicket(model, plan, rounds=2, rewind_at=3)
    early = {}

    class Spy:
        changed = False

        def step(self, t: int) -> nn.Module:
            if t == 3:
                early.update({n: p.detach().clone() for n, p in parameters_by_name(model).items()})
            return ticket.step(t)

    finetune(model, _loader(), epochs=1, lr=1e-2, pruner=Spy(), progress=False)
    trained = model.fc1.weight.detach().clone()
    assert ticket.next_round()
    first = current_masks(model)
    assert int(first["fc1"].sum()) == round(0.1 ** 0.5 * 64 * 32)
    kept = first["fc1"]
    assert torch.equal(model.fc1.weight[kept], early["fc1.weight"][kept])  # rewound, not the trained values
    assert not torch.equal(trained[kept], early["fc1.weight"][kept]) and torch.equal(model.fc1.bias, early["fc1.bias"])
    finetune(model, _loader(), epochs=1, lr=1e-2, pruner=ticket, progress=False)
    assert ticket.next_round() and not ticket.next_round()
    final = current_masks(model)
    assert int(final["fc1"].sum()) == round(0.1 * 64 * 32) and bool((final["fc1"] <= first["fc1"]).all())
    assert int(final["fc2"].sum()) == round(0.25 * 32) * 8
    assert torch.equal(model.fc2.weight[final["fc2"]], early["fc2.weight"][final["fc2"]])


def test_a_lottery_ticket_needs_a_rewind_point(model):
    with pytest.raises(RegrowthError, match="no weights recorded"):
        LotteryTicket(model, 0.1).next_round()


def test_to_sparse_after_regrowth_keeps_the_pattern(model):
    plan = {"fc1": Sparsity(0.25, "block", block=(4, 4)), "fc2": Sparsity(0.5, "nm", m=4)}
    finetune(model, _loader(), epochs=1, lr=1e-2, pruner=SET(model, plan, every=4, end=100), progress=False)
    sparse = to_sparse(model)
    assert sparse.fc1.format == "bsr" and sparse.fc1.weight_format.block == (4, 4) and sparse.fc2.format == "nm"
    x = torch.randn(5, 64)
    assert torch.allclose(sparse(x), model(x), atol=1e-5) and model(x).abs().max() > 0.1


def test_compiled_regrown_model_runs_sparse_kernels(model):
    """The path from a moving mask to speed: to_sparse, then sparsefx.compile lowers each masked
    layer to a sparse TIR kernel (a 'sparse_bsr…' / 'sparse_nm…' call), not a dense matmul."""
    plan = {"fc1": Sparsity(0.1, "block", block=(1, 4)), "fc2": Sparsity(0.25, "nm", m=4)}
    finetune(model, _loader(), epochs=1, lr=1e-2, pruner=RigL(model, plan, every=4, end=16), progress=False)
    x = torch.randn(16, 64)
    compiled = sparsefx.compile(to_sparse(model), (x,), verbose=False)
    kernels = sorted(row["name"].split("_")[1] for row in compiled.profile(x, repeat=1) if row["kind"] == "sparse")
    assert kernels == ["bsr1x4", "nm1x4"]
    assert torch.allclose(compiled(x), model(x), atol=1e-4) and model(x).abs().max() > 0.1


@pytest.mark.parametrize(("call", "message"), [
    (lambda m: SET(m, {"fc1": Sparsity(0.2), "fc2": Sparsity(1.0)}), "nowhere to regrow"),
    (lambda m: RigL(m, {"fc2": Sparsity(1 / 256)}, fraction=0.3), "drops none"),
    (lambda m: SET(m, 0.0), r"kept fraction must be in \(0, 1\]"),
    (lambda m: RigL(m, 1.5), r"kept fraction must be in \(0, 1\]"),
    (lambda m: LotteryTicket(m, {"fc1": -0.1}), r"kept fraction must be in \(0, 1\]"),
    (lambda m: DSD(m, 2.0, sparse_at=1, dense_at=5), r"kept fraction must be in \(0, 1\]"),
    (lambda m: SET(m, 0.2, fraction=1.0), "drop fraction"),
    (lambda m: GraNet(m, 0.2, end=100, prune_end=200), r"prune_end must be a step in \(0, end=100\]"),
    (lambda m: GraNet(m, 0.2, initial=0.0), r"initial kept fraction must be in \(0, 1\]"),
    (lambda m: SET(m, {}), "names no layer"),
    (lambda m: DSD(m, 0.2, sparse_at=5, dense_at=5), "sparse_at < dense_at"),
    (lambda m: drop_and_grow(m.fc1.weight, torch.ones(32, 64, dtype=torch.bool), Sparsity(0.5, "nm", m=4), 0.3,
                             torch.rand(32, 64)), "must start from a 2:4 mask"),
    (lambda m: drop_and_grow(m.fc1.weight, torch.rand(32, 64) > 0.5, Sparsity(0.5, "block", block=(2, 2)), 0.3,
                             torch.rand(32, 64)), "whole 2x2 blocks"),
])
def test_bad_input_is_one_line_error(model, call, message):
    with pytest.raises(RegrowthError, match=message) as info:
        call(model)
    assert "\n" not in str(info.value)
