"""sparsefx's max-pool kernel (max_pool2d's CPU legalization) against PyTorch, and where it declines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tvm
from tvm import relax

from sparsefx.backends.tvm.kernels import max_pool
from sparsefx.backends.tvm.pipeline import build_module
from sparsefx.target import resolve_target

# (input shape, window, stride, padding, ceil mode): ResNet's stem pool, ragged widths, windows wider than
# the output row's vector, stride 1, the largest padding PyTorch allows, an output narrower than a vector,
# ceil mode (GoogLeNet's and SqueezeNet's pools: a last, partial window)
CASES = [((1, 8, 112, 112), 3, 2, 1, False), ((2, 5, 17, 23), 3, 2, 1, False), ((1, 8, 20, 20), 2, 2, 0, False),
         ((1, 3, 9, 40), 3, 1, 1, False), ((1, 4, 33, 33), 5, 2, 2, False), ((1, 4, 7, 7), 3, 1, 0, False),
         ((1, 2, 5, 5), 2, 1, 1, False), ((1, 8, 112, 112), 3, 2, 0, True), ((1, 4, 28, 27), 3, 2, 1, True),
         ((1, 4, 14, 14), 3, 1, 1, True), ((1, 3, 9, 10), 2, 2, 0, True)]


def pool_module(shape: tuple[int, ...], k: int, stride: int, padding: int, **attrs: object) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.nn.max_pool2d(x, (k, k), (stride, stride), padding, **attrs)))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize(("shape", "k", "stride", "padding", "ceil"), CASES)
def test_max_pool_equals_torch(shape: tuple[int, ...], k: int, stride: int, padding: int, ceil: bool) -> None:
    target = resolve_target("cpu")
    mod = pool_module(shape, k, stride, padding, ceil_mode=ceil)
    assert max_pool.spec_of(mod["main"].body.blocks[0].bindings[0].value) is not None
    vm = relax.VirtualMachine(build_module(mod, target.to_tvm(), target), tvm.cpu())
    x = torch.randn(shape) - 1  # negative: a padding read as 0 would show
    got = vm["main"](tvm.runtime.tensor(x.numpy())).numpy()
    np.testing.assert_array_equal(got, F.max_pool2d(x, k, stride, padding, ceil_mode=ceil).numpy())


@pytest.mark.parametrize("attrs", [{"dilation": (2, 2)}, {"strides": (3, 3)}, {"strides": (3, 3), "ceil_mode": True}])
def test_max_pool_declines_what_it_does_not_run(attrs: dict) -> None:
    """Dilation and strides other than 1 and 2 stay on TVM's legalization, and still compile right."""
    stride = attrs.pop("strides", (2, 2))[0]
    shape, k, padding = (1, 4, 15, 15), 3, 1
    mod = pool_module(shape, k, stride, padding, **attrs)
    assert max_pool.spec_of(mod["main"].body.blocks[0].bindings[0].value) is None
    target = resolve_target("cpu")
    vm = relax.VirtualMachine(build_module(mod, target.to_tvm(), target), tvm.cpu())
    x = torch.randn(shape)
    want = F.max_pool2d(x, k, stride, padding, dilation=attrs.get("dilation", 1), ceil_mode=attrs.get("ceil_mode", False))
    np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(x.numpy())).numpy(), want.numpy())
