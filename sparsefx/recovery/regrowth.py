"""Sparse training whose mask moves: SET and RigL (drop and regrow), GraNet (gradual pruning with
regrowth), dense-sparse-dense (DSD) and lottery tickets (iterative magnitude pruning with rewinding).

Each is a pruner for `finetune(pruner=...)`, like `GradualPruner`: `step(t)` runs before
optimizer step t and edits the masks of masked training (`masks.apply_masks`) in place, so the
optimizer keeps its parameters and `changed` stays False. Regrowth works in the units a pattern
keeps: single weights (unstructured), whole blocks (block), and for N:M one weight swapped for
another inside its group of M, so every group keeps exactly N after every update.

Memory: masked training keeps each layer's dense weight, its dense gradient and optimizer state,
plus the mask (a float tensor of the weight's size) and the masked weight built on every forward;
RigL also holds one dense gradient per layer around an update. Sparse training here therefore
takes more memory than dense training, not less; only the compiled model (`to_sparse`) is small.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sparsefx.errors import SparsefxError
from sparsefx.recovery.schedules import cubic_sparsity
from sparsefx.sparse.masks import (
    Sparsity,
    apply_masks,
    compute_masks,
    current_masks,
    maskable_layers,
    remove_masks,
)


class RegrowthError(SparsefxError):
    """A sparse-training schedule asked for something its masks cannot do."""


def check_kept(value: object, what: str = "kept fraction") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise RegrowthError(f"{what} must be in (0, 1] (the fraction of weights kept), got {value!r}")
    return float(value)


def check_schedule(every: object, end: object, fraction: object, init: object) -> None:
    """A drop-and-regrow schedule's settings, each refused in one line."""
    for label, value in (("every", every), ("end", end)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RegrowthError(f"{label} must be a positive number of steps, got {value!r}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise RegrowthError(f"the drop fraction must be in (0, 1), got {fraction!r}")
    if init not in ("random", "magnitude"):
        raise RegrowthError(f"init must be 'random' (sparse from scratch) or 'magnitude', got {init!r}")


def layer_plan(model: nn.Module, masks: dict[str, Sparsity | float] | Sparsity | float) -> dict[str, Sparsity]:
    """{layer: Sparsity} from one Sparsity or kept fraction for every Linear/Conv, or a dict of them."""
    if not isinstance(masks, dict):
        masks = dict.fromkeys(maskable_layers(model), masks)
    plan = {name: s if isinstance(s, Sparsity) else Sparsity(check_kept(s)) for name, s in masks.items()}
    if not plan:
        raise RegrowthError(f"the plan names no layer of {type(model).__name__}; name Linear/Conv layers "
                            "(model.named_modules()) or pass one Sparsity for all of them")
    compute_masks(model, plan)  # fail now, not mid-training, if a layer is missing or a pattern does not fit
    return plan


def _units(x: torch.Tensor, sparsity: Sparsity) -> torch.Tensor:
    """Per-unit sums of x seen as the weight matrix: single weights, or (rows × cols) blocks."""
    matrix = x.reshape(x.shape[0], -1)
    if sparsity.pattern != "block":
        return matrix
    (rows, cols), (br, bc) = matrix.shape, sparsity.block
    return matrix.reshape(rows // br, br, cols // bc, bc).sum(dim=(1, 3))


def _elements(units: torch.Tensor, sparsity: Sparsity, shape: torch.Size) -> torch.Tensor:
    if sparsity.pattern == "block":
        units = units.repeat_interleave(sparsity.block[0], 0).repeat_interleave(sparsity.block[1], 1)
    return units.reshape(shape)


def unit_counts(shape: torch.Size, sparsity: Sparsity) -> tuple[int, int]:
    """(units a layer keeps, units it has): weights, blocks, or for N:M the weights (N per group)."""
    total = _units(torch.empty(shape, device="meta"), sparsity).numel()
    if sparsity.pattern == "nm":
        return total // sparsity.m * round(sparsity.density * sparsity.m), total
    return max(1, min(round(sparsity.density * total), total)), total


def check_regrowable(name: str, shape: torch.Size, sparsity: Sparsity, fraction: float) -> None:
    """A layer whose mask can move: some units pruned to regrow into, some kept to drop."""
    kept, total = unit_counts(shape, sparsity)
    unit = f"{sparsity.block[0]}x{sparsity.block[1]} blocks" if sparsity.pattern == "block" else "weights"
    if kept >= total:
        raise RegrowthError(f"layer {name!r} keeps all {total} of its {unit} at density {sparsity.density:g}: "
                            "there is nowhere to regrow; lower its density or leave it out of the plan")
    if round(fraction * kept) < 1:
        raise RegrowthError(f"layer {name!r} keeps {kept} {unit}; a drop fraction of {fraction:g} drops none of them, "
                            "so its mask could never change: raise the fraction or the density")


def _top(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Bool mask of the `count` highest entries (ties broken by position)."""
    keep = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    keep[torch.topk(scores.flatten().float(), count).indices] = True
    return keep.reshape(scores.shape)


def drop_and_grow(weight: torch.Tensor, mask: torch.Tensor, sparsity: Sparsity, fraction: float,
                  grow_score: torch.Tensor) -> torch.Tensor:
    """The mask after one update: the `fraction` of kept units with the smallest magnitude pruned
    and as many pruned units with the highest `grow_score` (same shape as the weight) kept.
    Units dropped in this update are not regrown in it; the number kept never changes.
    N:M: at most one swap per group of M, taken in the groups whose weakest kept weight is weakest."""
    if not 0 <= fraction < 1:
        raise RegrowthError(f"the drop fraction must be in [0, 1), got {fraction!r}")
    if mask.shape != weight.shape or grow_score.shape != weight.shape:
        raise RegrowthError(f"mask {tuple(mask.shape)} and grow score {tuple(grow_score.shape)} must have the "
                            f"weight's shape {tuple(weight.shape)}")
    if sparsity.pattern == "nm":
        return _nm_update(weight, mask, sparsity, fraction, grow_score)
    kept_units = _units(mask.float(), sparsity)
    size = mask.numel() // kept_units.numel()
    if bool(((kept_units > 0) & (kept_units < size)).any()):
        raise RegrowthError(f"the mask is not made of whole {sparsity.block[0]}x{sparsity.block[1]} blocks; "
                            "a block update needs a block mask (masks.block_mask)")
    kept = kept_units > 0
    count = min(round(fraction * int(kept.sum())), int((~kept).sum()))
    if count == 0:
        return mask.bool().clone()
    magnitude = _units(weight.detach().abs() * mask, sparsity)
    dropped = _top(-magnitude.masked_fill(~kept, math.inf), count)
    grown = _top(_units(grow_score.detach().float(), sparsity).masked_fill(kept, -math.inf), count)
    return _elements((kept & ~dropped) | grown, sparsity, mask.shape)


def _nm_update(weight: torch.Tensor, mask: torch.Tensor, sparsity: Sparsity, fraction: float,
               grow_score: torch.Tensor) -> torch.Tensor:
    n, m = round(sparsity.density * sparsity.m), sparsity.m
    rows = weight.shape[0]
    kept = mask.bool().reshape(rows, -1, m)
    counts = kept.sum(dim=2)
    if bool((counts != n).any()):
        raise RegrowthError(f"the mask keeps {int(counts.min())} to {int(counts.max())} of some groups of {m}, not "
                            f"{n}; an N:M update must start from a {n}:{m} mask (masks.nm_mask) to stay {n}:{m}")
    groups = rows * kept.shape[1]
    swaps = min(round(fraction * n * groups), groups)
    if swaps == 0:
        return kept.reshape(mask.shape).clone()
    weakest, drop_at = weight.detach().abs().reshape(rows, -1, m).masked_fill(~kept, math.inf).min(dim=2)
    grow_at = grow_score.detach().float().reshape(rows, -1, m).masked_fill(kept, -math.inf).argmax(dim=2)
    rows_at, groups_at = _top(-weakest, swaps).nonzero(as_tuple=True)
    new = kept.clone()
    new[rows_at, groups_at, drop_at[rows_at, groups_at]] = False  # a kept and a pruned position: still n kept
    new[rows_at, groups_at, grow_at[rows_at, groups_at]] = True
    return new.reshape(mask.shape)


def stored_weight(model: nn.Module, name: str) -> nn.Parameter:
    """The parameter the optimizer updates: under masked training, the unmasked original."""
    module = model.get_submodule(name)
    return module.parametrizations.weight.original if hasattr(module, "parametrizations") else module.weight


class _DenseGrad:
    """Forward hook on a layer's mask parametrization that keeps d loss / d (masked weight) while
    `on`: that gradient is dense, while the stored weight's is zero wherever the mask prunes."""

    def __init__(self) -> None:
        self.on, self.grad = False, None

    def __call__(self, _module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        if self.on and output.requires_grad:
            output.register_hook(self.keep)

    def keep(self, grad: torch.Tensor) -> None:
        self.grad = grad


class Regrowth:
    """Sparse training from the start at a fixed kept fraction: every `every` steps up to `end`,
    drop the weakest kept units of each layer and regrow as many elsewhere, at zero (Evci et al.).

    `init`: "random" masks (training from scratch, the default) or "magnitude" (from a trained
    model). Subclasses choose the drop fraction at step t and the score pruned units regrow by.
    """

    def __init__(self, model: nn.Module, masks: dict[str, Sparsity | float] | Sparsity | float, every: int = 100,
                 end: int = 1000, fraction: float = 0.3, init: str = "random", seed: int = 0) -> None:
        check_schedule(every, end, fraction, init)
        self.model, self.every, self.end, self.fraction, self.changed = model, every, end, float(fraction), False
        self.plan = layer_plan(model, masks)
        for name, sparsity in self.plan.items():
            check_regrowable(name, model.get_submodule(name).weight.shape, sparsity, self.fraction)
        self.generator = torch.Generator().manual_seed(seed)
        self.now = self.starting_plan()  # what each layer keeps now: the plan, or more while GraNet prunes
        if init == "random":
            start = {name: s.mask(torch.rand(model.get_submodule(name).weight.shape, generator=self.generator))
                     for name, s in self.now.items()}
        else:
            start = compute_masks(model, self.now)
        apply_masks(model, start)
        self.updates = 0

    def starting_plan(self) -> dict[str, Sparsity]:
        return dict(self.plan)

    def drop_fraction(self, t: int) -> float:
        return self.fraction

    def grow_scores(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def updates_at(self, t: int) -> bool:
        """Whether step t is a mask update (every `every` steps, before `end`)."""
        return t > 0 and t % self.every == 0 and t < self.end

    def step(self, t: int) -> nn.Module:
        if self.updates_at(t):
            self.update(self.drop_fraction(t))
        return self.model

    @torch.no_grad()
    def update(self, fraction: float) -> None:
        """One drop-and-regrow of every layer in the plan; regrown weights start at zero."""
        masks, scores, new = current_masks(self.model), self.grow_scores(), {}
        for name, sparsity in self.now.items():
            weight = stored_weight(self.model, name)
            kept, total = unit_counts(weight.shape, sparsity)
            if kept >= total:
                continue  # a layer still whole has nowhere to regrow
            new[name] = drop_and_grow(weight, masks[name], sparsity, fraction, scores[name])
            weight[new[name] & ~masks[name]] = 0
        apply_masks(self.model, new)
        self.updates += 1


class SET(Regrowth):
    """Sparse Evolutionary Training (Mocanu et al. 2018): a constant drop fraction, random regrowth."""

    def grow_scores(self) -> dict[str, torch.Tensor]:
        weights = {name: self.model.get_submodule(name).weight for name in self.plan}
        return {name: torch.rand(w.shape, generator=self.generator).to(w.device) for name, w in weights.items()}


class RigL(Regrowth):
    """Rigged Lottery (Evci et al. 2020): regrow where the dense gradient is largest; the drop
    fraction anneals as fraction/2 · (1 + cos(π t / end)), large early, small as training settles.

    The dense gradient is the masked weight's, kept by a hook from the backward pass just before
    an update step (the last batch's), so an update costs no extra forward or backward pass."""

    def __init__(self, model: nn.Module, masks: dict[str, Sparsity | float] | Sparsity | float, every: int = 100,
                 end: int = 1000, fraction: float = 0.3, init: str = "random", seed: int = 0) -> None:
        super().__init__(model, masks, every, end, fraction, init, seed)
        self.catchers = {name: _DenseGrad() for name in self.plan}
        self.hooks = [model.get_submodule(name).parametrizations.weight[0].register_forward_hook(catcher)
                      for name, catcher in self.catchers.items()]

    def drop_fraction(self, t: int) -> float:
        return self.fraction / 2 * (1 + math.cos(math.pi * t / self.end))

    def grow_scores(self) -> dict[str, torch.Tensor]:
        missing = [name for name, c in self.catchers.items() if c.grad is None]
        if missing:
            raise RegrowthError(f"RigL has no gradient for {', '.join(missing)}: call step(t) before each optimizer "
                                "step, after a backward pass (finetune(pruner=...) does)")
        return {name: c.grad.abs() for name, c in self.catchers.items()}

    def step(self, t: int) -> nn.Module:
        super().step(t)
        if t + 1 >= self.end:  # no update left: drop the hooks, so copies of the model carry none
            self.remove_hooks()
        for catcher in self.catchers.values():  # keep only the gradient an update step will read
            catcher.on, catcher.grad = (t + 1) % self.every == 0, None
        return self.model

    def remove_hooks(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []


class GraNet(RigL):
    """Gradual pruning with regrowth (Liu et al. 2021, "Sparse Training via Boosting Pruning
    Plasticity with Neuroregeneration"): each layer starts at `initial` (1.0: the trained dense
    model) and is pruned by magnitude along Zhu & Gupta's cubic schedule to the plan's density at
    step `prune_end`; at every update RigL then drops and regrows a fraction of what is kept. Early
    pruning mistakes are undone by regrowth; block and N:M keep their pattern at every density
    (N:M's N falls from M to the plan's N). On LeNet-300-100 at 2% with 2x1 blocks it got within
    1.0-1.9 points of dense where RigL from the same dense model lost 2.4."""

    def __init__(self, model: nn.Module, masks: dict[str, Sparsity | float] | Sparsity | float, every: int = 100,
                 end: int = 1000, fraction: float = 0.1, prune_end: int = 600, initial: float = 1.0,
                 seed: int = 0) -> None:
        if isinstance(prune_end, bool) or not isinstance(prune_end, int) or not 0 < prune_end <= end:
            raise RegrowthError(f"prune_end must be a step in (0, end={end!r}] (pruning ends before regrowth does), "
                                f"got {prune_end!r}")
        self.initial, self.prune_end = check_kept(initial, "initial kept fraction"), prune_end
        super().__init__(model, masks, every, end, fraction, init="magnitude", seed=seed)

    def starting_plan(self) -> dict[str, Sparsity]:
        return {name: s.at(max(self.initial, s.density)) for name, s in self.plan.items()}

    def density(self, t: int, sparsity: Sparsity) -> float:
        """A layer's kept fraction at step t, on the cubic schedule from its start to the plan's."""
        start = max(self.initial, sparsity.density)
        steps = max(1, self.prune_end // self.every)
        return 1 - cubic_sparsity(t, 1 - start, 1 - sparsity.density, 0, steps, self.every)

    def step(self, t: int) -> nn.Module:
        if self.updates_at(t):
            wanted = {name: s.at(self.density(t, s)) for name, s in self.plan.items()}
            if wanted != self.now:  # prune by magnitude first; the regrowth below then works on what is left
                with torch.no_grad():
                    apply_masks(self.model, compute_masks(self.model, wanted))
                self.now = wanted
        return super().step(t)


class DSD:
    """Dense-Sparse-Dense (Han et al. 2017): train dense until `sparse_at`, prune by magnitude and
    train sparse until `dense_at`, then restore the pruned weights at zero and train them all.
    From `dense_at` on the model has plain dense weights (the optimizer keeps the same ones)."""

    def __init__(self, model: nn.Module, masks: dict[str, Sparsity | float] | Sparsity | float,
                 sparse_at: int, dense_at: int) -> None:
        if isinstance(sparse_at, bool) or not isinstance(sparse_at, int) or not isinstance(dense_at, int) \
                or not 0 <= sparse_at < dense_at:
            raise RegrowthError(f"DSD needs integer steps 0 <= sparse_at < dense_at, got {sparse_at!r}, {dense_at!r}")
        self.model, self.sparse_at, self.dense_at, self.changed = model, sparse_at, dense_at, False
        self.plan = layer_plan(model, masks)
        self.phase = "dense"

    def step(self, t: int) -> nn.Module:
        if self.phase == "dense" and self.sparse_at <= t < self.dense_at:
            apply_masks(self.model, compute_masks(self.model, self.plan))
            self.phase = "sparse"
        elif self.phase == "sparse" and t >= self.dense_at:
            remove_masks(self.model)  # the stored weights become weight * mask: pruned ones restart at zero
            self.phase = "redense"
        return self.model


def _parameter_name(name: str) -> str:
    """A parameter's name with masked training's parametrization removed ('fc.weight')."""
    return name.replace("parametrizations.", "").replace(".original", "")


def parameters_by_name(model: nn.Module) -> dict[str, nn.Parameter]:
    return {_parameter_name(name): p for name, p in model.named_parameters()}


class LotteryTicket:
    """Iterative magnitude pruning with weight rewinding (Frankle & Carbin 2019; Frankle et al. 2020).

    Train with `finetune(pruner=ticket)`: the weights at step `rewind_at` are recorded (or pass
    `rewind_state`, the `parameters_by_name` values recorded from a copy of the model). Then each
    `next_round()` prunes every layer to the next of `rounds` kept fractions falling geometrically
    to the plan's, by magnitude of the trained weights, and rewinds all surviving weights (and
    biases) to the recorded ones; train again after each. Returns False once the plan is reached.
    """

    def __init__(self, model: nn.Module, masks: dict[str, Sparsity | float] | Sparsity | float, rounds: int = 3,
                 rewind_at: int = 0, rewind_state: dict[str, torch.Tensor] | None = None) -> None:
        for label, value, low in (("rounds", rounds, 1), ("rewind_at", rewind_at, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise RegrowthError(f"{label} must be an integer >= {low}, got {value!r}")
        self.model, self.rounds, self.rewind_at, self.changed = model, rounds, rewind_at, False
        self.plan = layer_plan(model, masks)
        self.rewind_state = None if rewind_state is None else {k: v.detach().clone() for k, v in rewind_state.items()}
        self.round = 0

    def step(self, t: int) -> nn.Module:
        if self.rewind_state is None and t == self.rewind_at:
            self.rewind_state = {name: p.detach().clone() for name, p in parameters_by_name(self.model).items()}
        return self.model

    def kept(self, round_: int) -> dict[str, Sparsity]:
        """Each layer's Sparsity after `round_` rounds: kept fraction = final ** (round_ / rounds)."""
        return {name: s.at(s.density ** (round_ / self.rounds)) for name, s in self.plan.items()}

    @torch.no_grad()
    def next_round(self) -> bool:
        if self.round == self.rounds:
            return False
        if self.rewind_state is None:
            raise RegrowthError(f"no weights recorded to rewind to: train with finetune(pruner=ticket) past step "
                                f"{self.rewind_at} first, or pass rewind_state=")
        self.round += 1
        masks = compute_masks(self.model, self.kept(self.round))
        params = parameters_by_name(self.model)
        missing = sorted(set(params) - set(self.rewind_state))
        if missing:
            raise RegrowthError(f"rewind_state has no value for {', '.join(missing)}; record it from the same model")
        for name, p in params.items():
            p.copy_(self.rewind_state[name])
        apply_masks(self.model, masks)
        return True
