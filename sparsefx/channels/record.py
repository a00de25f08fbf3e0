"""What a removal did, as plain data: the record `sparsefx.save` writes and `sparsefx.load` replays.

Every module `prune` (or `planning.apply`) hands back carries `REMOVAL_ATTR`: the fingerprint
of the dense architecture it came from and one step per removal, each step the kept indices of
every parameter dimension that shrank plus what is needed to trace the model again (input
shapes and dtypes, capture route). Pruning a pruned model appends a step. Kept indices, not
internal class ids, are what a step stores: they mean the same thing on a fresh instance of
the architecture, and a file whose indices do not fit the coupling can be refused.
"""

from __future__ import annotations

import copy
import hashlib

import numpy as np
import torch
from torch import nn

from sparsefx.channels.coupling import Coupling

REMOVAL_ATTR = "sparsefx_removal"
EXACT_INPUT_LIMIT = 4096  # integer inputs (token ids, positions) up to this size are stored as they are


def fingerprint(model: nn.Module) -> str:
    """Identifies an architecture: class and state-dict names and shapes (not values)."""
    items = [type(model).__name__] + [f"{n}:{tuple(t.shape)}" for n, t in model.state_dict().items()]
    return hashlib.sha256("\n".join(items).encode()).hexdigest()[:16]


def removal_of(model: nn.Module) -> dict | None:
    """The removal record a model carries, or None for a model sparsefx never pruned."""
    record = getattr(model, REMOVAL_ATTR, None)
    return record if isinstance(record, dict) else None


def history(work: nn.Module) -> dict:
    """The record to extend when `work` (a working copy, attention split) is pruned next."""
    record = removal_of(work)
    if record is not None:
        return copy.deepcopy(record)
    return {"class": type(work).__name__, "fingerprint": fingerprint(work), "steps": []}


def removal_step(coupling: Coupling, removed: set[int], inputs: tuple, method: str) -> dict:
    """One step: per shrinking parameter dimension its original size and the kept indices."""
    keep = ~np.isin(coupling.roots, np.fromiter(removed, dtype=np.int64, count=len(removed)))
    kept = []
    for slot in coupling.slots:
        mask = keep[slot.ids]
        if not mask.all():
            kept.append({"param": slot.param, "dim": slot.dim, "size": int(slot.ids.size),
                         "kept": np.nonzero(mask)[0].tolist()})
    return {"method": method, "inputs": [input_spec(x) for x in inputs], "kept": kept}


def input_spec(x: torch.Tensor) -> dict:
    """Enough of an example input to trace again: shape and dtype; small integer inputs verbatim
    (token ids may steer shapes), float inputs as a seeded random draw."""
    spec = {"shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch.")}
    if not x.is_floating_point() and not x.is_complex() and x.numel() <= EXACT_INPUT_LIMIT:
        spec["values"] = x.flatten().tolist()
    return spec


def example_input(spec: dict) -> torch.Tensor:
    dtype = getattr(torch, spec["dtype"])
    if "values" in spec:
        return torch.tensor(spec["values"], dtype=dtype).reshape(spec["shape"])
    if dtype.is_floating_point:
        generator = torch.Generator().manual_seed(0)
        return torch.randn(spec["shape"], generator=generator).to(dtype)
    return torch.zeros(spec["shape"], dtype=dtype)


def recorded_inputs(model: nn.Module) -> tuple[torch.Tensor, ...] | None:
    """Inputs shaped like those the model was first pruned on (None for a model never pruned)."""
    record = removal_of(model)
    if not record or not record["steps"]:
        return None
    return tuple(example_input(spec) for spec in record["steps"][0]["inputs"])


def attach(module: nn.Module, record: dict) -> nn.Module:
    setattr(module, REMOVAL_ATTR, record)
    return module
