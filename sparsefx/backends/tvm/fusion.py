"""The TVM backend's fusion beyond any backend's conv epilogue, for the latency pass (`planning.pricing.RULES`).

`dispatch.table.epilogue_pass` keeps a conv's bias, residual add and ReLU/ReLU6/SiLU in the call to
PyTorch, and `kernels.registry.own_kernel_pass` fuses the same into sparsefx's kernels; it also folds
squeeze-and-excitation's per-channel scale into a 1x1 conv on the `pointwise` kernel (the 'scaled'
variant), so the multiply before such a conv costs nothing of its own. The fold is read off the conv's
shape (where `pointwise` can run it); the dispatch may still pick PyTorch for that conv, and the
multiply then runs as an element-wise kernel the latency pass does not price.
"""

from __future__ import annotations

from sparsefx.backends.tvm.kernels import pointwise
from sparsefx.cost.kernel import Kernel


def folds_scale(conv: Kernel) -> bool:
    """Whether `own_kernel_pass` can fold an input scale into this conv (the `pointwise` kernel runs it)."""
    return conv.op == "conv2d" and pointwise.supported(conv.conv_attrs, conv.shapes)
