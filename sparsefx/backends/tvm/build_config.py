"""The pass configuration every CPU build of sparsefx's kernels and models runs under, so a kernel
is timed (`measure`, `kernels.workers`) as the same code the compiled model runs.

TIR's common-subexpression elimination is off: on sparsefx's scheduled kernels it only hoists index
arithmetic that LLVM's own passes hoist anyway, and it was the costliest TIR pass of a kernel build.
Blocked convs on a 2-core AMD EPYC, same process, built both ways: the 3x3 ones built 15-38% faster
(96 -> 112 at 28x28 0.82 -> 0.55 s, 128 -> 128 stride 2 0.53 -> 0.33 s) and ran as fast (within 2%,
each way), the 1x1 ones the same; a cold plan of ResNet-50 builds ~200 such kernels.
"""

from __future__ import annotations

import tvm

CONFIG = {"tirx.disable_cse_tir": True}


def build_context(target: tvm.target.Target) -> tvm.transform.PassContext:
    """A pass context for `tvm.compile` to `target`: with `CONFIG` on CPUs (GPU builds as TVM's
    defaults, not measured here), the default optimisation level."""
    return tvm.transform.PassContext(config=CONFIG if target.kind.name == "llvm" else {})
