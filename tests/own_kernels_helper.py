"""Shared by the own-kernel tests: a model through the optimize and dispatch passes with chosen decisions."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
import tvm
from torch import nn

from sparsefx.backends.tvm import pipeline
from sparsefx.backends.tvm.importer import to_relax
from sparsefx.backends.tvm.kernels import registry as own_kernels
from sparsefx.backends.tvm.pipeline import build_module
from sparsefx.target import resolve_target

ACT = {"none": lambda t: t, "relu": F.relu, "relu6": lambda t: t.clamp(0, 6), "silu": F.silu}


def assert_kernels_match_torch(kind: str, specs: list, groups: Callable[[object], int] = lambda s: 1) -> None:
    """Each own kernel of `specs` (one build) equals PyTorch's conv with the spec's stride, padding,
    bias, input scale, residual and activation, on random arguments of its `arg_shapes`."""
    library = own_kernels.build(kind, specs, resolve_target("cpu").to_tvm())
    torch.manual_seed(0)
    module = own_kernels.KERNELS[kind]
    for s in specs:
        args = [torch.randn(shape) for shape in s.arg_shapes[:-1]]
        if own_kernels.repacked(s):  # the reference takes PyTorch's layout, the kernel its own
            args[1] = torch.randn(s.weight_shape)
        if s.activation == "silu":
            args[0] *= 20  # reach exp's clamp: no inf or nan from a large |x|
        x, w, b, *rest = args
        if getattr(s, "scaled", False):
            x = x * rest.pop(0)
        want = F.conv2d(x, w, b, getattr(s, "stride", 1), getattr(s, "padding", 0), 1, groups(s))
        want = ACT[s.activation](want + rest[0] if getattr(s, "residual", False) else want)
        out = tvm.runtime.empty(s.out_shape, "float32")
        given = [t.numpy() for t in args]
        if own_kernels.repacked(s):
            given[1] = module.pack_weight(s, given[1])
        library[s.name](*[tvm.runtime.tensor(a) for a in given], out)
        scale = max(1.0, float(want.abs().max()))  # large sums cancel: absolute error grows with the values
        np.testing.assert_allclose(out.numpy(), want.numpy(), rtol=1e-5, atol=1e-5 * scale, err_msg=s.name)


def with_random_bn_stats(model: nn.Module) -> nn.Module:
    """`model` in eval mode with non-trivial BN statistics, so the folded bias and scale matter."""
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
    return model.eval()


def dispatched_module(model: nn.Module, inputs: tuple[torch.Tensor], impl: Callable[[object], str],
                      precision: str = "fp32", prepack: bool = False) -> tvm.IRModule:
    """The model's Relax module after the optimize and dispatch passes (in `precision`), each workload
    decided `impl(workload)`, PyTorch's with its weight prepacked where `prepack` (no timing)."""
    target = resolve_target("cpu")
    mod, _ = to_relax(model, inputs)
    mod = pipeline.run(pipeline.optimize_passes(), mod, target.to_tvm())
    decisions = {k.key: {"impl": impl(k), **({"prepack": True} if prepack else {})} for k in pipeline.collect_kernels(mod)}
    return pipeline.run(pipeline.dispatch(decisions, precision), mod, target.to_tvm())


def run_module(mod: tvm.IRModule, inputs: tuple[torch.Tensor]) -> np.ndarray:
    """`mod` built for this CPU with the model's lowering, run on `inputs`."""
    target = resolve_target("cpu")
    vm = tvm.relax.VirtualMachine(build_module(mod, target.to_tvm(), target), tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(x.numpy()) for x in inputs]).numpy()


def dispatched(model: nn.Module, inputs: tuple[torch.Tensor], impl: Callable[[object], str]) -> tuple[str, np.ndarray]:
    """main's text after the dispatch passes with each workload decided `impl(workload)`, and the built
    model's output on `inputs`."""
    mod = dispatched_module(model, inputs, impl)
    return str(mod["main"]), run_module(mod, inputs)
