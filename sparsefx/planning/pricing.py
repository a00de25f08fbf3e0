"""The cost model planning prices with: kernels timed by the TVM backend's timer, so the planner
prices the implementation the compiler's dispatch will pick (`cost.timing`).

On this host the timer starts from the dispatch table's earlier decisions (its pre-filter needs no
new TIR builds where the compiler already measured); with `rpc=("HOST:PORT", key)` kernels are
timed on the device a TVM RPC tracker serves under `key` (pure TIR, as a `dispatch=False` build
runs there), in a table of their own. GPU targets without RPC, and `measure=False`, price by the
roofline. On this host the latency pass fuses as the TVM backend does (`RULES`), and in float32 prices
the conversions around its blocked layout (`FLOAT32_RULES`).

The TVM backend loads TVM, which `import sparsefx` must not, and which a plan whose kernels are
all in the cost table never needs (importing it took 2.1 s of a 6.3 s warm plan of ResNet-50):
it is imported when a kernel is first timed or a squeeze-excite fold first asked about.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from sparsefx.cost.fusion import EPILOGUE_RULES
from sparsefx.cost.kernel import Kernel
from sparsefx.cost.model import CostModel
from sparsefx.target import Target, resolve_target


def folds_scale(conv: Kernel) -> bool:
    """The TVM backend's squeeze-excite fold (`backends.tvm.fusion.folds_scale`)."""
    from sparsefx.backends.tvm.fusion import folds_scale as backend_folds_scale

    return backend_folds_scale(conv)


def blocked_layout(conv: Kernel) -> tuple[bool, bool]:
    """The TVM backend's float32 blocked layout (`backends.tvm.fusion.blocked_layout`)."""
    from sparsefx.backends.tvm.fusion import blocked_layout as backend_blocked_layout

    return backend_blocked_layout(conv)


RULES = replace(EPILOGUE_RULES, scale_fold=folds_scale)  # what the TVM backend fuses
FLOAT32_RULES = replace(RULES, layout=blocked_layout)  # and where its float32 kernels keep their layout


class HostTimerOnDemand:
    """The TVM backend's `HostTimer` for `spec` (`cost.timing.Timer`), made when first asked for
    anything, with the dispatch table's history (see the module doc)."""

    device = ""

    def __init__(self, spec: Target) -> None:
        self.spec = spec
        self.made: object | None = None

    def __getattr__(self, name: str) -> object:  # only reached for what this object lacks: the timer's
        if name.startswith("__") or name in ("spec", "made"):
            raise AttributeError(name)
        if self.made is None:
            from sparsefx.backends.tvm.dispatch.table import DispatchTable, table_key
            from sparsefx.backends.tvm.measure.host import HostTimer

            history = DispatchTable(table_key(self.spec, self.spec.cores)).entries.values()  # at spec.cores threads
            self.made = HostTimer(self.spec, history=history)
        return getattr(self.made, name)


def cost_model(target: object = "cpu", measure: bool = True, rpc: tuple[str, str] | None = None,
               path: Path | None = None) -> CostModel:
    spec = resolve_target(target)
    if not measure or (spec.is_gpu and rpc is None):
        return CostModel(spec, measure=False, path=path)
    if rpc is not None:
        from sparsefx.backends.tvm.measure.remote_kernels import RemoteTimer

        return CostModel(spec, path=path, timer=RemoteTimer(*rpc, spec))
    return CostModel(spec, path=path, timer=HostTimerOnDemand(spec),
                     fusion=FLOAT32_RULES if spec.precision == "fp32" else RULES)
