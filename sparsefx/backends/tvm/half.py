"""Half precision for CUDA targets: Relax rewrites run after the fp32 graph clean-up.

The compiled function keeps float32 inputs and outputs and casts inside, so callers, `CompiledModel`
and runtime bundles pass numpy/torch float32 as before (numpy has no bfloat16). Convolutions and
matmuls take half inputs and accumulate in float32 (`ToMixedPrecision`); softmax and other ops it
keeps in fp32 stay so. DLight tensorizes only float16 matmuls (WMMA, sm_70+): fp16 runs its matmuls
on tensor cores, bf16 halves the memory traffic but its matmuls run on CUDA cores.

`conv_to_matmul` turns ungrouped 2-D convolutions into matmuls (1x1 stride 1 directly, others via
im2col) because DLight has no conv rule: its Fallback schedules convs without tensor cores.
"""

from __future__ import annotations

import ml_dtypes
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

# ops whose TOPI compute takes float32 and float16 only: they run on bf16 values cast to float32 and back
FP32_ONLY = ("relax.nn.layer_norm", "relax.nn.group_norm", "relax.nn.rms_norm")


def half_passes(precision: str) -> list[tuple[str, tvm.transform.Pass]]:
    """The named passes that run a float32 module in `precision` ('fp16' or 'bf16')."""
    passes = [("ConvToMatmul", conv_to_matmul_pass()), ("ClipToMinMax", rewrite_pass(_ClipToMinMax, "ClipToMinMax")),
              ("ToMixedPrecision", relax.transform.ToMixedPrecision(out_dtype="float32"))]
    if precision == "bf16":
        passes.append(("Float16ToBFloat16", float16_to_bfloat16_pass()))
    # folds the weights' casts now: the library stores half weights, not fp32 ones cast per call
    return passes + [("FoldConstant", relax.transform.FoldConstant())]


@mutator
class _Float16ToBFloat16(PyExprMutator):
    """Every float16 cast ToMixedPrecision inserted becomes a bfloat16 one (it only knows float16);
    the ops between them take their dtype from their inputs when re-normalised."""

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = self.visit_expr_post_order(call)
        name = call.op.name if isinstance(call.op, tvm.ir.Op) else ""
        if name == "relax.astype" and str(call.attrs.dtype) == "float16":
            return relax.op.astype(call.args[0], "bfloat16")
        if name in FP32_ONLY and str(call.args[0].ty.dtype) == "bfloat16":
            emit = self.builder_.emit
            args = [emit(relax.op.astype(a, "float32")) if str(a.ty.dtype) == "bfloat16" else a for a in call.args]
            return relax.op.astype(emit(relax.Call(call.op, args, call.attrs)), "bfloat16")
        return call

    def visit_generic_const_(self, const: tvm.ir.GenericConst) -> relax.Expr:
        if str(const.value.dtype) != "float16":
            return const
        return relax.const(const.value.numpy().astype(ml_dtypes.bfloat16))


def float16_to_bfloat16_pass() -> tvm.transform.Pass:
    return rewrite_pass(_Float16ToBFloat16, "Float16ToBFloat16")


@mutator
class _ClipToMinMax(PyExprMutator):
    """clip(x, lo, hi) (ReLU6) as maximum/minimum with tensor constants: ToMixedPrecision stops at
    clip's scalar (PrimValue) bounds ("Expected TensorType, but got T.int64")."""

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = self.visit_expr_post_order(call)
        if not isinstance(call.op, tvm.ir.Op) or call.op.name != "relax.clip":
            return call
        x, low, high = call.args
        dtype = str(x.ty.dtype)
        bounds = [relax.const(float(b.value), dtype) for b in (low, high)]  # IntImm or FloatImm
        return relax.op.minimum(self.builder_.emit(relax.op.maximum(x, bounds[0])), bounds[1])


def rewrite_pass(rewriter_class: type, name: str) -> tvm.transform.Pass:
    """A module pass running the mutator `rewriter_class` over every Relax function."""
    @tvm.transform.module_pass(opt_level=0, name=name)
    def apply(mod: tvm.IRModule, _ctx: object) -> tvm.IRModule:
        rewriter = rewriter_class(mod)
        for gv, func in mod.functions.items():
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        return rewriter.builder_.get()

    return apply


@mutator
class _ConvToMatmul(PyExprMutator):
    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = self.visit_expr_post_order(call)
        if not isinstance(call.op, tvm.ir.Op) or call.op.name != "relax.nn.conv2d":
            return call
        rewritten = conv2d_as_matmul(self.builder_, call)
        return call if rewritten is None else rewritten


def conv2d_as_matmul(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr | None:
    """`call` (an NCHW/OIHW conv2d of static shape, one group) as a matmul over channels x kernel
    positions; None for anything else (grouped and depthwise convs stay convs)."""
    attrs = call.attrs
    x, w = call.args
    if attrs.groups != 1 or attrs.data_layout != "NCHW" or attrs.kernel_layout != "OIHW" \
            or attrs.out_layout not in ("NCHW", ""):
        return None
    try:
        n, c, h, wd = (int(d) for d in x.ty.shape)
        o, _, kh, kw = (int(d) for d in w.ty.shape)
    except (TypeError, ValueError, AttributeError):
        return None  # a symbolic shape
    sh, sw = (int(s) for s in attrs.strides)
    dh, dw = (int(d) for d in attrs.dilation)
    top, left, bottom, right = (int(p) for p in attrs.padding)
    oh = (h + top + bottom - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + left + right - dw * (kw - 1) - 1) // sw + 1
    out_dtype = str(attrs.out_dtype) if str(attrs.out_dtype) not in ("", "void") else str(x.ty.dtype)
    op, emit = relax.op, bb.emit
    if (kh, kw, sh, sw, top, left, bottom, right) == (1, 1, 1, 1, 0, 0, 0, 0):
        columns = emit(op.reshape(emit(op.permute_dims(x, [0, 2, 3, 1])), [n * h * wd, c]))
    else:
        if top or left or bottom or right:
            x = emit(op.nn.pad(x, [0, 0, 0, 0, top, bottom, left, right]))
        # one strided window per kernel position, (N, C, OH, OW) each, stacked as (N, C, KH*KW, OH, OW):
        # the order of OIHW weights reshaped to (O, C*KH*KW)
        windows = [emit(op.strided_slice(x, [2, 3], [i * dh, j * dw],
                                         [i * dh + sh * (oh - 1) + 1, j * dw + sw * (ow - 1) + 1], [sh, sw]))
                   for i in range(kh) for j in range(kw)]
        patches = emit(op.stack(windows, axis=2) if len(windows) > 1 else op.expand_dims(windows[0], 2))
        columns = emit(op.reshape(emit(op.permute_dims(patches, [0, 3, 4, 1, 2])), [n * oh * ow, c * kh * kw]))
    weight = emit(op.permute_dims(emit(op.reshape(w, [o, c * kh * kw])), [1, 0]))
    out = emit(op.matmul(columns, weight, out_dtype=out_dtype))
    return op.permute_dims(emit(op.reshape(out, [n, oh, ow, o])), [0, 3, 1, 2])


def conv_to_matmul_pass() -> tvm.transform.Pass:
    """Ungrouped NCHW conv2d -> (im2col +) matmul; target independent, exact up to summation order."""
    return rewrite_pass(_ConvToMatmul, "ConvToMatmul")
