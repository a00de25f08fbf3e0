"""A `Kernel` as a Relax function on its own, for timing it as TIR (on this host or over RPC)."""

from __future__ import annotations

from tvm import relax

from sparsefx.backends.tvm.dispatch.math_ops import BY_NAME
from sparsefx.cost.kernel import Kernel

ACTIVATIONS = {"none": lambda t: t, "relu": relax.op.nn.relu, "relu6": lambda t: relax.op.clip(t, 0.0, 6.0),
               "silu": relax.op.nn.silu}


def operand_shapes(kernel: Kernel) -> list[tuple[int, ...]]:
    """The arguments' shapes: a conv's input, weight, per-channel bias (BN folds into it) and residual
    where it adds one; a matmul's two operands; a math op's inputs. The weight, where there is one, is
    the second."""
    if kernel.op == "conv2d":
        x, w, out = kernel.shapes
        return [x, w, (1, w[0], 1, 1)] + ([out] if kernel.epilogue[1] else [])
    if kernel.op == "matmul":
        return list(kernel.shapes[:2])
    return BY_NAME[kernel.op].operands(kernel.dims, kernel.attrs)


def emit_kernel(bb: relax.BlockBuilder, name: str, kernel: Kernel) -> list[tuple[int, ...]]:
    """Add `kernel` to `bb` as function `name` (a conv with its bias and epilogue fused, as the
    model's TIR runs it); returns its arguments' shapes."""
    shapes = operand_shapes(kernel)
    params = [relax.Var(f"a{i}", relax.TensorType(s, "float32")) for i, s in enumerate(shapes)]
    with bb.function(name, params):
        with bb.dataflow():
            if kernel.op == "conv2d":
                sh, sw, ph, pw, dh, dw, groups = kernel.conv_attrs
                act, residual = kernel.epilogue
                out = relax.op.add(relax.op.nn.conv2d(params[0], params[1], (sh, sw), (ph, pw, ph, pw), (dh, dw), groups),
                                   params[2])
                out = ACTIVATIONS[act](relax.op.add(out, params[3]) if residual else out)
            elif kernel.op == "matmul":
                out = relax.op.matmul(params[0], params[1])
            else:
                out = BY_NAME[kernel.op].emit(params, kernel.attrs)
            result = bb.emit_output(bb.emit(out))
        bb.emit_func_output(result)
    return shapes
