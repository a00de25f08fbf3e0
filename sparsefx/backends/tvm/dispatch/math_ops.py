"""Transcendental and normalising ops the dispatch may hand to PyTorch: GELU, softmax, LayerNorm,
and attention (PyTorch's fused scaled-dot-product attention).

TVM's default CPU schedules run them as scalar loops calling libm: BERT-base's GELU (128 x 3072
floats) takes 2.4 ms in TIR and 0.14 ms in PyTorch, its softmax 2.0 ms against 0.22, a LayerNorm
0.76 against 0.19 (Intel Xeon VM, one thread); in BERT-base at batch 1 these were 35 of 190 ms.
Like convolutions and matmuls they become dispatch workloads, timed both ways on the target.

One registry entry per Relax op: the workload name, its attributes as numbers (part of the
workload key), how to emit it alone for timing in TIR, the PyTorch function that runs it, and its
dimensions (the workload's; by default the first input's shape) and the operands' shapes from them.
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
    operands: Callable[[tuple[int, ...], tuple[float, ...]], list[tuple[int, ...]]] = lambda dims, attrs: [dims]
    dims: Callable[[list[tuple[int, ...]]], tuple[int, ...]] = lambda shapes: shapes[0]  # from the call's shapes

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


def _attention_attrs(call: relax.Call, rank: int) -> tuple[float, ...] | None:
    """(scale, 0 = default 1/sqrt(head dim); 1.0 if causal from the top left; 1.0 if it adds a bias of
    the full (batch, heads, seq, seq_kv) shape): what `backends.tvm.importer` emits for PyTorch's SDPA;
    None for fewer key/value heads than query heads (Relax takes them, the dispatched kernels do not)."""
    a, args = call.attrs, call.args
    if a.window_size is not None or (a.causal_mask or "TopLeft") != "TopLeft":
        return None
    dims = [tuple(int(d) for d in x.ty.shape) for x in args[:3]]
    if not dims[0][2] == dims[1][2] == dims[2][2]:  # grouped-query heads: the workload's dims and SDPA's call assume equal
        return None
    if len(args) > 3:
        b, s, n = dims[0][:3]
        if tuple(int(d) for d in args[3].ty.shape) != (b, n, s, dims[1][1]):
            return None
    return (float(a.scale.value) if a.scale is not None else 0.0, float(a.causal_mask is not None),
            float(len(args) > 3))


def _attention_operands(dims: tuple[int, ...], attrs: tuple[float, ...]) -> list[tuple[int, ...]]:
    b, s, n, d, s_kv, d_v = dims
    return [(b, s, n, d), (b, s_kv, n, d), (b, s_kv, n, d_v)] + ([(b, n, s, s_kv)] if attrs[2] else [])


def _attention_emit(args: list[relax.Expr], attrs: tuple[float, ...]) -> relax.Expr:
    return relax.op.nn.attention(*args[:3], args[3] if attrs[2] else None, attrs[0] or None,
                                 "TopLeft" if attrs[1] else None)


def _attention_run(t: list[torch.Tensor], attrs: tuple[float, ...]) -> torch.Tensor:
    """Relax's (batch, seq, heads, dim) layout is PyTorch's (batch, heads, seq, dim) transposed: views."""
    q, k, v = (x.transpose(1, 2) for x in t[:3])
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=t[3] if attrs[2] else None, is_causal=bool(attrs[1]),
                                         scale=attrs[0] or None)
    return out.transpose(1, 2)


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
        lambda dims, attrs: [dims, dims[-1:], dims[-1:]]),
}
# q (b, s, n, d), k (b, s_kv, n, d), v (b, s_kv, n, d_v): dims (b, s, n, d, s_kv, d_v); Relax names the op
# `attention_bias` when it adds a bias
ATTENTION = MathOp("attention", _attention_attrs, _attention_emit, _attention_run, _attention_operands,
                   lambda shapes: (*shapes[0], shapes[1][1], shapes[2][3]))
MATH_OPS.update({"relax.nn.attention": ATTENTION, "relax.nn.attention_bias": ATTENTION})
BY_NAME = {op.name: op for op in MATH_OPS.values()}


def _register(op: MathOp) -> None:
    @tvm_ffi.register_global_func(op.packed, override=True)
    def _call(*args: object) -> object:
        tensors = [torch.from_dlpack(a) for a in args if not isinstance(a, (int, float))]
        attrs = tuple(a for a in args if isinstance(a, (int, float)))
        return tvm_ffi.from_dlpack(op.run(tensors, attrs).contiguous())


for _op in MATH_OPS.values():
    _register(_op)
