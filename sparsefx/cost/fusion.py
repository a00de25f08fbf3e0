"""Which kernels run inside others, as data the fx latency pass reads (`cost.latency.analyze_fusion`).

A backend says what its compiled model fuses, and the latency pass prices the model that way:
- a convolution's epilogue absorbs, in this order, its bias (BN folds into it), one residual add
  when `residual`, and one activation among `activations`;
- `scale_fold(conv)`: whether a conv whose input is scaled per image and channel (squeeze-and-
  excitation's `x * s`, s of shape (n, c, 1, 1)) takes the scale in, so the multiply costs nothing
  of its own;
- `layout(conv)`: (reads, writes), whether the conv's kernel reads its input and writes its output in
  an activation layout of the backend's own, so its neighbours outside it pay conversions (`cost.layouts`).
`EPILOGUE_RULES` is what any backend running a conv with a fused epilogue does; the TVM backend's
rules (`planning.pricing.rules`) add its squeeze-excite fold and, in float32, its blocked layout
(`backends.tvm.fusion`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sparsefx.cost.kernel import Kernel


@dataclass(frozen=True)
class FusionRules:
    activations: tuple[str, ...] = ("relu", "relu6", "silu")
    residual: bool = True
    scale_fold: Callable[[Kernel], bool] | None = None
    layout: Callable[[Kernel], tuple[bool, bool]] | None = None


EPILOGUE_RULES = FusionRules()
