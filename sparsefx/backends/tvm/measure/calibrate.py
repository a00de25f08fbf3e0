"""Calibrate the cost model's TIR kernel classes on the target: build element-wise,
reduction and pooling ops and the blocked layout's conversions in and out (`kernels.blocked_layout`)
at a few sizes with the pipeline compiled models get, time them, and fit `overhead + bytes / bandwidth`
per class. A reduction (softmax) is timed also as the
dispatch may run it, on PyTorch (`math_ops`), and the faster counts. Timed as every
kernel is (`cost.timing.time_in_turn`); inputs are activations, just written, as in a model."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from sparsefx.backends.tvm.dispatch.math_ops import BY_NAME
from sparsefx.backends.tvm.kernels import blocked_layout
from sparsefx.backends.tvm.pipeline import build_module
from sparsefx.cost.kernel import LAYOUT_IN, LAYOUT_OUT
from sparsefx.cost.model import fit_line
from sparsefx.cost.timing import time_in_turn
from sparsefx.target import Target

SIZES = (1 << 14, 1 << 17, 1 << 20, 1 << 22)  # float32 elements
LAYOUT_CHANNELS = 24  # a pruned count: the blocked layout pads it to 32, as it does most pruned tensors


def _cases() -> list[tuple[str, str, list[tuple[int, ...]], float]]:
    """(class, function name, input shapes, bytes moved) for every calibration run."""
    cases = []
    for i, size in enumerate(SIZES):
        cases.append(("elementwise", f"ew{i}", [(size,), (size,)], 3 * 4 * size))
        cases.append(("reduce", f"sm{i}", [(size // 128, 128)], 2 * 4 * size))
        side = int((size // 64) ** 0.5)
        out = (side - 1) // 2 + 1
        cases.append(("pool", f"mp{i}", [(1, 64, side, side)], 4 * 64 * (side * side + out * out)))
        side = int((size // LAYOUT_CHANNELS) ** 0.5)
        for op, name in ((LAYOUT_IN, "to"), (LAYOUT_OUT, "from")):
            cases.append((op, f"{name}{i}", [(1, LAYOUT_CHANNELS, side, side)], 8 * LAYOUT_CHANNELS * side * side))
    return cases


def _inputs(op: str, shapes: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """A case's input shapes: a conversion out of the layout reads the blocked form of its NCHW shape."""
    return [blocked_layout.blocked(shapes[0])] if op == LAYOUT_OUT else shapes


def _emit(bb: relax.BlockBuilder, op: str, name: str, shapes: list[tuple[int, ...]]) -> None:
    params = [relax.Var(f"x{j}", relax.TensorType(s, "float32")) for j, s in enumerate(_inputs(op, shapes))]
    with bb.function(name, params):
        with bb.dataflow():
            if op == "elementwise":
                out = bb.emit(relax.op.nn.relu(relax.op.add(params[0], params[1])))
            elif op == "reduce":
                out = bb.emit(relax.op.nn.softmax(params[0], axis=-1))
            elif op == "reduce_torch":
                out = bb.emit(relax.call_pure_packed(BY_NAME["softmax"].packed, params[0], ty_args=params[0].ty))
            elif op in (LAYOUT_IN, LAYOUT_OUT):
                convert, out_shape = ((blocked_layout.to_blocked, blocked_layout.blocked(shapes[0])) if op == LAYOUT_IN
                                      else (blocked_layout.from_blocked, shapes[0]))
                gvar = bb.add_func(convert(shapes[0]), f"{name}_tir")
                out = bb.emit(relax.call_tir(gvar, [params[0]], relax.TensorType(out_shape, "float32")))
            else:
                out = bb.emit(relax.op.nn.max_pool2d(params[0], (3, 3), (2, 2), (1, 1, 1, 1)))
            result = bb.emit_output(out)
        bb.emit_func_output(result)


def calibrate(target: Target) -> dict[str, list[float]]:
    """{class: [overhead ms, GB/s]} measured on the host `target`."""
    cases = _cases()
    bb = relax.BlockBuilder()
    for op, name, shapes, _ in cases:
        _emit(bb, op, name, shapes)
        if op == "reduce":
            _emit(bb, "reduce_torch", f"{name}_torch", shapes)
    tvm_target = target.to_tvm()
    vm = relax.VirtualMachine(build_module(bb.get(), tvm_target, target), tvm.cpu())
    points: dict[str, tuple[list[float], list[float]]] = {}
    for op, name, shapes, moved in cases:
        args = [tvm.runtime.tensor(np.random.randn(*s).astype("float32")) for s in _inputs(op, shapes)]
        rivals = {"tir": [lambda name=name, args=args: vm[name](*args)]}
        if op == "reduce":
            rivals["torch"] = [lambda name=name, args=args: vm[f"{name}_torch"](*args)]
        ms = min(time_in_turn(rivals).values())
        xs, ys = points.setdefault(op, ([], []))
        xs.append(moved)
        ys.append(ms)
    return {op: list(fit_line(xs, ys)) for op, (xs, ys) in points.items()}
