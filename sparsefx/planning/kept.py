"""Plans kept for reuse: planning the same model again (the same code and weights, input shapes,
budget, options and target) on the same cost tables returns the plan the first run made, as a
warm compile reuses its artifact (`backends.artifacts`). The greedy's path follows what the tables
held when it ran: a second plan of ResNet-50 on the tables the first one filled took other moves and
measured their kernels (14.4 and 7.5 s in the first two warm plans, 1.4 s from the third), and
each plan of an unchanged model spent ~1 s working out the same answer.

The key is the model's (`capture.identity.model_key`) with the plan's options and a digest of the
cost tables' files as saved: a table that gained a measurement since (another model planned or
compiled) is another key, and the model is planned afresh from it. Only channel plans of the
built-in criteria without calibration data are kept (calibration batches and custom importance
callables are not keyed; sparse kernels are priced from tables of their own). A kept plan that
cannot be read is dropped and the model planned again. `cache=False` plans afresh.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from torch import nn

from sparsefx.cache import cache_dir
from sparsefx.capture.identity import model_key
from sparsefx.cost.model import CostModel
from sparsefx.log import get_logger
from sparsefx.planning.plan import Plan, PlanError

LOG = get_logger("plans")
KEPT = 256  # plans kept, the most recently used


def model_part(model: nn.Module, inputs: tuple, cost: CostModel, options: dict) -> str | None:
    """What keys a plan of `model` with these options on `cost`'s target, but the tables (None: not kept)."""
    return model_key(model, {"plan": options, "target": cost.target.as_key(),
                             "inputs": [(tuple(x.shape), str(x.dtype)) for x in inputs]})


def plan_key(part: str, cost: CostModel) -> str:
    """The key a plan is kept under: its `model_part` and the bytes of `cost`'s table files now."""
    digest = hashlib.sha256(part.encode())
    for table in cost.tables:
        digest.update(table.path.read_bytes() if table.path.is_file() else b"absent")
    return digest.hexdigest()[:32]


def cached(key: str) -> Plan | None:
    """The plan kept under `key`, marked as just used; None when there is none or it cannot be read."""
    path = _root() / f"{key}.json"
    if not path.is_file():
        return None
    try:
        found = Plan.load(path)
    except (PlanError, OSError) as error:
        LOG.warning(f"a kept plan could not be read ({error}); planning again")
        path.unlink(missing_ok=True)
        return None
    os.utime(path)
    return found


def keep(key: str, plan: Plan) -> None:
    """Keep `plan` under `key` (atomically), then drop the least recently used beyond `KEPT`."""
    root = _root()
    part = root / f"{key}.{os.getpid()}.part"
    try:
        plan.save(part)
        os.replace(part, root / f"{key}.json")
    except OSError as error:  # a full disk costs the reuse, never the plan
        LOG.warning(f"plan not kept for reuse ({error.strerror or error})")
        part.unlink(missing_ok=True)
        return
    for old in sorted(root.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)[KEPT:]:
        old.unlink(missing_ok=True)


def _root() -> Path:
    root = cache_dir() / "plans"
    root.mkdir(parents=True, exist_ok=True)
    return root
