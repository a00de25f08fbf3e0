"""The numpy constant folder (backends/tvm/fold.py): BatchNorm's arithmetic on weights folds to the
values TVM's FoldConstant computes, without building a kernel per op; calls on inputs stay."""

from __future__ import annotations

import numpy as np
import torch
import tvm
from torch import nn
from tvm import relax

from sparsefx.backends.tvm import pipeline
from sparsefx.backends.tvm.fold import numpy_fold_pass
from sparsefx.backends.tvm.importer import to_relax


def _conv_bn() -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    bn = model[1]
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 1.5)
    return model, (torch.randn(1, 3, 8, 8),)


def _optimized(model: nn.Module, inputs: tuple, folder: str) -> tvm.IRModule:
    """The model through the optimize passes, folding with `folder` only ('numpy' or 'tvm')."""
    mod, _ = to_relax(model, inputs)
    skip = "FoldConstant" if folder == "numpy" else "NumpyFoldConstant"
    passes = [p for p in pipeline.optimize_passes() if p[0] != skip]
    return pipeline.run(passes, mod, tvm.target.Target({"kind": "llvm"}))


def _constants(mod: tvm.IRModule) -> list[np.ndarray]:
    found = []

    @relax.expr_functor.visitor
    class _Visit(relax.PyExprVisitor):
        def visit_generic_const_(self, const: relax.Expr) -> None:
            if hasattr(const.value, "numpy"):
                found.append(const.value.numpy())

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            _Visit().visit_expr(func)
    return found


def _calls(mod: tvm.IRModule) -> list[str]:
    return [line.split("= R.")[1].split("(")[0] for line in str(mod["main"]).splitlines() if "= R." in line]


def test_numpy_fold_matches_tvms_fold_constant() -> None:
    model, inputs = _conv_bn()
    numpy, tvm_folded = _optimized(model, inputs, "numpy"), _optimized(model, inputs, "tvm")
    assert _calls(numpy) == _calls(tvm_folded)  # the same graph: convs, bias adds, relu, nothing on constants
    assert "sqrt" not in " ".join(_calls(numpy))  # BN's sqrt(var + eps) is a constant now
    mine, theirs = _constants(numpy), _constants(tvm_folded)
    assert len(mine) == len(theirs) >= 4  # conv weights and biases, the folded BN scale and shift
    for a, b in zip(mine, theirs, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_calls_on_inputs_are_left_alone() -> None:
    x = relax.Var("x", relax.TensorType((4,), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            c = bb.emit(relax.op.add(relax.const(np.ones(4, "float32")), relax.const(np.ones(4, "float32"))))
            y = bb.emit_output(relax.op.multiply(x, c))
        bb.emit_func_output(y)
    folded = numpy_fold_pass(bb.get())
    assert _calls(folded).count("multiply") == 1  # x * c stays; c itself became the constant 2
    assert any(np.array_equal(v, np.full(4, 2, "float32")) for v in _constants(folded))
