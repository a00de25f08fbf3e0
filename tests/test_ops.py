"""One op registry lookup for every concern: subclasses of known modules, alias sets, user registrations."""

from __future__ import annotations

import operator
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

import sparsefx
from sparsefx.capture import ops
from sparsefx.capture.compare import check_reference, first_tensor, output_error
from sparsefx.channels import rules
from sparsefx.channels.prune import analyze
from sparsefx.cost import latency
from sparsefx.errors import SparsefxError

from .test_exactness import zero_lowest_classes


class MyLinear(nn.Linear):
    """A user's subclass: torch.fx traces through it (F.linear), the attributes live on the module."""


class MyConv(nn.Conv2d):
    pass


class Net(nn.Module):
    """Leaf (NonDynamicallyQuantizableLinear) and traced-through (MyLinear, MyConv) subclasses."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = MyConv(3, 16, 3, 2, 1)
        self.norm = nn.BatchNorm2d(16)
        self.fc1 = NonDynamicallyQuantizableLinear(16, 32)
        self.fc2 = MyLinear(32, 24)
        self.head = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm(self.conv(x))).mean((2, 3))
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))


def _expected_macs(batch: int) -> int:
    return batch * (16 * 8 * 8 * 3 * 9 + 16 * 32 + 32 * 24 + 24 * 5)


@pytest.mark.parametrize("method", ["fx", "export"])
def test_subclasses_are_counted_coupled_and_sliced(method: str) -> None:
    torch.manual_seed(0)
    model, inputs = Net().eval(), (torch.randn(2, 3, 16, 16),)
    assert sparsefx.count_macs(model, inputs, method=method) == _expected_macs(2)
    analysis = analyze(model, inputs, method=method)
    producers = {s.layer for g in analysis.groups if g.prunable for s in g.producers()}
    assert {"conv", "fc1", "fc2"} <= producers, str(analysis)
    assert zero_lowest_classes(model, inputs, 0.5, method) > 0
    expected = check_reference(model, inputs)
    pruned = sparsefx.prune(model, inputs, ratio=0.5, method=method)
    with torch.no_grad():
        error = output_error(expected, first_tensor(pruned(*inputs)))
    assert error.ok(), error
    assert sparsefx.count_macs(pruned, inputs, method=method) < _expected_macs(2)
    for layer in pruned.modules():
        if isinstance(layer, nn.Linear):
            assert (layer.out_features, layer.in_features) == tuple(layer.weight.shape)
        if isinstance(layer, nn.Conv2d):
            assert (layer.out_channels, layer.in_channels) == tuple(layer.weight.shape[:2])
    if method == "fx":
        assert (pruned.fc1.out_features, pruned.fc2.in_features) == (16, 16)


def test_subclass_leaf_is_priced_like_its_base() -> None:
    gm = sparsefx.trace(Net().eval(), (torch.randn(2, 3, 16, 16),), method="fx")
    node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "fc1")
    kernels = latency.node_kernels(node, gm, lambda n: n.meta.get("sfx_shape"), lanes=16)
    assert [k.op for k in kernels] == ["matmul", "elementwise"]  # the matmul and its bias add


def test_alias_sets_name_one_op() -> None:
    assert ops.op_key(torch.add) is ops.op_key(operator.add) is ops.op_key("add_") is ops.op_key(
        torch.ops.aten.add.Tensor) is ops.ADD
    assert ops.op_key(torch.ops.aten.conv_transpose2d.input) is ops.op_key(F.conv_transpose1d) is ops.CONV_TRANSPOSE
    assert rules.RULES.for_target("view") is rules.RULES.for_target(torch.ops.aten._unsafe_view.default)
    assert ops.op_key(torch.ops.aten.alias.default) is torch.ops.aten.alias  # in no set: its own key


class ScaledLinear(nn.Module):
    """A user's layer sparsefx does not know: a linear map, then a fixed scale."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin) / cin ** 0.5)
        self.bias = nn.Parameter(torch.randn(cout) * 0.1)
        self.in_features, self.out_features = cin, cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) * 0.5


class ChannelScale(nn.Module):
    """A per-channel scale, registered with entries of its own."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.rand(channels) + 0.5)
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.view(1, -1, 1, 1)


class UserNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, 1, 1)
        self.gate = ChannelScale(16)
        self.fc = ScaledLinear(16, 32)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.gate(self.conv(x))).mean((2, 3))
        return self.head(F.relu(self.fc(x)))


@pytest.fixture
def scratch_registries(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Registrations made by a test vanish after it."""
    monkeypatch.setattr(ops, "LIKE", dict(ops.LIKE))
    monkeypatch.setattr(ops, "ALIAS_OF", dict(ops.ALIAS_OF))
    for registry in ops.CONCERNS.values():
        monkeypatch.setattr(registry, "entries", dict(registry.entries))
    yield


def _scale_rule(ctx: object, node: torch.fx.Node) -> object:
    return rules.norm(ctx, node, ctx.info(node.args[0]), [f"{node.target}.scale"], 1, node.target)


def _scale_attributes(module: ChannelScale) -> None:
    module.channels = module.scale.numel()


def test_user_registered_ops_reach_every_concern(scratch_registries: None) -> None:
    torch.manual_seed(0)
    model, inputs = UserNet().eval(), (torch.randn(2, 3, 8, 8),)
    priced: list[str] = []
    ops.register(ScaledLinear, like=nn.Linear)
    ops.register(ChannelScale, macs=lambda node, gm: 0, coupling=_scale_rule, attributes=_scale_attributes,
                 latency=lambda node, gm, shape_of, lanes: priced.append(node.target) or [])
    gm = sparsefx.trace(model, inputs, method="fx")
    leaves = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    assert {"gate", "fc"} <= set(leaves)  # registered classes stay one node
    assert leaves["fc"].meta["sfx_macs"] == 2 * 16 * 32
    assert sparsefx.count_macs(model, inputs, method="fx") == 2 * (16 * 64 * 27 + 16 * 32 + 32 * 5)
    latency.dense_kernels(gm, lanes=16)
    assert priced == ["gate"]
    analysis = analyze(model, inputs, method="fx")
    group = next(g for g in analysis.groups if any(s.layer == "conv" for s in g.producers()))
    assert {"gate", "fc"} <= set(group.layers) and group.prunable
    assert any(s.layer == "fc" for g in analysis.groups if g.prunable for s in g.producers())
    assert zero_lowest_classes(model, inputs, 0.5, "fx") > 0
    expected = check_reference(model, inputs)
    pruned = sparsefx.prune(model, inputs, ratio=0.5, method="fx")
    with torch.no_grad():
        error = output_error(expected, first_tensor(pruned(*inputs)))
    assert error.ok(), error
    assert pruned.gate.channels == pruned.gate.scale.numel() == 8
    assert (pruned.fc.out_features, pruned.fc.in_features) == tuple(pruned.fc.weight.shape) == (16, 8)


def test_register_refuses_bad_requests(scratch_registries: None) -> None:
    with pytest.raises(SparsefxError, match="no op registry named 'flops'"):
        ops.register(ScaledLinear, flops=lambda node, gm: 0)
    with pytest.raises(SparsefxError, match="pairs a module class with a function"):
        ops.register(ScaledLinear, like=F.linear)
