"""Import cleanup pass: a matmul against a 2-D operand broadcast to the batch becomes a plain matmul.

torch.export lowers `linear` on a non-contiguous 3-D input (nn.MultiheadAttention with
batch_first=True, as in torchvision's ViT) to `bmm` against the weight expanded to the batch:
`matmul(x, broadcast_to(W.T, (197, 768, 2304)))`. FoldConstant then materialises 197 copies of the
weight (1.4 GB for ViT-B/16's QKV projection), which made the dense model 2.8x slower than eager at
batch 8 and its compile take minutes. matmul broadcasts a 2-D operand itself, with the same result.
"""

from __future__ import annotations

from tvm import relax
from tvm.relax.dpl import is_op, rewrite_call, wildcard

from sparsefx.backends.tvm.function_pass import function_pass


def _shape(expr: relax.Expr) -> list[int] | None:
    try:
        return [int(d) for d in expr.ty.shape]
    except (TypeError, AttributeError):
        return None


def _unbroadcast(func: relax.Function) -> relax.Function:
    lhs, rhs = wildcard(), wildcard()
    broadcast = is_op("relax.broadcast_to")(rhs, wildcard())
    pattern = is_op("relax.matmul")(lhs, broadcast)

    def rewriter(expr: relax.Expr, matches: dict) -> relax.Expr:
        a, b, shape = _shape(matches[lhs]), _shape(matches[rhs]), _shape(matches[broadcast])
        if a is None or b is None or shape is None or len(b) != 2 or b != shape[-2:] or a[:-2] != shape[:-2]:
            return expr
        return relax.op.matmul(matches[lhs], matches[rhs], out_dtype=expr.attrs.out_dtype)

    return rewrite_call(pattern, rewriter, func)


unbroadcast_matmul = function_pass("UnbroadcastMatmul", _unbroadcast)
