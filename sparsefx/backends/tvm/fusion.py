"""The TVM backend's fusion beyond any backend's conv epilogue, for the latency pass (`planning.pricing.RULES`).

`dispatch.table.epilogue_pass` keeps a conv's bias, residual add and ReLU/ReLU6/SiLU in the call to
PyTorch, and `kernels.registry.own_kernel_pass` fuses the same into sparsefx's kernels; it also folds
squeeze-and-excitation's per-channel scale into a 1x1 conv on the `pointwise` kernel (the 'scaled'
variant), so the multiply before such a conv costs nothing of its own. The fold is read off the conv's
shape (where `pointwise` can run it); the dispatch may still pick PyTorch for that conv, and the
multiply then runs as an element-wise kernel the latency pass does not price. In float32 the blocked
kernels keep activations in a layout of their own (`blocked_layout`): where a conv runs there, read off
its shape as the registry reads it, the latency pass prices the conversions its neighbours need.
"""

from __future__ import annotations

from sparsefx.backends.tvm.kernels import pointwise
from sparsefx.backends.tvm.kernels import registry as own_kernels
from sparsefx.cost.kernel import Kernel


def folds_scale(conv: Kernel) -> bool:
    """Whether `own_kernel_pass` can fold an input scale into this conv (the `pointwise` kernel runs it)."""
    return conv.op == "conv2d" and pointwise.supported(conv.conv_attrs, conv.shapes)


def blocked_layout(conv: Kernel) -> tuple[bool, bool]:
    """(reads, writes): whether the float32 kernel the registry picks for this conv reads its input, and
    writes its output and residual, in the blocked layout (`kernels.layout_chain`); a stem reads its
    image as it is (`nchw_input`). The latency pass charges a conversion where a neighbour does not
    (`cost.layouts`)."""
    found = own_kernels.own_kernel(conv.bare, "fp32")
    if found is None or found[0] not in own_kernels.BLOCKED_KINDS:
        return False, False
    return not getattr(found[1], "nchw_input", False), True
