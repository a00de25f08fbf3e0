"""Relax pass: Relax's attention op written out as two matmuls and a softmax.

The importer keeps PyTorch's scaled-dot-product attention as one `attention` op so that the CPU
dispatch can run it on PyTorch's fused SDPA or sparsefx's attention kernel (`importer._attention`,
`kernels.attention`). Where nothing will (CUDA targets, `dispatch=False`, and with `"own"` the
attentions that kernel does not take), TVM would lower it to one generic TIR kernel, which DLight's
matmul rules (tensor cores in fp16) and the CPU's default schedules do not know; written out, the
matmuls and the softmax compile as they did before attention was kept whole.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import tvm
from tvm import relax

from sparsefx.backends.tvm.function_pass import function_pass

ATTENTION_OPS = ("relax.nn.attention", "relax.nn.attention_bias")


def expanded(call: relax.Call) -> relax.Expr:
    """softmax(q k^T * scale + bias, causal from the top left) v, in Relax's (batch, seq, heads, dim) layout."""
    q, k, v = call.args[:3]
    d, s, s_kv = int(q.ty.shape[3]), int(q.ty.shape[1]), int(k.ty.shape[1])
    a = call.attrs
    scale = float(a.scale.value) if a.scale is not None else 1 / math.sqrt(d)
    dtype = q.ty.dtype
    scores = relax.op.matmul(relax.op.permute_dims(q, [0, 2, 1, 3]), relax.op.permute_dims(k, [0, 2, 3, 1]))
    scores = relax.op.multiply(scores, relax.const(scale, dtype))
    if len(call.args) > 3:
        scores = relax.op.add(scores, call.args[3])
    if a.causal_mask is not None:
        keep = relax.const(np.tril(np.ones((s, s_kv), dtype=bool)))
        scores = relax.op.where(keep, scores, relax.const(float("-inf"), dtype))
    out = relax.op.matmul(relax.op.nn.softmax(scores, axis=-1), relax.op.permute_dims(v, [0, 2, 1, 3]))
    return relax.op.permute_dims(out, [0, 2, 1, 3])


def expand_attention_pass(kept: Callable[[relax.Call], bool] = lambda call: False) -> tvm.transform.Pass:
    """Every attention call written out, but those `kept` (an own kernel runs them)."""

    def rewritten(func: relax.Function) -> relax.Function:
        @relax.expr_functor.mutator
        class _Expand(relax.PyExprMutator):
            def visit_call_(self, call: relax.Call) -> relax.Expr:
                call = super().visit_call_(call)
                name = getattr(call.op, "name", "")
                if name not in ATTENTION_OPS or call.attrs.window_size is not None or kept(call):
                    return call
                return self.builder_.normalize(expanded(call))

        return _Expand().visit_expr(func)

    return function_pass("ExpandAttention", rewritten)
