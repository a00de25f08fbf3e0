"""The planner prices what the compiler runs: for every conv and matmul of ResNet-50 and MobileNetV2
the cost model's implementation is the dispatch's, both read off the model as the same `Kernel`,
timed by one timer and decided by one `choose`."""

from __future__ import annotations

import hashlib

import pytest
import torch
import torchvision
from torch import nn

import sparsefx
from sparsefx.backends.tvm import pipeline
from sparsefx.backends.tvm.dispatch.table import DispatchTable
from sparsefx.backends.tvm.importer import to_relax
from sparsefx.backends.tvm.kernels.registry import own_kernel
from sparsefx.backends.tvm.measure.host import HostTimer
from sparsefx.cost.kernel import Kernel
from sparsefx.cost.latency import analyze_fusion, dense_kernels, priced_kernels
from sparsefx.cost.model import MEASURED, CostModel
from sparsefx.cost.timing import Times
from sparsefx.target import resolve_target

pytestmark = pytest.mark.usefixtures("private_cache")


class FakeTimer:
    """A deterministic timer offering the implementations the host timer would (PyTorch plain and
    prepacked, the own kernel where one runs the conv, TVM's default schedule where none does) at
    times that depend on the kernel and the implementation, so different kernels pick differently.
    Records which kernels each call asked about."""

    device = ""
    free_epilogues = HostTimer.free_epilogues

    def __init__(self) -> None:
        self.asked: list[set[str]] = []

    def time(self, kernels: list[Kernel], implementations=None, ahead=()) -> list[Times]:
        self.asked.append({k.bare.key for k in kernels})
        times = []
        for i, kernel in enumerate(kernels):
            own = own_kernel(kernel)
            offered = ["torch", "torch_prepacked", own[0] if own else "tir"]
            wanted = offered if implementations is None else [n for n in offered if n in implementations[i]]
            times.append({name: self.ms(kernel, name) for name in wanted})
        return times

    @staticmethod
    def ms(kernel: Kernel, name: str) -> float:
        spread = int.from_bytes(hashlib.sha1(f"{kernel.key}|{name}".encode()).digest()[:2], "little") / 65536
        return (kernel.flops + 1e6) / 1e9 * (0.5 + spread)

    def overheads(self) -> dict[str, float]:
        return {"torch": 0.004, "torch_prepacked": 0.004}

    def calibrate(self) -> dict[str, list[float]]:
        return {"elementwise": [0.002, 10.0], "reduce": [0.002, 10.0], "pool": [0.002, 10.0]}


def dispatch_choices(model: nn.Module, inputs: tuple, timer: object) -> dict[str, str]:
    """What the compiler's dispatch picks for each conv and matmul kernel of the model's Relax module."""
    target = resolve_target("cpu")
    mod, _ = to_relax(model, inputs)
    mod = pipeline.run(pipeline.optimize_passes(), mod, target.to_tvm())
    kernels = [k for k in pipeline.collect_kernels(mod) if k.op in MEASURED]
    decisions = DispatchTable("agreement").decide(kernels, timer)
    return {key: entry["choice"] for key, entry in decisions.items()}


def cost_model_choices(model: nn.Module, inputs: tuple, cost: CostModel) -> dict[str, str]:
    """What the cost model prices for each conv and matmul kernel the latency pass finds (with its epilogue)."""
    gm = sparsefx.trace(model, inputs)
    fusion = analyze_fusion(gm, dense_kernels(gm, cost.lanes), cost.fusion)
    shape = lambda n: n.meta.get("sfx_shape")  # noqa: E731
    kernels = [k for node in gm.graph.nodes for k in priced_kernels(node, gm, shape, cost.lanes, fusion)
               if k.op in MEASURED]
    assert any(k.bare != k for k in kernels)  # epilogues were read: the decision is made on the bare kernel
    return {k.bare.key: impl for k, impl in zip(kernels, cost.implementations(kernels), strict=True)}


@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v2"])
def test_cost_model_prices_the_implementation_the_dispatch_picks(name: str, tmp_path) -> None:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    inputs = (torch.randn(1, 3, 224, 224),)
    timer = FakeTimer()
    cost = CostModel("cpu", path=tmp_path / "table.json", timer=timer)
    planned = cost_model_choices(model, inputs, cost)
    asked_by_cost, timer.asked = set().union(*timer.asked), []
    compiled = dispatch_choices(model, inputs, timer)
    assert planned.keys() == compiled.keys()  # the same workloads, read off fx and off Relax
    assert planned == compiled
    assert len(set(compiled.values())) >= 3  # a discriminating check: PyTorch and own kernels both chosen
    assert set(compiled) <= asked_by_cost and set(compiled) <= set().union(*timer.asked)  # one timer for both


class SmallNet(nn.Module):
    """conv-BN-ReLU, a depthwise conv-BN-ReLU6, a 1x1 conv with a residual, a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.pw = nn.Sequential(nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        y = torch.relu(self.pw(self.dw(y)) + y)
        return self.fc(y.mean((2, 3)))


class Once(HostTimer):
    """The host timer measuring each (kernel, implementations) once: the dispatch and the cost model time
    separately, and a second timing of a near-tie could flip on a shared CPU's noise; here both see the
    same real measurement, so what is checked is that they read the same kernels and decide alike."""

    def __init__(self) -> None:
        super().__init__(resolve_target("cpu"))
        self.seen: dict[tuple, Times] = {}

    def time(self, kernels: list[Kernel], implementations=None, ahead=()) -> list[Times]:
        asks = [(k.key, tuple(sorted(implementations[i])) if implementations is not None else None)
                for i, k in enumerate(kernels)]
        missing = [i for i, ask in enumerate(asks) if ask not in self.seen]
        wanted = [implementations[i] for i in missing] if implementations is not None else None
        for i, t in zip(missing, super().time([kernels[i] for i in missing], wanted), strict=True):
            self.seen[asks[i]] = t
        return [dict(self.seen[ask]) for ask in asks]


def test_a_real_timer_gives_the_same_decisions_on_both_paths(tmp_path) -> None:
    torch.manual_seed(0)
    model, inputs = SmallNet().eval(), (torch.randn(1, 3, 32, 32),)
    timer = Once()
    cost = CostModel("cpu", path=tmp_path / "table.json", timer=timer)
    planned = cost_model_choices(model, inputs, cost)
    compiled = dispatch_choices(model, inputs, timer)
    assert planned == compiled and len(compiled) == 4
    assert all(ms > 0 for t in timer.seen.values() for ms in t.values())


class Attention(nn.Module):
    """Self-attention through PyTorch's SDPA with a boolean mask and a scale that float32 rounds."""

    def __init__(self, causal: bool = False) -> None:
        super().__init__()
        self.qkv, self.causal = nn.Linear(32, 96), causal
        self.register_buffer("mask", torch.arange(10)[None, :] <= torch.arange(10)[:, None] + 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).view(1, 10, 3, 4, 8).permute(2, 0, 3, 1, 4)
        mask = None if self.causal else self.mask
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal, scale=0.3)
        return out.transpose(1, 2).reshape(1, 10, 32)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_is_priced_as_the_fused_workload_the_dispatch_decides(causal: bool, tmp_path) -> None:
    model, inputs = Attention(causal).eval(), (torch.randn(1, 10, 32),)
    cost = CostModel("cpu", path=tmp_path / "table.json", timer=FakeTimer())
    gm = sparsefx.trace(model, inputs)
    fusion = analyze_fusion(gm, dense_kernels(gm, cost.lanes), cost.fusion)
    planned = {k.key for node in gm.graph.nodes
               for k in priced_kernels(node, gm, lambda n: n.meta.get("sfx_shape"), cost.lanes, fusion)
               if k.op == "attention"}
    mod, _ = to_relax(model, inputs)
    mod = pipeline.run(pipeline.optimize_passes(), mod, resolve_target("cpu").to_tvm())
    compiled = {k.key for k in pipeline.collect_kernels(mod) if k.op == "attention"}
    assert len(planned) == 1 and planned == compiled
    assert cost.latency(next(k for k in pipeline.collect_kernels(mod) if k.op == "attention")) > 0
