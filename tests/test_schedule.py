"""Default CPU schedules: `RowSum` vectorises lone reductions over whole rows, and the built kernels
still compute what the ops say."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from sparsefx.backends.tvm.pipeline import build_module
from sparsefx.backends.tvm.schedule import RowSum
from sparsefx.target import resolve_target

OPS = {  # name: (input shape, relax op, numpy reference)
    "global_avg_pool": ((2, 5, 8, 8), lambda x: relax.op.nn.adaptive_avg_pool2d(x, (1, 1)),
                        lambda a: a.mean((2, 3), keepdims=True)),
    "sum_last": ((2, 3, 96), lambda x: relax.op.sum(x, axis=[-1]), lambda a: a.sum(-1)),
    "mean_ragged": ((3, 40), lambda x: relax.op.mean(x, axis=[-1], keepdims=True), lambda a: a.mean(-1, keepdims=True)),
    "sum_middle": ((4, 64, 8), lambda x: relax.op.sum(x, axis=[1]), lambda a: a.sum(1)),
    "softmax": ((2, 64), lambda x: relax.op.nn.softmax(x), lambda a: np.exp(a) / np.exp(a).sum(-1, keepdims=True)),
}


def _module(name: str) -> tvm.IRModule:
    shape, op, _ = OPS[name]
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(op(x)))
        bb.emit_func_output(out)
    return bb.get()


def _prim_func(name: str) -> tvm.tirx.PrimFunc:
    mod = relax.transform.LegalizeOps()(_module(name))
    return next(f for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc))


@pytest.mark.parametrize("name", list(OPS))
def test_reductions_built_with_the_default_schedules_match_numpy(name) -> None:
    target = resolve_target("cpu")
    vm = relax.VirtualMachine(build_module(_module(name), target.to_tvm(), target), tvm.cpu())
    a = np.random.default_rng(0).standard_normal(OPS[name][0]).astype("float32")
    np.testing.assert_allclose(vm["main"](tvm.runtime.tensor(a)).numpy(), OPS[name][2](a), rtol=1e-5, atol=1e-5)


def test_row_sum_takes_lone_reductions_over_whole_rows_a_multiple_of_the_vector_long() -> None:
    target = resolve_target("cpu").to_tvm()
    assert RowSum(16).apply(_prim_func("global_avg_pool"), target, False) is not None
    assert RowSum(16).apply(_prim_func("sum_last"), target, False) is not None
    assert RowSum(16).apply(_prim_func("mean_ragged"), target, False) is None  # 40 columns: not whole vectors
    assert RowSum(16).apply(_prim_func("sum_middle"), target, False) is None  # strided rows
    assert RowSum(16).apply(_prim_func("softmax"), target, False) is None  # two reductions
