"""Shared by the own-kernel tests: a model through the optimize and dispatch passes with chosen decisions."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import tvm
from torch import nn

from sparsefx.backends.tvm import pipeline
from sparsefx.backends.tvm.compiler import build_module
from sparsefx.backends.tvm.importer import to_relax
from sparsefx.target import resolve_target


def with_random_bn_stats(model: nn.Module) -> nn.Module:
    """`model` in eval mode with non-trivial BN statistics, so the folded bias and scale matter."""
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
    return model.eval()


def dispatched(model: nn.Module, inputs: tuple[torch.Tensor], impl: Callable[[object], str]) -> tuple[str, np.ndarray]:
    """main's text after the dispatch passes with each workload decided `impl(workload)`, and the built
    model's output on `inputs`."""
    target = resolve_target("cpu")
    mod, _ = to_relax(model, inputs)
    mod = pipeline.run(pipeline.optimize_passes(), mod, target.to_tvm())
    decisions = {w.key: {"impl": impl(w)} for w in pipeline.collect_workloads(mod)}
    mod = pipeline.run(pipeline.dispatch(decisions), mod, target.to_tvm())
    vm = tvm.relax.VirtualMachine(build_module(mod, target.to_tvm(), target), tvm.cpu())
    return str(mod["main"]), vm["main"](*[tvm.runtime.tensor(x.numpy()) for x in inputs]).numpy()
