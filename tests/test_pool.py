"""sparsefx's pool kernel (max_pool2d's and avg_pool2d's CPU legalization) against PyTorch, and where it declines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tvm
from tvm import relax

from sparsefx.backends.tvm.kernels import pool
from sparsefx.backends.tvm.pipeline import build_module
from sparsefx.target import resolve_target

# (input shape, window, stride, padding, ceil mode): ResNet's stem pool, ragged widths, windows wider than
# the output row's vector, stride 1, the largest padding PyTorch allows, an output narrower than a vector,
# ceil mode (GoogLeNet's and SqueezeNet's pools: a last, partial window)
CASES = [((1, 8, 112, 112), 3, 2, 1, False), ((2, 5, 17, 23), 3, 2, 1, False), ((1, 8, 20, 20), 2, 2, 0, False),
         ((1, 3, 9, 40), 3, 1, 1, False), ((1, 4, 33, 33), 5, 2, 2, False), ((1, 4, 7, 7), 3, 1, 0, False),
         ((1, 2, 5, 5), 2, 1, 1, False), ((1, 8, 112, 112), 3, 2, 0, True), ((1, 4, 28, 27), 3, 2, 1, True),
         ((1, 4, 14, 14), 3, 1, 1, True), ((1, 3, 9, 10), 2, 2, 0, True)]


def pool_module(shape: tuple[int, ...], k: int, stride: int, padding: int, op: object = relax.op.nn.max_pool2d,
                **attrs: object) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(op(x, (k, k), (stride, stride), padding, **attrs)))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize(("shape", "k", "stride", "padding", "ceil"), CASES)
def test_max_pool_equals_torch(shape: tuple[int, ...], k: int, stride: int, padding: int, ceil: bool) -> None:
    target = resolve_target("cpu")
    mod = pool_module(shape, k, stride, padding, ceil_mode=ceil)
    assert pool.spec_of(mod["main"].body.blocks[0].bindings[0].value) is not None
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
    assert pool.spec_of(mod["main"].body.blocks[0].bindings[0].value) is None
    target = resolve_target("cpu")
    vm = relax.VirtualMachine(build_module(mod, target.to_tvm(), target), tvm.cpu())
    x = torch.randn(shape)
    want = F.max_pool2d(x, k, stride, padding, dilation=attrs.get("dilation", 1), ceil_mode=attrs.get("ceil_mode", False))
    np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(x.numpy())).numpy(), want.numpy())


AVERAGE_CASES = [((1, 8, 35, 35), 3, 1, 1, False, True), ((1, 8, 56, 56), 2, 2, 0, False, True),
                 ((2, 3, 17, 23), 3, 2, 1, False, True), ((1, 4, 9, 40), 5, 1, 2, False, True),
                 ((1, 4, 15, 15), 3, 2, 1, True, True), ((1, 4, 15, 15), 3, 2, 1, True, False),
                 ((1, 4, 14, 13), 3, 1, 1, False, False), ((1, 3, 9, 10), 2, 2, 0, True, False)]


@pytest.mark.parametrize(("shape", "k", "stride", "padding", "ceil", "count_pad"), AVERAGE_CASES)
def test_average_pool_equals_torch(shape: tuple[int, ...], k: int, stride: int, padding: int, ceil: bool,
                                   count_pad: bool) -> None:
    """Inception's 3x3/1 pools and DenseNet's 2x2/2 ones (padding counted as zeros, PyTorch's default),
    and the divisors that shrink at the edges: ceil mode's last windows, padding not counted."""
    target = resolve_target("cpu")
    mod = pool_module(shape, k, stride, padding, relax.op.nn.avg_pool2d, ceil_mode=ceil, count_include_pad=count_pad)
    assert pool.spec_of(mod["main"].body.blocks[0].bindings[0].value) is not None
    vm = relax.VirtualMachine(build_module(mod, target.to_tvm(), target), tvm.cpu())
    x = torch.randn(shape) + 1  # positive: an edge row read instead of zeros, or a wrong divisor, would show
    got = vm["main"](tvm.runtime.tensor(x.numpy())).numpy()
    want = F.avg_pool2d(x, k, stride, padding, ceil_mode=ceil, count_include_pad=count_pad)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-6)


def test_avg_pool_modules_keep_count_include_pad(private_cache) -> None:
    """TVM's fx importer drops nn.AvgPool2d's count_include_pad; sparsefx imports the module as the function."""
    from sparsefx.backends.tvm import compile

    model = torch.nn.Sequential(torch.nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False)).eval()
    x = torch.randn(1, 3, 15, 15) + 1
    compiled = compile(model, (x,), verbose=False, cache=False)
    np.testing.assert_allclose(compiled(x).numpy(), model(x).numpy(), rtol=1e-5, atol=1e-6)


def test_an_avg_pool_divisor_override_is_refused(private_cache) -> None:
    from sparsefx.backends.tvm import compile
    from sparsefx.errors import SparsefxError

    model = torch.nn.Sequential(torch.nn.AvgPool2d(3, 2, 1, divisor_override=4)).eval()
    with pytest.raises(SparsefxError, match="divisor_override=4"):
        compile(model, (torch.randn(1, 3, 15, 15),), verbose=False, cache=False)



@pytest.mark.parametrize(("k", "stride", "padding", "attrs", "square", "symmetric", "kernel_runs"), [
    ((3, 3), (2, 2), (1, 1, 1, 1), {}, (3, 2, 1), True, True),
    ((3, 3), (2, 2), (1, 1, 1, 1), {"ceil_mode": True}, (3, 2, 1), True, True),
    ((3, 2), (2, 2), (1, 1, 1, 1), {}, None, True, False),  # a non-square window
    ((3, 3), (2, 1), (0, 0, 0, 0), {}, None, True, False),  # strides that differ
    ((3, 3), (2, 2), (0, 0, 1, 1), {}, None, False, False),  # padded on one side only: PyTorch cannot either
    ((2, 2), (2, 2), (2, 2, 2, 2), {}, (2, 2, 2), False, False),  # padded by more than half the window
    ((3, 3), (3, 3), (1, 1, 1, 1), {}, (3, 3, 1), True, False),  # stride 3
    ((3, 3), (1, 1), (1, 1, 1, 1), {"dilation": (2, 2)}, None, True, False),
])
def test_one_reading_of_a_pool_window(k: tuple, stride: tuple, padding: tuple, attrs: dict, square: tuple | None,
                                      symmetric: bool, kernel_runs: bool) -> None:
    """`pool.window_of` reads a pool's attributes once for every pass that takes pools (the pool kernel,
    the bf16 chain's PyTorch pool, the tile layout's pool); each asks what its kernel runs of it."""
    x = relax.Var("x", relax.TensorType((1, 4, 16, 16), "float32"))
    call = relax.op.nn.max_pool2d(x, k, stride, padding, **attrs)
    call = relax.BlockBuilder().normalize(call)
    window = pool.window_of(call)
    assert (window.size, window.stride, window.padding) == (k, stride, padding)
    assert window.ceil == attrs.get("ceil_mode", False) and window.dilation == attrs.get("dilation", (1, 1))
    assert window.square == square and window.symmetric == symmetric
    assert (pool.spec_of(call) is not None) == kernel_runs
    assert pool.window_of(call, ("relax.nn.avg_pool2d",)) is None
    assert pool.window_of(relax.op.nn.max_pool2d(x, k, stride, padding, layout="NHWC")) is None
