"""sparsefx: structured pruning and weight sparsity for PyTorch, compiled through Apache TVM.

The public API, stage by stage: capture (`trace`), channel pruning (`analyze`, `prune`), weight
sparsity (masks, `sparsify`), cost-driven planning (`plan`, `apply`, `plan_measured`), recovery
(schedules, `finetune`, `evaluate`), saving (`save`, `load`, `export`) and the TVM backend
(`compile`, `CompiledModel`). Each name is imported on first use: `import sparsefx` loads neither
PyTorch nor TVM, and TVM loads with the backend only.
"""

import importlib
import typing

from sparsefx.version import __version__

# where each public name lives: imported on first use, so `import sparsefx` costs nothing until then (the
# command line answers a kept plan without PyTorch, `cli/recipe.py`), and `compile` / `CompiledModel`
# load TVM only when used
EXPORTS = {
    "sparsefx.backends.export": ("export",),
    "sparsefx.backends.tvm": ("CompiledModel", "compile"),
    "sparsefx.capture.trace": ("trace",),
    "sparsefx.channels.calibration": ("CalibrationError",),
    "sparsefx.channels.depth": ("block_influence", "prune_layers"),
    "sparsefx.channels.moe": ("prune_experts",),
    "sparsefx.channels.prune": ("Analysis", "analyze", "count_macs", "count_params", "prune"),
    "sparsefx.errors": ("PruneError", "SparsefxError", "TraceError"),
    "sparsefx.io": ("load", "save"),
    "sparsefx.planning.measured": ("plan_measured",),
    "sparsefx.planning.plan": ("Plan", "PlanError"),
    "sparsefx.planning.planner": ("apply", "plan"),
    "sparsefx.recovery.compact": ("CompactLinear", "CompactSET", "densify"),
    "sparsefx.recovery.evaluate": ("Evaluation", "evaluate"),
    "sparsefx.recovery.finetune": ("History", "finetune"),
    "sparsefx.recovery.regrowth": ("DSD", "SET", "GraNet", "LotteryTicket", "RegrowthError", "RigL"),
    "sparsefx.recovery.schedules": ("Gradual", "GradualPruner", "Iterative", "OneShot", "cubic_sparsity"),
    "sparsefx.sparse.layers": ("SparseConv2d", "SparseLinear"),
    "sparsefx.sparse.masks": ("MaskCallback", "Sparsity", "apply_masks", "block_mask", "compute_masks", "nm_mask",
                              "remove_masks", "unstructured_mask", "weight_density"),
    "sparsefx.sparse.sparsify": ("sparsify", "to_sparse"),
}
HOME = {name: module for module, names in EXPORTS.items() for name in names}

if typing.TYPE_CHECKING:  # what type checkers and IDEs see
    from sparsefx.backends.export import export
    from sparsefx.backends.tvm import CompiledModel, compile
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

__all__ = [
    "Analysis", "CalibrationError", "CompactLinear", "CompactSET", "CompiledModel", "DSD", "Evaluation", "Gradual", "GradualPruner", "GraNet", "History", "Iterative",
    "LotteryTicket", "MaskCallback", "OneShot", "Plan", "PlanError", "PruneError", "RegrowthError", "RigL",
    "SET", "SparseConv2d", "SparseLinear", "SparsefxError", "Sparsity", "TraceError", "__version__",
    "analyze", "apply", "apply_masks", "block_influence", "block_mask", "compile", "compute_masks", "count_macs", "count_params",
    "cubic_sparsity", "densify", "evaluate", "export", "finetune", "load", "nm_mask", "plan", "plan_measured", "prune", "prune_experts", "prune_layers",
    "remove_masks", "save", "sparsify", "to_sparse", "trace", "unstructured_mask", "weight_density",
]


def __getattr__(name: str) -> object:
    """A public name, imported from its module on first use (`EXPORTS`)."""
    if name not in HOME:
        raise AttributeError(f"module 'sparsefx' has no attribute {name!r}")
    value = getattr(importlib.import_module(HOME[name]), name)
    globals()[name] = value  # later uses skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *HOME})
