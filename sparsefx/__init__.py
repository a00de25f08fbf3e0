"""sparsefx: compiler-pass sparsity optimizer for PyTorch."""

from sparsefx.capture.trace import trace
from sparsefx.channels.prune import Analysis, analyze, count_macs, count_params, prune
from sparsefx.errors import PruneError, SparsefxError, TraceError
from sparsefx.planning.measured import plan_measured
from sparsefx.planning.plan import Plan, PlanError
from sparsefx.planning.planner import apply, plan

__all__ = [
    "Analysis", "Evaluation", "Plan", "PlanError", "apply", "plan", "plan_measured", "Gradual", "GradualPruner", "History", "Iterative", "MaskCallback", "OneShot",
    "PruneError", "SparseConv2d", "SparseLinear", "SparsefxError", "Sparsity", "TraceError", "analyze", "apply_masks", "block_mask",
    "compute_masks", "count_macs", "count_params", "cubic_sparsity", "evaluate", "export", "finetune", "load", "nm_mask", "prune",
    "remove_masks", "save", "sparsify", "to_sparse", "trace", "unstructured_mask", "weight_density",
    "DSD", "SET", "LotteryTicket", "RegrowthError", "RigL",
]
__version__ = "0.1.0"

# Saving and loading pruned models without pickle, exports (issue 23).
from sparsefx.backends.export import export  # noqa: E402
from sparsefx.io import load, save  # noqa: E402

# Recovery and evaluation (issue 6): masks, schedules, fine-tuning, per-class evaluation.
from sparsefx.recovery.evaluate import Evaluation, evaluate  # noqa: E402
from sparsefx.recovery.finetune import History, finetune  # noqa: E402
from sparsefx.recovery.regrowth import DSD, SET, LotteryTicket, RegrowthError, RigL  # noqa: E402
from sparsefx.recovery.schedules import Gradual, GradualPruner, Iterative, OneShot, cubic_sparsity  # noqa: E402
from sparsefx.sparse.layers import SparseConv2d, SparseLinear  # noqa: E402  (sparse layers: issue 5)
from sparsefx.sparse.masks import (
    MaskCallback,
    Sparsity,
    apply_masks,
    block_mask,
    compute_masks,
    nm_mask,
    remove_masks,
    unstructured_mask,
    weight_density,
)
from sparsefx.sparse.sparsify import sparsify, to_sparse  # noqa: E402


def __getattr__(name: str) -> object:
    """`sparsefx.compile` and `sparsefx.CompiledModel` load TVM on first use only (so does `load`
    of a compiled artifact)."""
    if name in ("compile", "CompiledModel"):
        from sparsefx.backends import tvm as backend

        return getattr(backend, name)
    raise AttributeError(f"module 'sparsefx' has no attribute {name!r}")
