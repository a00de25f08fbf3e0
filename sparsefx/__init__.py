"""sparsefx: structured pruning and weight sparsity for PyTorch, compiled through Apache TVM.

The public API, stage by stage: capture (`trace`), channel pruning (`analyze`, `prune`), weight
sparsity (masks, `sparsify`), cost-driven planning (`plan`, `apply`, `plan_measured`), recovery
(schedules, `finetune`, `evaluate`), saving (`save`, `load`, `export`) and the TVM backend
(`compile`, `CompiledModel`). TVM is imported on first use of the backend only.
"""

from sparsefx.backends.export import export
from sparsefx.capture.trace import trace
from sparsefx.channels.calibration import CalibrationError
from sparsefx.channels.depth import block_influence, prune_layers
from sparsefx.channels.moe import prune_experts
from sparsefx.channels.prune import Analysis, analyze, count_macs, count_params, prune
from sparsefx.errors import PruneError, SparsefxError, TraceError
from sparsefx.io import load, save
from sparsefx.planning.measured import plan_measured
from sparsefx.planning.plan import Plan, PlanError
from sparsefx.planning.planner import apply, plan
from sparsefx.recovery.compact import CompactLinear, CompactSET, densify
from sparsefx.recovery.evaluate import Evaluation, evaluate
from sparsefx.recovery.finetune import History, finetune
from sparsefx.recovery.regrowth import DSD, SET, GraNet, LotteryTicket, RegrowthError, RigL
from sparsefx.recovery.schedules import Gradual, GradualPruner, Iterative, OneShot, cubic_sparsity
from sparsefx.sparse.layers import SparseConv2d, SparseLinear
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
from sparsefx.sparse.sparsify import sparsify, to_sparse
from sparsefx.version import __version__

LAZY_BACKEND = ("CompiledModel", "compile")  # from sparsefx.backends.tvm, which imports TVM

__all__ = [
    "Analysis", "CalibrationError", "CompactLinear", "CompactSET", "CompiledModel", "DSD", "Evaluation", "Gradual", "GradualPruner", "GraNet", "History", "Iterative",
    "LotteryTicket", "MaskCallback", "OneShot", "Plan", "PlanError", "PruneError", "RegrowthError", "RigL",
    "SET", "SparseConv2d", "SparseLinear", "SparsefxError", "Sparsity", "TraceError", "__version__",
    "analyze", "apply", "apply_masks", "block_influence", "block_mask", "compile", "compute_masks", "count_macs", "count_params",
    "cubic_sparsity", "densify", "evaluate", "export", "finetune", "load", "nm_mask", "plan", "plan_measured", "prune", "prune_experts", "prune_layers",
    "remove_masks", "save", "sparsify", "to_sparse", "trace", "unstructured_mask", "weight_density",
]


def __getattr__(name: str) -> object:
    """`sparsefx.compile` and `sparsefx.CompiledModel` import TVM on first use (so does `load` of
    a compiled artifact)."""
    if name in LAZY_BACKEND:
        from sparsefx.backends import tvm as backend

        return getattr(backend, name)
    raise AttributeError(f"module 'sparsefx' has no attribute {name!r}")
