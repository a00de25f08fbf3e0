"""Magnitude masks for weight sparsity (unstructured, block, N:M) and masked training.

A weight is viewed as a matrix of rows = output units and columns = everything one output
reads (a conv's in_channels × kh × kw, in memory order), the layout a sparse matmul kernel
consumes. Masks are bool tensors of the weight's shape; True keeps a weight.

Masked training registers a parametrization (weight = original * mask): the forward pass
always sees the masked weight and the chain rule zeroes the gradient of pruned entries, so
no optimizer (momentum, Adam state, weight decay) can bring a pruned weight back.
`remove_masks` bakes the zeros in and restores plain parameters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn.utils import parametrize

from sparsefx.errors import SparsefxError

PATTERNS = ("unstructured", "block", "nm")
RULES = ("uniform", "erk")
MASKABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _shape(weight: torch.Tensor) -> tuple[int, int]:
    if weight.dim() < 2:
        raise SparsefxError(f"a mask needs a weight of 2 or more dimensions, got shape {tuple(weight.shape)}")
    return weight.shape[0], weight[0].numel()


def _matrix(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().abs().reshape(_shape(weight))


def _check_density(density: float) -> None:
    if not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise SparsefxError(f"density must be in (0, 1] (the fraction of weights kept), got {density!r}")


def check_block(weight: torch.Tensor, block: tuple[int, int]) -> None:
    """One-line error unless `block` is (rows, cols) that tile the weight's matrix (masks and formats)."""
    if not isinstance(block, (tuple, list)) or len(block) != 2 or not all(isinstance(b, int) and b >= 1 for b in block):
        raise SparsefxError(f"block must be two positive integers (rows, cols), got {block!r}")
    (rows, cols), (br, bc) = _shape(weight), block
    if rows % br or cols % bc:
        raise SparsefxError(f"block {br}x{bc} does not divide the {rows}x{cols} weight matrix "
                            f"(shape {tuple(weight.shape)}); choose a block whose sides divide both")


def check_m(weight: torch.Tensor, m: int) -> None:
    """One-line error unless N:M groups of `m` divide the weight's input size (masks and formats)."""
    cols = _shape(weight)[1]
    if cols % m:
        raise SparsefxError(f"M={m} does not divide the input size {cols} of weight "
                            f"{tuple(weight.shape)}; pick an M that divides it")


def _check_shape(name: str, mask: torch.Tensor, weight: torch.Tensor) -> None:
    if mask.shape != weight.shape:
        raise SparsefxError(f"mask for {name!r} has shape {tuple(mask.shape)}, the weight {tuple(weight.shape)}")


def _top(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Bool mask of exactly `count` highest entries (ties broken by position), never empty."""
    keep = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    keep[torch.topk(scores.flatten().float(), max(1, min(count, scores.numel()))).indices] = True
    return keep.reshape(scores.shape)


def unstructured_mask(weight: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the `density` fraction of weights with the largest magnitude (the reference pattern)."""
    _check_density(density)
    return _top(weight.detach().abs(), round(density * weight.numel()))


def block_mask(weight: torch.Tensor, block: tuple[int, int] = (1, 4), density: float = 0.5) -> torch.Tensor:
    """Keep the `density` fraction of (rows × cols) blocks with the largest L1 norm."""
    _check_density(density)
    check_block(weight, block)
    matrix = _matrix(weight)
    (rows, cols), (br, bc) = matrix.shape, block
    scores = matrix.reshape(rows // br, br, cols // bc, bc).sum(dim=(1, 3))
    keep = _top(scores, round(density * scores.numel()))
    return keep.repeat_interleave(br, 0).repeat_interleave(bc, 1).reshape(weight.shape)


def nm_mask(weight: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Keep the `n` largest of every `m` consecutive weights along a row (N:M sparsity)."""
    if not isinstance(n, int) or not isinstance(m, int) or not 1 <= n < m:
        raise SparsefxError(f"N:M sparsity needs integers 1 <= N < M, got {n}:{m}")
    check_m(weight, m)
    matrix = _matrix(weight)
    groups = matrix.reshape(matrix.shape[0], -1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, groups.topk(n, dim=2).indices, True)
    return keep.reshape(weight.shape)


@dataclass(frozen=True)
class Sparsity:
    """What one layer keeps: a pattern and the fraction of weights kept.

    For "nm", N = round(density * m), so the density moves in steps of 1/m; `block` is only
    read by "block" and `m` only by "nm".
    """

    density: float
    pattern: str = "unstructured"
    block: tuple[int, int] = (1, 4)
    m: int = 4

    def __post_init__(self) -> None:
        _check_density(self.density)
        if self.pattern not in PATTERNS:
            raise SparsefxError(f"unknown sparsity pattern {self.pattern!r}; use one of {', '.join(PATTERNS)}")
        if self.pattern == "nm" and (not isinstance(self.m, int) or self.m < 2):
            raise SparsefxError(f"N:M sparsity needs an integer M >= 2, got m={self.m!r}")
        if self.pattern == "nm" and round(self.density * self.m) < 1:
            raise SparsefxError(f"density {self.density} keeps fewer than 1 of every {self.m} weights; "
                                f"the lowest N:M density with M={self.m} is 1/{self.m}")

    def at(self, density: float) -> Sparsity:
        """The same pattern at another density (a schedule's intermediate step)."""
        return replace(self, density=density)

    def mask(self, weight: torch.Tensor) -> torch.Tensor:
        if self.pattern == "nm":
            n = round(self.density * self.m)
            if n < self.m:
                return nm_mask(weight, n, self.m)
            check_m(weight, self.m)  # a dense start of a schedule still checks the plan fits
        elif self.pattern == "block":
            return block_mask(weight, self.block, self.density)
        elif self.density < 1:
            return unstructured_mask(weight, self.density)
        return torch.ones_like(weight, dtype=torch.bool)


class _Mask(nn.Module):
    """The parametrization: weight = original * mask (mask stored as a buffer, saved with the model)."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


def _layer(model: nn.Module, name: str) -> nn.Module:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise SparsefxError(f"no layer named {name!r} in {type(model).__name__}; "
                            f"maskable layers: {', '.join(maskable_layers(model)) or 'none'}") from None
    if not isinstance(module, MASKABLE):
        raise SparsefxError(f"layer {name!r} is a {type(module).__name__}; masks apply to Linear and Conv layers")
    return module


def maskable_layers(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, MASKABLE)]


def compute_masks(model: nn.Module, plan: dict[str, Sparsity]) -> dict[str, torch.Tensor]:
    """Masks for the named layers from their current (already masked) weights, so that a
    lower density computed later keeps a subset of what an earlier mask kept."""
    return {name: sparsity.mask(_layer(model, name).weight) for name, sparsity in plan.items()}


def allocate(model: nn.Module, density: float, pattern: str = "unstructured", block: tuple[int, int] = (1, 4),
             rule: str = "erk", power: float = 1.0, layers: Sequence[str] | None = None,
             fixed: dict[str, float] | None = None, max_m: int = 128) -> dict[str, Sparsity]:
    """Per-layer Sparsity keeping `density` of all the named layers' weights together (a plan
    for `compute_masks` or `GradualPruner(masks=...)`; default layers: every Linear/Conv).

    "uniform" gives every layer `density`. "erk" (Erdős–Rényi-Kernel, Evci et al. 2020) makes a
    layer's density proportional to (sum of its weight's dims / their product) ** power: a
    784-input first layer reads largely redundant pixels and can lose far more than a 10-way
    classifier, where every weight decides a class; power > 1 leans further toward the small
    layers. A layer that would exceed density 1 stays dense and the others share the rest.
    For "nm" each layer, largest first, takes the densest N:M not above its share, with M a
    divisor of its inputs up to `max_m` (the N:M format stores positions as int8); what the
    rounding leaves over is shared among the layers not yet placed. `fixed` pins layers to a
    density of their own (1.0 keeps one dense: first/last-layer protection); they count
    toward the total and the other layers share the rest."""
    _check_density(density)
    if rule not in RULES:
        raise SparsefxError(f"unknown allocation rule {rule!r}; use one of {', '.join(RULES)}")
    if pattern not in PATTERNS:
        raise SparsefxError(f"unknown sparsity pattern {pattern!r}; use one of {', '.join(PATTERNS)}")
    if not isinstance(power, (int, float)) or power <= 0:
        raise SparsefxError(f"power must be a positive number, got {power!r}")
    names = list(layers) if layers is not None else maskable_layers(model)
    if not names:
        raise SparsefxError(f"{type(model).__name__} has no Linear/Conv layers to allocate sparsity to")
    shapes = {name: tuple(_layer(model, name).weight.shape) for name in names}
    budget = density * sum(math.prod(s) for s in shapes.values())
    plan: dict[str, Sparsity] = {}
    for name, share in (fixed or {}).items():
        if name not in shapes:
            raise SparsefxError(f"fixed names {name!r}, not one of the allocated layers: {', '.join(names)}")
        _check_density(share)
        plan[name] = _fit(share, pattern, block, shapes[name], max_m)
        budget -= plan[name].density * math.prod(shapes[name])
    for name in sorted(set(names) - set(plan), key=lambda n: math.prod(shapes[n]), reverse=True):
        share = _spread({n: s for n, s in shapes.items() if n not in plan}, budget, rule, power)[name]
        plan[name] = _fit(share, pattern, block, shapes[name], max_m)
        budget -= plan[name].density * math.prod(shapes[name])
    return {name: plan[name] for name in names}


def _spread(shapes: dict[str, tuple[int, ...]], budget: float, rule: str, power: float) -> dict[str, float]:
    """Densities proportional to the rule's score that keep `budget` weights, capped at 1."""
    score = {n: 1.0 if rule == "uniform" else (sum(s) / math.prod(s)) ** power for n, s in shapes.items()}
    dense: set[str] = set()
    while True:
        left = budget - sum(math.prod(shapes[n]) for n in dense)
        weight = sum(score[n] * math.prod(s) for n, s in shapes.items() if n not in dense)
        scale = max(left, 0.0) / weight if weight else 0.0
        over = {n for n in shapes if n not in dense and score[n] * scale >= 1}
        if not over:
            return {n: 1.0 if n in dense else score[n] * scale for n in shapes}
        dense |= over


def _fit(share: float, pattern: str, block: tuple[int, int], shape: tuple[int, ...], max_m: int) -> Sparsity:
    if share >= 1:
        return Sparsity(1.0)  # kept whole: no pattern constraint to check
    if pattern != "nm":
        units = math.prod(shape) // (math.prod(block) if pattern == "block" else 1)
        if round(share * units) >= units:  # a share that rounds to every unit is a dense layer, not a mask
            return Sparsity(1.0)
        return Sparsity(max(share, 1e-6), pattern, tuple(block))
    cols = math.prod(shape[1:])
    ms = [m for m in range(2, min(cols, max_m) + 1) if cols % m == 0]
    if not ms:
        raise SparsefxError(f"no M in 2..{max_m} divides the {cols} inputs of a {tuple(shape)} weight; "
                            "raise max_m or use another pattern")
    # Densest n/m not above the share (ties: the smallest M); below every 1/M, the sparsest 1/M.
    fits = [(n / m, -m) for m in ms if (n := math.floor(share * m + 1e-9)) >= 1]  # 1e-9: 0.4 * 5 is 2
    if not fits:
        return Sparsity(1 / ms[-1], "nm", m=ms[-1])
    kept, neg_m = max(fits)
    return Sparsity(kept, "nm", m=-neg_m)


def _mask_module(module: nn.Module) -> _Mask | None:
    if not parametrize.is_parametrized(module, "weight"):
        return None
    return next((p for p in module.parametrizations.weight if isinstance(p, _Mask)), None)


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Enter (or update) masked training for the named layers, in place.

    The original parameter object stays the one being optimised, so an optimizer created
    before this call keeps working; updating masks later only rewrites the buffers."""
    for name, mask in masks.items():
        module = _layer(model, name)
        _check_shape(name, mask, module.weight)
        mask = mask.to(device=module.weight.device, dtype=module.weight.dtype)
        existing = _mask_module(module)
        if existing is None:
            parametrize.register_parametrization(module, "weight", _Mask(mask))
        else:
            existing.mask.copy_(mask)


def current_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    masks = {name: _mask_module(module) for name, module in model.named_modules()}
    return {name: m.mask.bool() for name, m in masks.items() if m is not None}


def remove_masks(model: nn.Module) -> nn.Module:
    """Leave masked training: bake the zeros into plain weights (in place; returns `model`)."""
    for _, module in model.named_modules():
        if _mask_module(module) is not None:
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return model


def weight_density(model: nn.Module) -> float:
    """Fraction of nonzero weights over all Linear/Conv weights (biases and norms excluded)."""
    weights = [model.get_submodule(name).weight.detach() for name in maskable_layers(model)]
    total = sum(w.numel() for w in weights)
    return sum(int(torch.count_nonzero(w)) for w in weights) / total if total else math.nan


class MaskCallback:
    """For a training loop of your own without parametrizations (e.g. one that saves plain
    state_dicts): call `on_step()` after every `optimizer.step()` to zero the pruned weights
    again. Pruned weights can hold momentum, so they must be re-zeroed after every step."""

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
        self.weights = []
        for name, mask in masks.items():
            module = _layer(model, name)
            if parametrize.is_parametrized(module, "weight"):
                raise SparsefxError(f"layer {name!r} is already in masked training (apply_masks); "
                                    "it needs no callback, or call remove_masks first")
            _check_shape(name, mask, module.weight)
            self.weights.append((module.weight, mask.to(module.weight)))
        self.on_step()

    @torch.no_grad()
    def on_step(self) -> None:
        for weight, mask in self.weights:
            weight.mul_(mask)
