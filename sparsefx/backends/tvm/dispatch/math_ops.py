"""Transcendental and normalising ops the dispatch may hand to PyTorch: GELU, softmax, LayerNorm.

TVM's default CPU schedules run them as scalar loops calling libm: BERT-base's GELU (128 x 3072
floats) takes 2.4 ms in TIR and 0.14 ms in PyTorch, its softmax 2.0 ms against 0.22, a LayerNorm
0.76 against 0.19 (Intel Xeon VM, one thread); in BERT-base at batch 1 these were 35 of 190 ms.
Like convolutions and matmuls they become dispatch workloads, timed both ways on the target.

One registry entry per Relax op: the workload name, its attributes as numbers (part of the
workload key), how to emit it alone for timing in TIR, and the PyTorch function that runs it.
The packed function the compiled model calls is `sparsefx.torch.<name>`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import tvm_ffi
from tvm import relax


@dataclass(frozen=True)
class MathOp:
    name: str
    attrs: Callable[[relax.Call, int], tuple[float, ...] | None]  # (call, rank) -> attrs, None: unsupported
    emit: Callable[[list[relax.Expr], tuple[float, ...]], relax.Expr]
    run: Callable[[list[torch.Tensor], tuple[float, ...]], torch.Tensor]
    operands: Callable[[tuple[int, ...]], list[tuple[int, ...]]] = lambda shape: [shape]  # from the input's shape

    @property
    def packed(self) -> str:
        return f"sparsefx.torch.{self.name}"


def _last_axis(axis: int, rank: int) -> bool:
    return axis in (-1, rank - 1)


def _softmax_attrs(call: relax.Call, rank: int) -> tuple[float, ...] | None:
    """() for the last axis (the common case keeps its workload key), else (axis,): TIR's default
    schedule of a softmax over another axis is a strided scalar loop (YOLOv8's DFL softmax over 16
    bins of a (1, 16, 4, 8400) tensor: 19.7 ms, a third of the pruned YOLOv8n)."""
    axis = int(call.attrs.axis) % rank
    return () if _last_axis(axis, rank) else (float(axis),)


def _axis(attrs: tuple[float, ...]) -> int:
    return int(attrs[0]) if attrs else -1


def _layer_norm_attrs(call: relax.Call, rank: int) -> tuple[float, ...] | None:
    a = call.attrs
    ok = len(a.axes) == 1 and _last_axis(int(a.axes[0]), rank) and bool(a.center) and bool(a.scale)
    return (float(a.epsilon),) if ok else None


MATH_OPS: dict[str, MathOp] = {
    "relax.nn.gelu": MathOp("gelu", lambda call, rank: (), lambda args, attrs: relax.op.nn.gelu(args[0]),
                            lambda t, attrs: F.gelu(t[0])),
    "relax.nn.gelu_tanh": MathOp("gelu_tanh", lambda call, rank: (), lambda args, attrs: relax.op.nn.gelu_tanh(args[0]),
                                 lambda t, attrs: F.gelu(t[0], approximate="tanh")),
    "relax.nn.softmax": MathOp("softmax", _softmax_attrs,
                               lambda args, attrs: relax.op.nn.softmax(args[0], axis=_axis(attrs)),
                               lambda t, attrs: torch.softmax(t[0], _axis(attrs))),
    "relax.nn.layer_norm": MathOp(
        "layer_norm", _layer_norm_attrs,
        lambda args, attrs: relax.op.nn.layer_norm(args[0], args[1], args[2], axes=[-1], epsilon=attrs[0]),
        lambda t, attrs: F.layer_norm(t[0], t[0].shape[-1:], t[1], t[2], attrs[0]),
        lambda shape: [shape, shape[-1:], shape[-1:]]),
}
BY_NAME = {op.name: op for op in MATH_OPS.values()}


def _register(op: MathOp) -> None:
    @tvm_ffi.register_global_func(op.packed, override=True)
    def _call(*args: object) -> object:
        tensors = [torch.from_dlpack(a) for a in args if not isinstance(a, (int, float))]
        attrs = tuple(a for a in args if isinstance(a, (int, float)))
        return tvm_ffi.from_dlpack(op.run(tensors, attrs).contiguous())


for _op in MATH_OPS.values():
    _register(_op)
