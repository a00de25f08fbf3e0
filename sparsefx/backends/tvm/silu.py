"""Relax pass: `x * sigmoid(x)` becomes `silu(x)`.

Models that write SiLU out (Ultralytics' YOLO through torch.export) reach Relax as a sigmoid and a
multiply. Named as silu, a convolution's dispatch fuses it as the conv's epilogue, as it does
nn.SiLU's (`dispatch/patterns.py`); left as two ops it ran as a separate element-wise kernel after
every conv of a pruned YOLOv8n (1-2 ms each at 80x80 and above, one thread).
"""

from __future__ import annotations

from tvm import relax
from tvm.relax.dpl import is_op, rewrite_call, wildcard

from sparsefx.backends.tvm.function_pass import function_pass


def _rewritten(func: relax.Function) -> relax.Function:
    x = wildcard()
    sigmoid = is_op("relax.sigmoid")(x)
    pattern = is_op("relax.multiply")(x, sigmoid) | is_op("relax.multiply")(sigmoid, x)

    def rewriter(expr: relax.Expr, matches: dict) -> relax.Expr:
        # compared as the call's own arguments: the matcher resolves `x` through its binding
        # (lv1[0] for the var lv2 both ops read), so matches[x] is not the sigmoid's argument
        inner = matches[sigmoid].args[0]
        if not any(arg.same_as(inner) for arg in expr.args):  # x * sigmoid(y): a gate, not SiLU
            return expr
        return relax.op.nn.silu(inner)

    return rewrite_call(pattern, rewriter, func)


silu_pass = function_pass("FuseSiLU", _rewritten)
