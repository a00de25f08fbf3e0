"""prune(): options, the returned module's life (forward, training, save/load), the input's safety."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torchvision

import sparsefx

from .models_zoo import CASES


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def resnet() -> tuple[torch.nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval(), (torch.randn(1, 3, 64, 64),)


def test_input_model_is_not_mutated(resnet):
    model, inputs = resnet
    before = _state(model)
    pruned = sparsefx.prune(model, inputs, ratio=0.5)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert pruned is not model and sparsefx.count_params(pruned) < sparsefx.count_params(model)


def test_macs_and_params_fall_and_shape_holds(resnet):
    model, inputs = resnet
    pruned = sparsefx.prune(model, inputs, ratio=0.5)
    assert pruned(*inputs).shape == model(*inputs).shape
    assert sparsefx.count_macs(pruned, inputs) < 0.4 * sparsefx.count_macs(model, inputs)
    assert isinstance(pruned, torchvision.models.ResNet)  # the user's own class when its forward still holds


def test_pruned_model_trains(resnet):
    model, inputs = resnet
    pruned = sparsefx.prune(model, inputs, ratio=0.3).train()
    optimizer = torch.optim.SGD(pruned.parameters(), lr=0.1)
    x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(pruned(x), y)
        loss.backward()
        assert all(p.grad is not None for p in pruned.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("case", ["residual", "attention"])
def test_save_load_round_trip(case, tmp_path):
    build, make_inputs = CASES[case]
    model, inputs = build().eval(), make_inputs()
    pruned = sparsefx.prune(model, inputs, ratio=0.5).eval()
    path = tmp_path / "pruned.pt"
    torch.save(pruned, path)
    loaded = torch.load(path, weights_only=False).eval()
    torch.testing.assert_close(loaded(*inputs), pruned(*inputs))
    # the state_dict route: load into the pruned architecture
    clone = copy.deepcopy(pruned)
    clone.load_state_dict(pruned.state_dict())
    torch.testing.assert_close(clone(*inputs), pruned(*inputs))


def test_pruned_graph_serves_other_batch_sizes():
    build, make_inputs = CASES["attention"]
    pruned = sparsefx.prune(build().eval(), make_inputs(), ratio=0.5)
    assert pruned(torch.randn(5, 9, 8)).shape == (5, 3)


def test_per_module_ratio(resnet):
    model, inputs = resnet
    pruned = sparsefx.prune(model, inputs, ratio={"layer4": 0.75})
    assert pruned.layer4[0].conv1.out_channels == 128
    assert pruned.layer3[0].conv1.out_channels == 256 and pruned.conv1.out_channels == 64


def test_round_to_keeps_multiples(resnet):
    model, inputs = resnet
    pruned = sparsefx.prune(model, inputs, ratio=0.33, round_to=8)
    convs = [m for m in pruned.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(m.out_channels % 8 == 0 for m in convs)
    assert any(m.out_channels != o.out_channels for m, o in zip(convs, [
        m for m in model.modules() if isinstance(m, torch.nn.Conv2d)], strict=True))


def test_ignore_keeps_output_channels(resnet):
    model, inputs = resnet
    pruned = sparsefx.prune(model, inputs, ratio=0.5, ignore=["layer1"])
    assert pruned.layer1[0].conv1.out_channels == 64 and pruned.layer2[0].conv1.out_channels == 64


def _independent_channels(model: torchvision.models.ResNet) -> int:
    """ResNet-18's prunable channels counted from its modules, one conv per coupled set: the stem (whose
    width every layer1 block adds to), each stage's downsample (its residual stream) and each block's conv1."""
    convs = [model.conv1] + [getattr(model, f"layer{i}")[0].downsample[0] for i in (2, 3, 4)]
    convs += [block.conv1 for i in (1, 2, 3, 4) for block in getattr(model, f"layer{i}")]
    return sum(conv.out_channels for conv in convs)


def test_global_ranking_hits_the_ratio_overall(resnet):
    model, inputs = resnet
    pruned = sparsefx.prune(model, inputs, ratio=0.5, global_ranking=True)
    dense_count, pruned_count = _independent_channels(model), _independent_channels(pruned)
    assert dense_count == 64 + 128 + 256 + 512 + 2 * (64 + 128 + 256 + 512)
    assert pruned_count == pytest.approx(0.5 * dense_count, rel=0.02)  # the ratio over all groups together
    widths = [m.out_channels for m in pruned.modules() if isinstance(m, torch.nn.Conv2d)]
    dense = [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(set(w / d for w, d in zip(widths, dense, strict=True))) > 2  # not the same ratio everywhere


def _disagreeing() -> tuple[torch.nn.Module, tuple[torch.Tensor]]:
    """Four channels the importance methods rank differently (conv row, BN gamma; keep 2):
    c0 [1, 1, 1], 0.1: L1 3.1, L2 3.01;   c1 [2.5, 0, 0], 0.1: L1 2.6, L2 6.26;
    c2 [.1, .1, .1], 5: L1 5.3, L2 25.03, but the next conv ignores it (zero Taylor score);
    c3 [.5, .5, .5], 0.2: L1 1.7, L2 0.79."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1, bias=False), torch.nn.BatchNorm2d(4),
                                torch.nn.Conv2d(4, 2, 1)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 1, 1], [2.5, 0, 0], [0.1, 0.1, 0.1], [0.5, 0.5, 0.5]]).view(4, 3, 1, 1))
        model[1].weight.copy_(torch.tensor([0.1, 0.1, 5.0, 0.2]))
        model[1].bias.zero_()
        model[2].weight[:, 2] = 0.0
    return model, (torch.randn(2, 3, 8, 8),)


def _kept(pruned: torch.nn.Module) -> set[int]:
    first_column = [1.0, 2.5, 0.1, 0.5]  # tells the four channels apart
    return {first_column.index(round(float(w), 4)) for w in pruned[0].weight[:, 0].detach().flatten()}


@pytest.mark.parametrize(("importance", "kept"), [("l1", {0, 2}), ("l2", {1, 2}), ("bn_scale", {2, 3})])
def test_importance_methods_pick_their_own_channels(importance, kept):
    model, inputs = _disagreeing()
    assert _kept(sparsefx.prune(model, inputs, ratio=0.5, importance=importance)) == kept


def test_taylor_drops_the_channel_the_output_ignores():
    model, inputs = _disagreeing()
    kept = _kept(sparsefx.prune(model, inputs, ratio=0.5, importance="taylor"))
    assert len(kept) == 2 and 2 not in kept  # the largest by every weight norm, but it moves no output


def test_random_importance_follows_its_seed():
    model, inputs = _disagreeing()
    chosen = {frozenset(_kept(sparsefx.prune(model, inputs, ratio=0.5, importance="random", seed=seed)))
              for seed in range(6)}
    assert len(chosen) > 1 and all(len(k) == 2 for k in chosen)


def test_custom_importance_callable(resnet):
    model, inputs = resnet

    def keep_first(gm, coupling, groups, **_):  # prefer removing the last channels
        return {g.id: -np.arange(len(g.classes), dtype=float) for g in groups}

    pruned = sparsefx.prune(model, inputs, ratio=0.5, importance=keep_first)
    torch.testing.assert_close(pruned.layer1[0].conv1.weight, model.layer1[0].conv1.weight[:32, :32])


def test_trace_annotates_nodes(resnet):
    model, inputs = resnet
    gm = sparsefx.trace(model, inputs)
    conv = next(n for n in gm.graph.nodes if n.target == "conv1")
    assert conv.meta["sfx_shape"] == (1, 64, 32, 32)
    assert conv.meta["sfx_macs"] == 64 * 32 * 32 * 3 * 7 * 7
    assert conv.meta["sfx_params"] == 64 * 3 * 7 * 7
    assert conv.meta["sfx_bytes"] == 4 * (3 * 64 * 64 + 64 * 3 * 49 + 64 * 32 * 32)
    assert conv.meta["sfx_dtype"] == torch.float32
