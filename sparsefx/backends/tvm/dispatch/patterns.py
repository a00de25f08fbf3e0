"""What the dispatch reads off Relax: the `Kernel` a call runs, and the conv and matmul epilogue patterns.

Shared by the dispatch table (which decides per kernel) and the passes that rewrite a decided conv
with its epilogue (`dispatch.table.epilogue_pass`, `kernels.registry.own_kernel_pass`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import tvm
from tvm import relax
from tvm.relax.dpl import CallPattern, is_const, is_op, wildcard

from sparsefx.backends.tvm.dispatch.math_ops import MATH_OPS
from sparsefx.cost.kernel import Kernel, conv2d_kernel, matmul_of_shapes


def shape_of(expr: relax.Expr) -> list[int]:
    return [int(d) for d in expr.ty.shape]


def kernel_of(call: relax.Call) -> Kernel | None:
    """The kernel a dispatchable call runs (a conv without its epilogue, a matmul, a math op), or
    None (unsupported attributes, symbolic shapes, other dtypes)."""
    if not isinstance(call.op, tvm.ir.Op) or str(getattr(call.ty, "dtype", "")) != "float32":
        return None
    try:
        shapes = [tuple(shape_of(arg)) for arg in call.args] + [tuple(shape_of(call))]
    except (TypeError, AttributeError):
        return None
    if call.op.name in MATH_OPS:
        attrs = MATH_OPS[call.op.name].attrs(call, len(shapes[0]))
        op = MATH_OPS[call.op.name]
        return None if attrs is None else Kernel(op.name, op.dims(shapes), attrs)
    if call.op.name == "relax.nn.conv2d":
        a = call.attrs
        pad = [int(v) for v in a.padding]
        if a.data_layout != "NCHW" or a.kernel_layout != "OIHW" or pad[0] != pad[2] or pad[1] != pad[3]:
            return None
        s, d = [int(v) for v in a.strides], [int(v) for v in a.dilation]
        return conv2d_kernel(shapes[0], shapes[2], int(a.groups), shapes[1][2:], (s[0], s[1]), (pad[0], pad[1]),
                             (d[0], d[1]), 0)
    if call.op.name == "relax.matmul" and len(shapes[0]) >= 2 and len(shapes[1]) >= 2:
        return matmul_of_shapes(*shapes, 0)
    return None


def per_channel(bias: relax.Expr, channels: int) -> bool:
    return shape_of(bias) in ([1, channels, 1, 1], [channels, 1, 1])


def activation_of(expr: relax.Expr) -> str | None:
    """The activation a matched epilogue ends in ('none' for a bare add); None for a clip other than ReLU6."""
    name = expr.op.name if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) else ""
    if name == "relax.clip":
        bounds = [getattr(a, "value", None) for a in expr.args[1:]]
        return "relu6" if [float(v) if v is not None else None for v in bounds] == [0.0, 6.0] else None
    return {"relax.nn.relu": "relu", "relax.nn.silu": "silu", "relax.nn.gelu": "gelu",
            "relax.nn.gelu_tanh": "gelu_tanh"}.get(name, "none")


@dataclass(frozen=True)
class EpiloguePatterns:
    """Patterns for a conv with its per-channel bias, a residual add and an activation after it, the
    longest first; `x`, `w`, `b`, `residual`, `conv` name their parts in a match."""

    x: object
    w: object
    b: object
    residual: object
    conv: object
    patterns: tuple


def epilogue_patterns(x: object = None) -> EpiloguePatterns:
    """The patterns over a conv whose input matches `x` (any expression by default)."""
    x, w, b, residual = x or wildcard(), is_const(), is_const(), wildcard()
    conv = is_op("relax.nn.conv2d")(x, w)
    biased = is_op("relax.add")(conv, b)
    # both orders of the add as patterns of their own, not one `|`: a match does not fall back to the
    # other order when the rewriter turns it down (ResNet-50's relu(conv3 on PyTorch + strided 1x1 on
    # sparsefx's kernel))
    summed = (is_op("relax.add")(biased, residual), is_op("relax.add")(residual, biased))
    activations = (is_op("relax.nn.relu"), is_op("relax.nn.silu"),
                   lambda t: is_op("relax.clip")(t, wildcard(), wildcard()))
    patterns = [act(inner) for inner in (*summed, biased) for act in activations] + [*summed, biased]
    return EpiloguePatterns(x, w, b, residual, conv, tuple(patterns))


@dataclass(frozen=True)
class MatmulEpiloguePatterns:
    """A matmul by a constant with a bias added and an activation after it (a Linear layer; a reshape
    may come between), the longest first; `x`, `w`, `b`, `matmul` name their parts in a match."""

    x: object
    w: object
    b: object
    matmul: object
    patterns: tuple


def matmul_epilogue_patterns() -> MatmulEpiloguePatterns:
    x, w, b = wildcard(), is_const(), is_const()
    product = is_op("relax.matmul")(x, w)
    biased = (is_op("relax.add")(product, b), is_op("relax.add")(b, product))
    # a Linear on 3-D input imports as a 2-D matmul reshaped back before the activation (ViT, BERT)
    reshaped = tuple(is_op("relax.reshape")(inner, wildcard()) for inner in biased)
    activations = [is_op(name) for name in ("relax.nn.relu", "relax.nn.gelu", "relax.nn.gelu_tanh")]
    return MatmulEpiloguePatterns(x, w, b, product, tuple(act(inner) for inner in biased + reshaped
                                                          for act in activations) + biased)


def shared_values(func: relax.Function) -> set:
    """The bound values whose variable more than one expression reads (or the function returns)."""
    reads: Counter = Counter()

    @relax.expr_functor.visitor
    class _Reads(relax.PyExprVisitor):
        def visit_var_(self, var: relax.Var) -> None:
            reads[var] += 1

        def visit_dataflow_var_(self, var: relax.DataflowVar) -> None:
            reads[var] += 1

    _Reads().visit_expr(func)
    return {value for var, value in relax.analysis.get_var2val(func).items() if reads[var] > 1}


def rewrite_fused(pattern: object, rewriter: Callable, func: relax.Function) -> relax.Function:
    """`rewrite_call` for fusing patterns: a match that would take in an intermediate value other
    expressions read too is left alone, since the fused call would compute that value a second time
    (MobileNetV2's `x + block(x)` matched the previous block's projection conv as the fused one, and
    that conv ran twice: once for the next block's expansion, once inside the add)."""
    shared = shared_values(func)

    def guarded(expr: relax.Expr, matches: dict) -> relax.Expr:
        # the calls the pattern spells out are taken in; its wildcards (inputs, a residual) are only read
        if any(isinstance(p, CallPattern) and not v.same_as(expr) and v in shared for p, v in matches.items()):
            return expr
        return rewriter(expr, matches)

    return rewrite_once(pattern, guarded, func)


def rewrite_once(pattern: object, rewriter: Callable, func: relax.Function) -> relax.Function:
    """`rewrite_call` in one pass over the bindings: each bound value the pattern matches (looking
    through bound variables) is replaced by what `rewriter(value, matches)` returns, and the values only
    the replaced ones read are dropped. TVM's `rewrite_call` repeats its pass until nothing changes and
    spent ~5 ms on every replacement: 2.5 s of a 10.5 s ResNet-50 compile went to the ~100 fusion
    rewrites, whose replacements (packed calls, own kernels) never match again."""
    var2val = relax.analysis.get_var2val(func)
    bound = {value: var for var, value in var2val.items()}

    @relax.expr_functor.mutator
    class _Once(relax.PyExprMutator):
        def visit_var_binding_(self, binding: relax.VarBinding) -> None:
            value = binding.value
            matches = pattern.extract_matched_expr(value, var2val) if isinstance(value, relax.Call) else None
            if matches is not None:  # what a wildcard matched is read through its variable, not computed again
                matches = {p: e if isinstance(p, CallPattern) else bound.get(e, e) for p, e in matches.items()}
            replaced = rewriter(value, matches) if matches is not None else value
            if replaced.same_as(value):
                super().visit_var_binding_(binding)
                return
            # the same variable, bound to the replacement (of the same type); its inputs as this pass left them
            replaced = self.builder_.normalize(self.visit_expr(replaced))
            self.builder_.emit_normalized(relax.VarBinding(binding.var, replaced))

    rewritten = _Once().visit_expr(func)
    return relax.analysis.remove_all_unused(rewritten)
