"""Pruning schedules (one-shot, iterative, gradual) and the object that moves a model along one.

A schedule maps a training step t and a final sparsity (fraction removed) to the sparsity
wanted at t. `GradualPruner.step(t)` carries it out either with masks (weights zeroed, the
model keeps its shape) or by channel removal through `sparsefx.prune` (a new, smaller model).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from sparsefx.channels.prune import analyze, prune
from sparsefx.errors import SparsefxError
from sparsefx.sparse.masks import Sparsity, apply_masks, compute_masks, maskable_layers


def _check_int(name: str, value: object, low: int) -> None:
    if not isinstance(value, int) or value < low:
        raise SparsefxError(f"{name} must be an integer >= {low}, got {value!r}")


def cubic_sparsity(t: int, initial: float, final: float, start: int, steps: int, every: int) -> float:
    """Zhu & Gupta (2017): s_t = s_f + (s_i - s_f)(1 - (t - t0)/(nΔt))^3, updated every Δt steps.

    Pruning is fast at first, while many redundant weights remain, and slows as it nears
    s_f so the network can recover; before t0 nothing is pruned, after t0 + nΔt s_t = s_f."""
    if t < start:
        return 0.0
    done = min((t - start) // every, steps)  # masks only change on multiples of Δt
    return final + (initial - final) * (1 - done / steps) ** 3


@dataclass(frozen=True)
class OneShot:
    """Everything at step `at` (after dense training), then fine-tuning."""

    at: int = 0

    def __post_init__(self) -> None:
        _check_int("at", self.at, 0)

    def sparsity(self, t: int, final: float) -> float:
        return final if t >= self.at else 0.0


@dataclass(frozen=True)
class Iterative:
    """`steps` pruning rounds `every` steps apart with fine-tuning between; each round removes
    the same fraction of what is left, so the kept fraction falls geometrically to 1 - final."""

    steps: int = 3
    every: int = 1
    start: int = 0

    def __post_init__(self) -> None:
        _check_int("steps", self.steps, 1)
        _check_int("every", self.every, 1)
        _check_int("start", self.start, 0)

    def sparsity(self, t: int, final: float) -> float:
        if t < self.start:
            return 0.0
        rounds = min((t - self.start) // self.every + 1, self.steps)
        return 1 - (1 - final) ** (rounds / self.steps)


@dataclass(frozen=True)
class Gradual:
    """The cubic schedule: from `initial` at step `start` to the final sparsity at
    start + steps * every, updating every `every` steps."""

    steps: int = 10
    every: int = 100
    start: int = 0
    initial: float = 0.0

    def __post_init__(self) -> None:
        _check_int("steps", self.steps, 1)
        _check_int("every", self.every, 1)
        _check_int("start", self.start, 0)
        if not 0 <= self.initial < 1:
            raise SparsefxError(f"initial sparsity must be in [0, 1), got {self.initial!r}")

    def sparsity(self, t: int, final: float) -> float:
        return cubic_sparsity(t, min(self.initial, final), final, self.start, self.steps, self.every)


Schedule = OneShot | Iterative | Gradual


class GradualPruner:
    """Moves a model along `schedule`; call `step(t)` with the training step (or epoch) count.

    Masks: pass `masks` ({layer: Sparsity} or one Sparsity for every Linear/Conv layer); the
    model is masked in place, so `step` returns the same object. Channels: pass `channels` (the
    final fraction of each prunable group's channels to remove) and `example_inputs`; a pruning
    step returns a new, smaller model and sets `changed`: train that one, with a new optimizer.
    """

    def __init__(self, model: nn.Module, schedule: Schedule, masks: dict[str, Sparsity] | Sparsity | None = None,
                 channels: float | None = None, example_inputs: object = None,
                 importance: str | Callable = "l1") -> None:
        if (masks is None) == (channels is None):
            raise SparsefxError("GradualPruner needs exactly one of masks= (weight sparsity) or channels= (removal)")
        self.model, self.schedule, self.changed = model, schedule, False
        self.plan: dict[str, Sparsity] | None = None
        if masks is not None:
            self.plan = dict.fromkeys(maskable_layers(model), masks) if isinstance(masks, Sparsity) else dict(masks)
            compute_masks(model, self.plan)  # fail now, not mid-training, if a pattern does not fit
            self.applied = dict.fromkeys(self.plan, 1.0)
            return
        if not isinstance(channels, (int, float)) or not 0 <= channels < 1:
            raise SparsefxError(f"channels must be in [0, 1) (the fraction of channels removed), got {channels!r}")
        if example_inputs is None:
            raise SparsefxError("channel removal needs example_inputs=, e.g. (torch.randn(1, 1, 28, 28),)")
        self.channels, self.inputs, self.importance = float(channels), example_inputs, importance
        groups = [g for g in analyze(model, example_inputs).groups if g.prunable]
        self.widths = {slot.layer: _width(model.get_submodule(slot.layer)) for g in groups for slot in g.producers()}

    def step(self, t: int) -> nn.Module:
        self.changed = False
        if self.plan is not None:
            self._mask_step(t)
        else:
            self._channel_step(t)
        return self.model

    def _mask_step(self, t: int) -> None:
        wanted = {name: 1 - self.schedule.sparsity(t, 1 - s.density) for name, s in self.plan.items()}
        if wanted != self.applied:
            apply_masks(self.model, compute_masks(self.model, {n: s.at(wanted[n]) for n, s in self.plan.items()}))
            self.applied = wanted

    def _channel_step(self, t: int) -> None:
        kept = 1 - self.schedule.sparsity(t, self.channels)
        ratios = {}
        for name, width in self.widths.items():
            current = _width(self.model.get_submodule(name))
            target = max(1, round(width * kept))
            if target < current:
                # prune() removes floor(current * ratio) channels; +0.5 makes that exactly current - target
                ratios[name] = (current - target + 0.5) / current
        if ratios:
            self.model = prune(self.model, self.inputs, ratio=ratios, importance=self.importance)
            self.changed = True


def _width(module: nn.Module) -> int:
    width = getattr(module, "out_channels", None) or getattr(module, "out_features", None)
    if not isinstance(width, int):
        raise SparsefxError(f"cannot schedule channel removal through a {type(module).__name__} layer")
    return width

