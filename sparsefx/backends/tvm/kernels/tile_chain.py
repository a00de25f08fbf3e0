"""Relax pass: chains of AMX kernels hand their activations on in the tile layout (`tile_layout`).

`registry.own_kernel_pass` puts each AMX kernel between a conversion in (float32 NCHW -> NHWC bf16)
and one out, so it fits anywhere. This pass then
- runs in the layout the ops between two such kernels that have a kernel there: a max-pool (ResNet's
  stem) and a per-channel scale (squeeze-and-excitation's `x * s`, EfficientNet), where only
  conversions back into the layout read their result;
- runs a global average pool of a converted-out tensor on the layout (`tile_layout.mean`: a
  classifier's pooling head, squeeze-and-excitation's squeeze), which leaves that conversion unread;
- drops each conversion out that goes straight back in: out and back in is exact (bf16 widened to
  float32 and rounded back is the same bf16).
A ResNet, MobileNetV2 or EfficientNet then converts once after its input and nowhere else.
Rewrites Relax bindings and adds the layout's kernels; invalidates nothing else.
"""

from __future__ import annotations

from collections.abc import Callable

import tvm
from tvm import relax

from sparsefx.backends.tvm.function_pass import swap_calls
from sparsefx.backends.tvm.kernels.pool import window_of
from sparsefx.backends.tvm.kernels.tile_layout import (
    FROM_TILES,
    TO_TILES,
    from_tiles,
    max_pool,
    mean,
    name,
    scale,
)


def _op(value: relax.Expr | None) -> str:
    return getattr(value.op, "name", "") if isinstance(value, relax.Call) else ""


def _callee(value: relax.Expr | None) -> str:
    """The name of the TIR function a call_tir binding calls ("" for anything else)."""
    return value.args[0].name_hint if _op(value) == "relax.call_tir" else ""


def _source(value: relax.Expr) -> relax.Expr:
    """A conversion's (call_tir's) argument."""
    return value.args[1].fields[0]


def _shape(expr: relax.Expr) -> tuple[int, ...]:
    return tuple(int(v) for v in expr.ty.shape)


def _pool_window(call: relax.Expr) -> tuple[int, int, int] | None:
    """(window, stride, padding) of a square NCHW max_pool2d with equal padding and no dilation, else None."""
    window = window_of(call, ("relax.nn.max_pool2d",))
    return window.square if window is not None and not window.ceil else None


class _Kernels:
    """The layout's kernels this pass calls, each added to the module once."""

    def __init__(self, bb: relax.BlockBuilder) -> None:
        self.bb, self.gvars = bb, {}

    def __call__(self, kernel_name: str, make: Callable[[], tvm.tirx.PrimFunc]) -> relax.GlobalVar:
        if kernel_name not in self.gvars:
            found = next((g for g in self.bb.get().functions if g.name_hint == kernel_name), None)
            self.gvars[kernel_name] = found or self.bb.add_func(make(), kernel_name)
        return self.gvars[kernel_name]


def _in_layout(func: relax.Function, kernels: _Kernels) -> dict[relax.Call, relax.Expr]:
    """{call: its replacement} for the pools, scales and means this pass runs in the layout."""
    values = relax.analysis.get_var2val(func)
    readers: dict[relax.Var, list[relax.Expr]] = {}
    for value in values.values():
        for var in relax.analysis.free_vars(value):
            readers.setdefault(var, []).append(value)
    returned = set(relax.analysis.free_vars(func.body.body))

    def tiled(arg: relax.Expr) -> relax.Expr | None:  # the layout tensor a converted-out argument came from
        value = values.get(arg)
        return _source(value) if _callee(value).startswith(FROM_TILES) else None

    def back(result: relax.Expr, shape: tuple[int, int, int, int]) -> relax.Expr:
        gvar = kernels(name(FROM_TILES, shape), lambda: from_tiles(shape))
        return relax.call_tir(gvar, [result], relax.TensorType(shape, "float32"))

    swaps = {}
    for var, value in values.items():
        op = _op(value)
        only_into_layout = var not in returned and all(_callee(r).startswith(TO_TILES) for r in readers.get(var, []))
        if (window := _pool_window(value)) and (source := tiled(value.args[0])) is not None and only_into_layout:
            n, c, ho, wo = _shape(value)
            stored = _shape(source)
            pool = kernels(name(f"amx_max_pool_k{window[0]}s{window[1]}p{window[2]}", stored),
                           lambda stored=stored, ho=ho, wo=wo, window=window: max_pool(stored, (ho, wo), *window))
            swaps[value] = back(relax.call_tir(pool, [source], relax.TensorType((n, ho, wo, stored[3]), "uint16")),
                                (n, c, ho, wo))
        elif op == "relax.multiply" and only_into_layout:
            a, b = value.args
            for x, s in ((a, b), (b, a)):
                source = tiled(x)
                if source is not None and len(_shape(s)) == 4 and _shape(s) == (*_shape(x)[:2], 1, 1):
                    stored, channels = _shape(source), _shape(x)[1]
                    gvar = kernels(name("amx_scale", (*stored, channels)), lambda stored=stored, c=channels: scale(stored, c))
                    swaps[value] = back(relax.call_tir(gvar, [source, s], relax.TensorType(stored, "uint16")),
                                        _shape(x))
                    break
        elif op == "relax.nn.adaptive_avg_pool2d" and (source := tiled(value.args[0])) is not None \
                and value.attrs.layout == "NCHW" and value.attrs.out_layout == "NCHW" \
                and _shape(value)[2:] == (1, 1):
            stored, out = _shape(source), _shape(value)
            gvar = kernels(name("amx_mean", (*stored, out[1])), lambda stored=stored, c=out[1]: mean(stored, c))
            swaps[value] = relax.call_tir(gvar, [source], relax.TensorType(out, "float32"))
    return swaps


def _drop_round_trips(func: relax.Function) -> relax.Function:
    values = relax.analysis.get_var2val(func)
    remap = {var: _source(values[_source(value)]) for var, value in values.items()
             if _callee(value).startswith(TO_TILES) and _callee(values.get(_source(value))).startswith(FROM_TILES)}
    return relax.analysis.remove_all_unused(_Remap(remap).visit_expr(func) if remap else func)


@tvm.transform.module_pass(opt_level=0, name="ChainTiles")
def tile_chain_pass(mod: tvm.IRModule, _ctx: object) -> tvm.IRModule:
    bb = relax.BlockBuilder(mod)
    kernels = _Kernels(bb)
    for gvar, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            swaps = _in_layout(func, kernels)
            bb.update_func(gvar, _drop_round_trips(swap_calls(func, swaps)))
    return bb.get()


@relax.expr_functor.mutator
class _Remap(relax.PyExprMutator):
    def __init__(self, remap: dict[relax.Var, relax.Expr]) -> None:
        super().__init__()
        self.remap = remap

    def visit_dataflow_var_(self, var: relax.Var) -> relax.Expr:
        return self.remap.get(var, var)

    def visit_var_(self, var: relax.Var) -> relax.Expr:
        return self.remap.get(var, var)

