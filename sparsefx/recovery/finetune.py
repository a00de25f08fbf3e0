"""Recover accuracy after pruning: fine-tuning, optionally distilled from the dense model.

Also trains from scratch (a random model is just a model to fine-tune). With a
`GradualPruner` the sparsity grows during training, which is how the extreme levels are
reached: each step removes a little and the rest of training repairs it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from sparsefx.errors import SparsefxError
from sparsefx.recovery.evaluate import Batches, evaluate
from sparsefx.recovery.schedules import GradualPruner


@dataclass
class History:
    """Per-epoch mean training loss and validation accuracy (empty without a val_loader).

    `model` is the trained model: the one passed in, or the last smaller one that a
    channel-removing pruner produced."""

    loss: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    seconds: float = 0.0
    model: nn.Module | None = field(default=None, repr=False)


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      temperature: float = 4.0, alpha: float = 0.5) -> torch.Tensor:
    """Hinton et al. (2015): alpha · T² · KL(teacher_T || student_T) + (1 - alpha) · CE(labels).

    T² keeps the soft term's gradients on the same scale as the hard term's as T changes."""
    soft = F.kl_div(F.log_softmax(logits / temperature, dim=1), F.log_softmax(teacher_logits / temperature, dim=1),
                    reduction="batchmean", log_target=True)
    return alpha * temperature ** 2 * soft + (1 - alpha) * F.cross_entropy(logits, labels)


def _check(epochs: int, lr: float, temperature: float, alpha: float) -> None:
    if not isinstance(epochs, int) or epochs < 1:
        raise SparsefxError(f"epochs must be a positive integer, got {epochs!r}")
    if not isinstance(lr, (int, float)) or not lr > 0:
        raise SparsefxError(f"lr must be a positive number, got {lr!r}")
    if not temperature > 0:
        raise SparsefxError(f"temperature must be positive, got {temperature!r}")
    if not 0 <= alpha <= 1:
        raise SparsefxError(f"alpha must be in [0, 1] (the weight of the distillation term), got {alpha!r}")


def finetune(model: nn.Module, train_loader: Batches, epochs: int = 3, lr: float = 1e-3,
             distill_from: nn.Module | None = None, temperature: float = 4.0, alpha: float = 0.5,
             val_loader: Batches | None = None, progress: bool = True, pruner: GradualPruner | None = None,
             weight_decay: float = 0.0) -> History:
    """Train `model` in place with Adam and a cosine learning-rate decay to zero.

    `distill_from` (e.g. the dense model) adds knowledge distillation on softened logits.
    `pruner.step(t)` runs before every optimizer step t (counting from 0 across epochs).
    """
    _check(epochs, lr, temperature, alpha)
    try:
        total = epochs * len(train_loader)  # type: ignore[arg-type]
    except TypeError:
        raise SparsefxError("train_loader needs a len() (the learning-rate decay spans the whole run)") from None
    if total == 0:
        raise SparsefxError("train_loader yields no batches; pass a loader over a non-empty dataset")
    if distill_from is not None:
        distill_from.eval()
    history, started, t = History(), time.perf_counter(), 0
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    bind = getattr(pruner, "bind", None)  # pruners that edit per-weight optimizer state (CompactSET)
    if bind is not None:
        bind(optimizer)
    bar = tqdm(total=total, disable=not progress, desc="finetune", leave=False)
    try:
        for epoch in range(epochs):
            model.train()
            loss_sum, batches = 0.0, 0
            for x, y in train_loader:
                if pruner is not None:
                    model = pruner.step(t)
                    if pruner.changed:  # channels were removed: a new model with new parameters
                        model.train()
                        optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
                        if bind is not None:
                            bind(optimizer)
                for group in optimizer.param_groups:
                    group["lr"] = 0.5 * lr * (1 + math.cos(math.pi * t / total))
                logits = model(x)
                if distill_from is None:
                    loss = F.cross_entropy(logits, y)
                else:
                    with torch.no_grad():
                        teacher = distill_from(x)
                    loss = distillation_loss(logits, teacher, y, temperature, alpha)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum, batches, t = loss_sum + loss.item(), batches + 1, t + 1
                bar.update()
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss_sum / batches:.4f}")
            history.loss.append(loss_sum / batches)
            if val_loader is not None:
                history.val_accuracy.append(evaluate(model, val_loader).accuracy)
    finally:
        bar.close()
    history.seconds, history.model = time.perf_counter() - started, model.eval()
    return history
