"""The cost model planning prices with: kernels timed by the TVM backend's timer, so the planner
prices the implementation the compiler's dispatch will pick (`cost.timing`).

On this host the timer starts from the dispatch table's earlier decisions (its pre-filter needs no
new TIR builds where the compiler already measured); with `rpc=("HOST:PORT", key)` kernels are
timed on the device a TVM RPC tracker serves under `key` (pure TIR, as a `dispatch=False` build
runs there), in a table of their own. GPU targets without RPC, and `measure=False`, price by the
roofline. On this host the latency pass fuses as the TVM backend does (`backends.tvm.fusion`).
"""

from __future__ import annotations

from pathlib import Path

from sparsefx.cost.model import CostModel
from sparsefx.target import resolve_target


def cost_model(target: object = "cpu", measure: bool = True, rpc: tuple[str, str] | None = None,
               path: Path | None = None) -> CostModel:
    spec = resolve_target(target)
    if not measure or (spec.is_gpu and rpc is None):
        return CostModel(spec, measure=False, path=path)
    # the TVM backend loads TVM, which `import sparsefx` must not: imported when a timer is needed
    if rpc is not None:
        from sparsefx.backends.tvm.measure.remote_kernels import RemoteTimer

        return CostModel(spec, path=path, timer=RemoteTimer(*rpc, spec))
    from sparsefx.backends.tvm.dispatch.table import DispatchTable, table_key
    from sparsefx.backends.tvm.fusion import RULES
    from sparsefx.backends.tvm.measure.host import HostTimer

    history = DispatchTable(table_key(spec, spec.cores)).entries.values()  # the cost model times at spec.cores threads
    return CostModel(spec, path=path, timer=HostTimer(spec, history=history), fusion=RULES)
