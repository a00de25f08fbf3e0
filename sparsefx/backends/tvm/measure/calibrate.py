"""Calibrate the cost model's TIR kernel classes on the target: build element-wise,
reduction and pooling ops at a few sizes with the pipeline compiled models get, time them,
and fit `overhead + bytes / bandwidth` per class. A reduction (softmax) is timed also as the
dispatch may run it, on PyTorch (`math_ops`), and the faster counts. Timed as every
kernel is (`cost.timing.time_in_turn`); inputs are activations, just written, as in a model."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from sparsefx.backends.tvm.dispatch.math_ops import BY_NAME
from sparsefx.backends.tvm.pipeline import build_module
from sparsefx.cost.model import fit_line
from sparsefx.cost.timing import time_in_turn
from sparsefx.target import Target

SIZES = (1 << 14, 1 << 17, 1 << 20, 1 << 22)  # float32 elements


def _cases() -> list[tuple[str, str, list[tuple[int, ...]], float]]:
    """(class, function name, input shapes, bytes moved) for every calibration run."""
    cases = []
    for i, size in enumerate(SIZES):
        cases.append(("elementwise", f"ew{i}", [(size,), (size,)], 3 * 4 * size))
        cases.append(("reduce", f"sm{i}", [(size // 128, 128)], 2 * 4 * size))
        side = int((size // 64) ** 0.5)
        out = (side - 1) // 2 + 1
        cases.append(("pool", f"mp{i}", [(1, 64, side, side)], 4 * 64 * (side * side + out * out)))
    return cases


def _emit(bb: relax.BlockBuilder, op: str, name: str, shapes: list[tuple[int, ...]]) -> None:
    params = [relax.Var(f"x{j}", relax.TensorType(s, "float32")) for j, s in enumerate(shapes)]
    with bb.function(name, params):
        with bb.dataflow():
            if op == "elementwise":
                out = bb.emit(relax.op.nn.relu(relax.op.add(params[0], params[1])))
            elif op == "reduce":
                out = bb.emit(relax.op.nn.softmax(params[0], axis=-1))
            elif op == "reduce_torch":
                out = bb.emit(relax.call_pure_packed(BY_NAME["softmax"].packed, params[0], ty_args=params[0].ty))
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
        args = [tvm.runtime.tensor(np.random.randn(*s).astype("float32")) for s in shapes]
        rivals = {"tir": [lambda name=name, args=args: vm[name](*args)]}
        if op == "reduce":
            rivals["torch"] = [lambda name=name, args=args: vm[f"{name}_torch"](*args)]
        ms = min(time_in_turn(rivals).values())
        xs, ys = points.setdefault(op, ([], []))
        xs.append(moved)
        ys.append(ms)
    return {op: list(fit_line(xs, ys)) for op, (xs, ys) in points.items()}
