"""Relax pass: chains of kernels in a layout of their own hand their activations on in it.

`registry.own_kernel_pass` puts each AMX kernel (`tile_layout`: NHWC bf16) and each `blocked` kernel
(`blocked_layout`: NCHW16c float32) between a conversion in from float32 NCHW and one out, so it
fits anywhere. This pass then, for each layout,
- runs in the layout the ops between two such kernels that have a kernel there: a max-pool (ResNet's
  stem) and a per-channel scale (squeeze-and-excitation's `x * s`, EfficientNet), where only
  conversions back into the layout read their result;
- runs a global average pool of a converted-out tensor on the layout (`mean`: a classifier's pooling
  head, squeeze-and-excitation's squeeze, or `x.mean(dim=(2, 3))`), which leaves that conversion unread;
- drops each conversion out that goes straight back in: out and back in is exact (bf16 widened to
  float32 and rounded back is the same bf16; the blocked layout holds the float32 values themselves).
A ResNet, MobileNetV2 or EfficientNet then converts once after its input and nowhere else. A
conversion into a kernel that writes over it (`call_tir_inplace`: `blocked`'s and `amx`'s residual) stays where
the tensor it would be dropped for is read after that kernel.
Rewrites Relax bindings and adds the layouts' kernels; invalidates nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import tvm
from tvm import relax

from sparsefx.backends.tvm.function_pass import swap_calls
from sparsefx.backends.tvm.kernels import blocked_layout, tile_layout
from sparsefx.backends.tvm.kernels.pool import window_of

Shape = tuple[int, int, int, int]


@dataclass(frozen=True)
class Layout:
    """What this pass needs of a layout, every kernel made for the NCHW shape of the tensor it holds."""

    kind: str  # the kind its kernels' names start with (`CompiledModel.profile` files them under it)
    into: str  # the name prefix of its conversion in, and out
    out_of: str
    dtype: str
    shape: Callable[[Shape], tuple[int, ...]]
    to_layout: Callable[[Shape], tvm.tirx.PrimFunc]
    from_layout: Callable[[Shape], tvm.tirx.PrimFunc]
    max_pool: Callable[[Shape, tuple[int, int], int, int, int], tvm.tirx.PrimFunc]
    scale: Callable[[Shape], tvm.tirx.PrimFunc]
    mean: Callable[[Shape], tvm.tirx.PrimFunc]


LAYOUTS = (
    Layout("amx", tile_layout.TO_TILES, tile_layout.FROM_TILES, "uint16", tile_layout.tiled, tile_layout.to_tiles,
           tile_layout.from_tiles,
           lambda shape, out_hw, *window: tile_layout.max_pool(tile_layout.tiled(shape), out_hw, *window),
           lambda shape: tile_layout.scale(tile_layout.tiled(shape), shape[1]),
           lambda shape: tile_layout.mean(tile_layout.tiled(shape), shape[1])),
    Layout("blocked", blocked_layout.TO_BLOCKED, blocked_layout.FROM_BLOCKED, "float32", blocked_layout.blocked,
           blocked_layout.to_blocked, blocked_layout.from_blocked, blocked_layout.max_pool, blocked_layout.scale, blocked_layout.mean),
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


def _in_layout(func: relax.Function, kernels: _Kernels, layout: Layout) -> dict[relax.Call, relax.Expr]:
    """{call: its replacement} for the pools, scales and means this pass runs in `layout`."""
    values = relax.analysis.get_var2val(func)
    readers: dict[relax.Var, list[relax.Expr]] = {}
    for value in values.values():
        for var in relax.analysis.free_vars(value):
            readers.setdefault(var, []).append(value)
    returned = set(relax.analysis.free_vars(func.body.body))

    def held(arg: relax.Expr) -> relax.Expr | None:  # the layout tensor a converted-out argument came from
        value = values.get(arg)
        return _source(value) if _callee(value).startswith(layout.out_of) else None

    def back(result: relax.Expr, shape: Shape) -> relax.Expr:
        gvar = kernels(tile_layout.name(layout.out_of, shape), lambda: layout.from_layout(shape))
        return relax.call_tir(gvar, [result], relax.TensorType(shape, "float32"))

    def stored(shape: Shape) -> relax.TensorType:
        return relax.TensorType(layout.shape(shape), layout.dtype)

    def mean(source: relax.Expr, shape: Shape) -> relax.Expr:  # float32 (n, c, 1, 1) of a tensor held in the layout
        gvar = kernels(tile_layout.name(f"{layout.kind}_mean", shape), lambda: layout.mean(shape))
        return relax.call_tir(gvar, [source], relax.TensorType((*shape[:2], 1, 1), "float32"))

    swaps = {}
    for var, value in values.items():
        op = _op(value)
        only_into_layout = var not in returned and all(_callee(r).startswith(layout.into) for r in readers.get(var, []))
        if (window := _pool_window(value)) and (source := held(value.args[0])) is not None and only_into_layout:
            shape, out = _shape(value.args[0]), _shape(value)
            pool = kernels(tile_layout.name(f"{layout.kind}_max_pool_k{window[0]}s{window[1]}p{window[2]}", shape),
                           lambda shape=shape, out=out, window=window: layout.max_pool(shape, out[2:], *window))
            swaps[value] = back(relax.call_tir(pool, [source], stored(out)), out)
        elif op == "relax.multiply" and only_into_layout:
            a, b = value.args
            for x, s in ((a, b), (b, a)):
                source = held(x)
                if source is not None and len(_shape(s)) == 4 and _shape(s) == (*_shape(x)[:2], 1, 1):
                    shape = _shape(x)
                    gvar = kernels(tile_layout.name(f"{layout.kind}_scale", shape), lambda shape=shape: layout.scale(shape))
                    swaps[value] = back(relax.call_tir(gvar, [source, s], stored(shape)), shape)
                    break
        elif op == "relax.nn.adaptive_avg_pool2d" and (source := held(value.args[0])) is not None \
                and value.attrs.layout == "NCHW" and value.attrs.out_layout == "NCHW" \
                and _shape(value)[2:] == (1, 1):
            swaps[value] = mean(source, _shape(value.args[0]))
        elif op == "relax.mean" and (source := held(value.args[0])) is not None and _spatial_mean(value):
            pooled = mean(source, _shape(value.args[0]))
            swaps[value] = pooled if value.attrs.keepdims else relax.op.reshape(pooled, _shape(value))
    return swaps


def _spatial_mean(call: relax.Call) -> bool:
    """Whether a `mean` call averages an NCHW tensor over its positions (`x.mean(dim=(2, 3))`)."""
    axes = call.attrs.axis
    return len(_shape(call.args[0])) == 4 and axes is not None and sorted(int(a) % 4 for a in axes) == [2, 3]


def _drop_round_trips(func: relax.Function, layout: Layout) -> relax.Function:
    """Each conversion in of a conversion out read from its source; a tensor converted in twice (a
    residual block's input, read by its first conv and by its projection) read from the first."""
    values = relax.analysis.get_var2val(func)
    remap = {var: _source(values[_source(value)]) for var, value in values.items()
             if _callee(value).startswith(layout.into) and _callee(values.get(_source(value))).startswith(layout.out_of)}
    first: dict[tuple[str, relax.Expr], relax.Var] = {}
    for block in func.body.blocks:
        for binding in block.bindings:
            if binding.var not in remap and _callee(binding.value).startswith(layout.into):
                remap.setdefault(binding.var, first.setdefault((_callee(binding.value), _source(binding.value)), binding.var))
    remap = _keep_overwritten({var: to for var, to in remap.items() if not to.same_as(var)}, func)
    return relax.analysis.remove_all_unused(_Remap(remap).visit_expr(func) if remap else func)


def _keep_overwritten(remap: dict[relax.Var, relax.Expr], func: relax.Function) -> dict[relax.Var, relax.Expr]:
    """`remap` less what would let a kernel that writes over an argument (`call_tir_inplace`: a
    residual) destroy a tensor read afterwards: such an argument, and those read later that would be
    read from the same tensor, keep their conversion (a copy of their own)."""
    bindings = [b for block in func.body.blocks for b in block.bindings]
    read_after = [set(relax.analysis.free_vars(func.body.body))]  # read_after[-1 - i]: by bindings past i, or returned
    for binding in reversed(bindings[1:]):
        read_after.append(read_after[-1] | set(relax.analysis.free_vars(binding.value)))
    changed = True
    while changed:
        changed = False
        for i, binding in enumerate(bindings):
            if _op(binding.value) != "relax.call_tir_inplace":
                continue
            args = list(binding.value.args[1].fields)
            for index in binding.value.attrs.inplace_indices:
                written = args[int(index)]
                tensor = remap.get(written, written)
                later = read_after[-1 - i] | {a for j, a in enumerate(args) if j != int(index)}
                clash = [var for var in later if remap.get(var, var).same_as(tensor) and not var.same_as(written)]
                if clash:
                    for var in ([written] if written in remap else clash):
                        changed |= remap.pop(var, None) is not None
    return remap


@tvm.transform.module_pass(opt_level=0, name="ChainLayouts")
def layout_chain_pass(mod: tvm.IRModule, _ctx: object) -> tvm.IRModule:
    bb = relax.BlockBuilder(mod)
    kernels = _Kernels(bb)
    for gvar, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            for layout in LAYOUTS:
                func = _drop_round_trips(swap_calls(func, _in_layout(func, kernels, layout)), layout)
            bb.update_func(gvar, func)
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

