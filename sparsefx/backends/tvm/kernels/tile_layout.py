"""The layout `amx` kernels take and give (NHWC, bf16 bits as uint16) and the way back to the model's.

`own_kernel_pass` puts an AMX conv between a conversion in (float32 NCHW -> NHWC bf16) and one out,
so it fits anywhere; `round_trip_pass` then drops each conversion out that goes straight back in, so
a chain of AMX convs (a ResNet's blocks, the residuals included, and a max-pool between two of them,
run on NHWC bf16 here) hands its activations on in NHWC bf16 and converts only where something else
reads them. Out and back in is exact: bf16 widened to
float32 and rounded back is the same bf16. Rewrites Relax bindings only; invalidates nothing else.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.script import tirx as T

from sparsefx.backends.tvm.sparse.kernels import LANES, OPAQUE

TO_TILES, FROM_TILES = "amx_nhwc", "amx_nchw"  # names start with the kind `CompiledModel.profile` files them under
STEP = 32  # channels are stored in whole steps of a tile's reduction, zero past the tensor's own
FEW = 4  # channel counts stored as they are: a stem's input, whose window columns fold into one step
CONVERT = "llvm.x86.avx512bf16.cvtneps2bf16.512"  # 16 float32 -> 16 bf16 (AMX CPUs all have AVX512-BF16)


def stored(channels: int) -> int:
    """The channels a tensor of `channels` has in this layout."""
    return channels if channels <= FEW else -(-channels // STEP) * STEP


def to_bf16(value):  # noqa: ANN001, ANN201 (TIR expressions): float32 -> bf16 bits, rounded to nearest even
    b = T.reinterpret("uint32", value)
    return T.Cast("uint16", T.shift_right(b + T.uint32(0x7FFF) + T.bitwise_and(T.shift_right(b, T.uint32(16)),
                                                                             T.uint32(1)), T.uint32(16)))


def to_bf16_vector(values):  # noqa: ANN001, ANN201 (TIR expressions): float32x16 -> bf16 bits x16, one instruction
    """AVX512-BF16's vcvtneps2bf16 (round to nearest even, as `to_bf16`): TIR's own bf16 casts, and
    `to_bf16`, take five integer instructions a vector."""
    return T.reinterpret(f"uint16x{LANES}", T.call_llvm_pure_intrin(f"bfloat16x{LANES}", CONVERT, values))


def to_float(bits):  # noqa: ANN001, ANN201 (TIR expressions): bf16 bits -> float32, exactly
    return T.reinterpret("float32", T.shift_left(T.Cast("uint32", bits), T.uint32(16)))


def name(direction: str, shape: tuple[int, ...]) -> str:
    return f"{direction}_{'x'.join(map(str, shape))}"


def tiled(shape: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """The shape of an NCHW tensor in this layout."""
    n, c, h, w = shape
    return (n, h, w, stored(c))


def to_tiles(shape: tuple[int, int, int, int]) -> tvm.tirx.PrimFunc:
    """float32 (n, c, h, w) -> bf16 bits (n, h, w, stored c), zero past c."""
    n, c, h, w = shape
    cs = stored(c)
    lanes = LANES if cs % LANES == 0 else 1

    @T.prim_func(private=True, s_tir=True)
    def f(x: T.Buffer(shape, "float32"), out: T.Buffer((n, h, w, cs), "uint16")):
        with T.sblock("root"):  # TVM's reshape check (RewriteDataflowReshape) wants a root block
            for i in T.parallel(n * h):
                for col in range(w):
                    for c0 in range(cs // lanes):
                        for lane in T.vectorized(lanes):
                            out[i // h, i % h, col, c0 * lanes + lane] = T.if_then_else(
                                c0 * lanes + lane < c, to_bf16(x[i // h, T.min(c0 * lanes + lane, c - 1), i % h, col]),
                                T.uint16(0))

    return f.with_attr({"op_pattern": OPAQUE, "tirx.is_scheduled": True, "tirx.noalias": True})


def from_tiles(shape: tuple[int, int, int, int]) -> tvm.tirx.PrimFunc:
    """bf16 bits (n, h, w, stored c) -> float32 (n, c, h, w)."""
    n, c, h, w = shape
    cs = stored(c)
    lanes = LANES if w % LANES == 0 else 1

    @T.prim_func(private=True, s_tir=True)
    def f(x: T.Buffer((n, h, w, cs), "uint16"), out: T.Buffer(shape, "float32")):
        with T.sblock("root"):
            for i in T.parallel(n * c):
                for row in range(h):
                    for c0 in range(w // lanes):
                        for lane in T.vectorized(lanes):
                            out[i // c, i % c, row, c0 * lanes + lane] = to_float(x[i // c, row, c0 * lanes + lane, i % c])

    return f.with_attr({"op_pattern": OPAQUE, "tirx.is_scheduled": True, "tirx.noalias": True})


def max_pool(shape: tuple[int, int, int, int], out_hw: tuple[int, int], window: int, stride: int,
             padding: int) -> tvm.tirx.PrimFunc:
    """max_pool2d over NHWC bf16 bits (exact: the max of bf16 values is one of them), 16 channels a vector."""
    n, h, w, c = shape
    ho, wo = out_hw
    lanes = LANES if c % LANES == 0 else 1

    def biggest(x, i, col, ch):  # noqa: ANN001, ANN202 (TIR expressions): the window's max, -inf off the image
        best = T.float32(float("-inf"))
        for kh in range(window):
            for kw in range(window):
                ih, iw = i % ho * stride - padding + kh, col * stride - padding + kw
                value = to_float(x[i // ho, T.min(T.max(ih, 0), h - 1), T.min(T.max(iw, 0), w - 1), ch])
                best = T.max(best, T.if_then_else(tvm.tirx.all(0 <= ih, ih < h, 0 <= iw, iw < w), value,
                                                  T.float32(float("-inf"))))
        return best

    @T.prim_func(private=True, s_tir=True)
    def f(x: T.Buffer(shape, "uint16"), out: T.Buffer((n, ho, wo, c), "uint16")):
        with T.sblock("root"):
            for i in T.parallel(n * ho):
                for col in range(wo):
                    for c0 in range(c // lanes):
                        for lane in T.vectorized(lanes):
                            out[i // ho, i % ho, col, c0 * lanes + lane] = to_bf16(biggest(x, i, col, c0 * lanes + lane))

    return f.with_attr({"op_pattern": OPAQUE, "tirx.is_scheduled": True, "tirx.noalias": True})


def _callee(value: relax.Expr | None) -> str:
    """The name of the TIR function a call_tir binding calls ("" for anything else)."""
    if isinstance(value, relax.Call) and getattr(value.op, "name", None) == "relax.call_tir":
        return value.args[0].name_hint
    return ""


def _source(value: relax.Expr) -> relax.Expr:
    """A conversion's (call_tir's) argument."""
    return value.args[1].fields[0]


def _pool_window(call: relax.Expr) -> tuple[int, int, int] | None:
    """(window, stride, padding) of a square NCHW max_pool2d with equal padding and no dilation, else None."""
    if not (isinstance(call, relax.Call) and getattr(call.op, "name", None) == "relax.nn.max_pool2d"):
        return None
    a = call.attrs
    (kh, kw), (sh, sw), pads, (dh, dw) = ([int(v) for v in vs] for vs in (a.pool_size, a.strides, a.padding, a.dilation))
    if a.layout != "NCHW" or a.out_layout != "NCHW" or kh != kw or sh != sw or len(set(pads)) != 1 or (dh, dw) != (1, 1) \
            or a.ceil_mode:
        return None
    return kh, sh, pads[0]


def _tiled_pools(func: relax.Function) -> dict[relax.Call, tuple[relax.Expr, tuple[int, int, int]]]:
    """The max-pools that can run on NHWC bf16: their input comes out of the tile layout and only
    conversions back into it read their result. {pool call: (its tiled source, window)}."""
    values = relax.analysis.get_var2val(func)
    readers: dict[relax.Var, list[relax.Expr]] = {}
    for value in values.values():
        for var in relax.analysis.free_vars(value):
            readers.setdefault(var, []).append(value)
    returned = set(relax.analysis.free_vars(func.body.body))
    pools = {}
    for var, value in values.items():
        window = _pool_window(value)
        source = values.get(value.args[0]) if window else None
        if window and _callee(source).startswith(FROM_TILES) and var not in returned \
                and all(_callee(r).startswith(TO_TILES) for r in readers.get(var, [])):
            pools[value] = (_source(source), window)
    return pools


def _drop_round_trips(func: relax.Function) -> relax.Function:
    values = relax.analysis.get_var2val(func)
    remap = {var: _source(values[_source(value)]) for var, value in values.items()
             if _callee(value).startswith(TO_TILES) and _callee(values.get(_source(value))).startswith(FROM_TILES)}
    if not remap:
        return func
    return relax.analysis.remove_all_unused(_Remap(remap).visit_expr(func))


@tvm.transform.module_pass(opt_level=0, name="DropTileRoundTrips")
def round_trip_pass(mod: tvm.IRModule, _ctx: object) -> tvm.IRModule:
    """Max-pools between tiled convs (ResNet's stem) run on NHWC bf16, then every conversion out that
    goes straight back in is dropped."""
    bb = relax.BlockBuilder(mod)
    for gvar, func in list(mod.functions.items()):
        if not isinstance(func, relax.Function):
            continue
        swaps = {}
        for call, (source, (window, stride, padding)) in _tiled_pools(func).items():
            n, c, ho, wo = (int(v) for v in call.ty.shape)
            in_shape = tuple(int(v) for v in source.ty.shape)  # stored: (n, h, w, stored c)
            pool = bb.add_func(max_pool(in_shape, (ho, wo), window, stride, padding),
                               name(f"amx_max_pool_k{window}s{stride}p{padding}", in_shape))
            back = name(FROM_TILES, (n, c, ho, wo))
            back_gvar = next((g for g in bb.get().functions if g.name_hint == back), None) \
                or bb.add_func(from_tiles((n, c, ho, wo)), back)
            pooled = relax.call_tir(pool, [source], relax.TensorType((n, ho, wo, in_shape[3]), "uint16"))
            swaps[call] = relax.call_tir(back_gvar, [pooled], relax.TensorType((n, c, ho, wo), "float32"))
        if swaps:
            func = _Swap(swaps).visit_expr(func)
        bb.update_func(gvar, _drop_round_trips(func))
    return bb.get()


@relax.expr_functor.mutator
class _Swap(relax.PyExprMutator):
    def __init__(self, swaps: dict[relax.Call, relax.Expr]) -> None:
        super().__init__()
        self.swaps = swaps

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        swap = self.swaps.get(call)
        return self.visit_expr(swap) if swap is not None else self.visit_expr_post_order(call)


@relax.expr_functor.mutator
class _Remap(relax.PyExprMutator):
    def __init__(self, remap: dict[relax.Var, relax.Expr]) -> None:
        super().__init__()
        self.remap = remap

    def visit_dataflow_var_(self, var: relax.Var) -> relax.Expr:
        return self.remap.get(var, var)

    def visit_var_(self, var: relax.Var) -> relax.Expr:
        return self.remap.get(var, var)
