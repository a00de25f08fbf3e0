"""The layout `amx` kernels take and give (NHWC, bf16 bits as uint16) and the way back to the model's.

`own_kernel_pass` puts an AMX conv between a conversion in (float32 NCHW -> NHWC bf16) and one out,
so it fits anywhere; `round_trip_pass` then drops each conversion out that goes straight back in, so
a chain of AMX convs (a ResNet's blocks, the residuals included) hands its activations on in NHWC
bf16 and converts only where something else reads them. Out and back in is exact: bf16 widened to
float32 and rounded back is the same bf16. Rewrites Relax bindings only; invalidates nothing else.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.script import tirx as T

from sparsefx.backends.tvm.function_pass import function_pass
from sparsefx.backends.tvm.sparse.kernels import LANES, OPAQUE

TO_TILES, FROM_TILES = "amx_nhwc", "amx_nchw"  # names start with the kind `CompiledModel.profile` files them under


def to_bf16(value):  # noqa: ANN001, ANN201 (TIR expressions): float32 -> bf16 bits, rounded to nearest even
    b = T.reinterpret("uint32", value)
    return T.Cast("uint16", T.shift_right(b + T.uint32(0x7FFF) + T.bitwise_and(T.shift_right(b, T.uint32(16)),
                                                                             T.uint32(1)), T.uint32(16)))


def to_float(bits):  # noqa: ANN001, ANN201 (TIR expressions): bf16 bits -> float32, exactly
    return T.reinterpret("float32", T.shift_left(T.Cast("uint32", bits), T.uint32(16)))


def name(direction: str, shape: tuple[int, ...]) -> str:
    return f"{direction}_{'x'.join(map(str, shape))}"


def to_tiles(shape: tuple[int, int, int, int]) -> tvm.tirx.PrimFunc:
    """float32 (n, c, h, w) -> bf16 bits (n, h, w, c)."""
    n, c, h, w = shape
    lanes = LANES if c % LANES == 0 else 1

    @T.prim_func(private=True, s_tir=True)
    def f(x: T.Buffer(shape, "float32"), out: T.Buffer((n, h, w, c), "uint16")):
        with T.sblock("root"):  # TVM's reshape check (RewriteDataflowReshape) wants a root block
            for i in T.parallel(n * h):
                for col in range(w):
                    for c0 in range(c // lanes):
                        for lane in T.vectorized(lanes):
                            out[i // h, i % h, col, c0 * lanes + lane] = to_bf16(x[i // h, c0 * lanes + lane, i % h, col])

    return f.with_attr({"op_pattern": OPAQUE, "tirx.is_scheduled": True, "tirx.noalias": True})


def from_tiles(shape: tuple[int, int, int, int]) -> tvm.tirx.PrimFunc:
    """bf16 bits (n, h, w, c) -> float32 (n, c, h, w)."""
    n, c, h, w = shape
    lanes = LANES if w % LANES == 0 else 1

    @T.prim_func(private=True, s_tir=True)
    def f(x: T.Buffer((n, h, w, c), "uint16"), out: T.Buffer(shape, "float32")):
        with T.sblock("root"):
            for i in T.parallel(n * c):
                for row in range(h):
                    for c0 in range(w // lanes):
                        for lane in T.vectorized(lanes):
                            out[i // c, i % c, row, c0 * lanes + lane] = to_float(x[i // c, row, c0 * lanes + lane, i % c])

    return f.with_attr({"op_pattern": OPAQUE, "tirx.is_scheduled": True, "tirx.noalias": True})


def _callee(value: relax.Expr) -> str:
    """The name of the TIR function a call_tir binding calls ("" for anything else)."""
    if isinstance(value, relax.Call) and getattr(value.op, "name", None) == "relax.call_tir":
        return value.args[0].name_hint
    return ""


def _drop_round_trips(func: relax.Function) -> relax.Function:
    values = relax.analysis.get_var2val(func)
    remap = {}
    for var, value in values.items():
        if _callee(value).startswith(TO_TILES):
            source = value.args[1].fields[0]
            if _callee(values.get(source)).startswith(FROM_TILES):
                remap[var] = values[source].args[1].fields[0]
    if not remap:
        return func
    return relax.analysis.remove_all_unused(_Remap(remap).visit_expr(func))


@relax.expr_functor.mutator
class _Remap(relax.PyExprMutator):
    def __init__(self, remap: dict[relax.Var, relax.Expr]) -> None:
        super().__init__()
        self.remap = remap

    def visit_dataflow_var_(self, var: relax.Var) -> relax.Expr:
        return self.remap.get(var, var)

    def visit_var_(self, var: relax.Var) -> relax.Expr:
        return self.remap.get(var, var)


round_trip_pass = function_pass("DropTileRoundTrips", _drop_round_trips)
