"""Replay a removal record (`channels.record`) on a fresh dense instance of the architecture.

Each step is traced again on inputs of the recorded shapes, its coupling computed again, and
the recorded kept indices turned back into the removed classes. Indices that do not fit the
coupling (out of range, unsorted, a frozen channel, one layer cut differently from a layer it
is coupled to) are refused before anything is removed: the same `remove` that pruned the model
then rebuilds it, rewritten graph constants included. Mixture-of-experts steps (`channels.moe`)
name blocks and kept indices and are redone by the same `moe.apply_changes`.
"""

from __future__ import annotations

import copy

import numpy as np
from torch import nn

from sparsefx.capture.trace import METHODS, trace
from sparsefx.channels import moe
from sparsefx.channels.coupling import Coupling, analyze_coupling
from sparsefx.channels.prune import remove, working_copy
from sparsefx.channels.record import attach, example_input, fingerprint, removal_step
from sparsefx.errors import SparsefxError


class PersistError(SparsefxError):
    """A saved pruned model that cannot be rebuilt or loaded as it is."""


def check_architecture(work: nn.Module, record: dict, source: str) -> None:
    """Refuse a record made for another architecture (`work`: the fresh model's working copy)."""
    mine = fingerprint(work)
    if record.get("fingerprint") != mine:
        raise PersistError(f"{source} was saved from a {record.get('class')} (fingerprint {record.get('fingerprint')}), "
                           f"not this {type(work).__name__} ({mine}); pass model= the architecture it was pruned from")


def replay(model: nn.Module, record: dict, source: str) -> nn.Module:
    """`model` (dense, left untouched) with the recorded removal steps redone, in eval mode.

    Steps start from the working copy `prune` traced (attention split); a model saved unpruned
    comes back as itself."""
    steps = record.get("steps", [])
    work = working_copy(model) if steps else copy.deepcopy(model)
    if not steps and fingerprint(work) != record.get("fingerprint"):
        work = working_copy(model)  # prune with nothing selected hands back the working copy, attention split
    check_architecture(work, record, source)
    for number, step in enumerate(steps, 1):
        where = f"{source} step {number}"
        if step.get("method") == moe.METHOD:  # expert units or whole experts, module level
            try:
                moe.apply_changes(work, step.get("moe"))
            except SparsefxError as error:
                raise PersistError(f"{where}: {error}") from None
            continue
        if step.get("method") not in METHODS:
            raise PersistError(f"{where}: unknown capture route {step.get('method')!r}; save the model again")
        inputs = tuple(example_input(spec) for spec in step["inputs"])
        gm = trace(work, inputs, step["method"])
        coupling = analyze_coupling(gm)
        result = remove(work, gm, coupling, removed_classes(coupling, step["kept"], where), inputs)
        kind = "graph" if result is gm else "module"
        if step.get("result", kind) != kind:
            raise PersistError(f"{where}: the rebuilt model is a {kind} where the saved one was a {step['result']}; "
                               "save it again with this sparsefx version")
        work = result
    return attach(work.eval(), record)


def removed_classes(coupling: Coupling, kept: list[dict], where: str) -> set[int]:
    """The classes whose removal leaves exactly the recorded kept indices; refuses any that cannot."""
    slots = {(slot.param, slot.dim): slot for slot in coupling.slots}
    removed: set[int] = set()
    try:
        for entry in kept:
            slot = slots.get((entry["param"], entry["dim"]))
            if slot is None:
                raise PersistError(f"{where}: {entry['param']} dim {entry['dim']} is not a prunable dimension of this "
                                   "model; the file does not fit this architecture")
            indices = np.asarray(entry["kept"], dtype=np.int64)
            size = slot.ids.size
            if entry["size"] != size or indices.ndim != 1 or indices.size == 0 or indices[0] < 0 \
                    or indices[-1] >= size or (np.diff(indices) <= 0).any():
                raise PersistError(f"{where}: kept indices of {entry['param']} dim {entry['dim']} are not sorted, "
                                   f"distinct and within 0..{size - 1}; the file is corrupt or edited")
            gone = np.ones(size, dtype=bool)
            gone[indices] = False
            removed.update(coupling.roots[slot.ids[gone]].tolist())
    except PersistError:
        raise
    except (KeyError, TypeError, ValueError, OverflowError) as error:
        raise PersistError(f"{where}: malformed kept-index entry ({type(error).__name__}: {error}); "
                           "the file is corrupt or edited") from None
    _check_removable(coupling, removed, where)
    again = sorted((e["param"], e["dim"], e["kept"]) for e in removal_step(coupling, removed, (), "")["kept"])
    if again != sorted((e["param"], e["dim"], list(e["kept"])) for e in kept):
        raise PersistError(f"{where}: the kept indices cut coupled layers differently (a residual add or a "
                           "concat ties them); the file is corrupt or edited")
    return removed


def _check_removable(coupling: Coupling, removed: set[int], where: str) -> None:
    for group in coupling.groups:
        gone = removed.intersection(group.classes)
        if not gone:
            continue
        if not group.prunable or gone - set(group.free):
            raise PersistError(f"{where}: removes channels of group {group.id} ({group.layers[0]}) that this "
                               "model keeps (frozen); the file is corrupt or edited")
        if len(gone) == len(group.classes):
            raise PersistError(f"{where}: removes every channel of group {group.id} ({group.layers[0]}); "
                               "the file is corrupt or edited")
