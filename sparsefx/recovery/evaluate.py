"""Accuracy overall, per class, against a dense reference, and on corrupted inputs.

The overall number hides where pruning hurts: some classes lose far more than the mean, and
a pruned model can be more brittle under distribution shift. Accuracies are fractions in
[0, 1]; drops are reference minus model (positive = worse than the reference).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from sparsefx.errors import SparsefxError

# Default severities, in units of the normalised data (std about 1): noise std, blur sigma in
# pixels, and the fraction of contrast kept. Chosen so a dense Fashion-MNIST model loses a few
# to tens of points, enough to separate models without reducing them all to chance.
CORRUPTIONS = {"noise": 0.5, "blur": 1.0, "contrast": 0.3}
Batches = Iterable[Sequence[torch.Tensor]]


@dataclass
class ClassScore:
    name: str
    count: int
    correct: int
    accuracy: float  # nan when the class has no samples
    reference: float | None = None
    drop: float | None = None


@dataclass
class Evaluation:
    accuracy: float
    correct: int
    total: int
    classes: list[ClassScore]
    reference_accuracy: float | None = None
    model: nn.Module | None = field(default=None, repr=False, compare=False)
    data: Batches | None = field(default=None, repr=False, compare=False)
    reference: nn.Module | None = field(default=None, repr=False, compare=False)

    def drops(self) -> list[ClassScore]:
        """Classes with samples, largest drop against the reference first (empty without one)."""
        scored = [c for c in self.classes if c.drop is not None and c.count]
        return sorted(scored, key=lambda c: c.drop, reverse=True)

    @property
    def worst_drop(self) -> ClassScore | None:
        drops = self.drops()
        return drops[0] if drops else None

    def corrupted(self, kind: str = "noise", severity: float | None = None, seed: int = 0) -> Evaluation:
        """The same evaluation on a corrupted copy of the data (the reference sees the same copy)."""
        if self.model is None or self.data is None:
            raise SparsefxError("this evaluation holds no model and data to corrupt; build it with sparsefx.evaluate")
        batches = CorruptedLoader(self.data, kind, severity, seed)
        return evaluate(self.model, batches, self.reference, [c.name for c in self.classes])

    def to_dict(self) -> dict:
        return {"accuracy": self.accuracy, "correct": self.correct, "total": self.total,
                "reference_accuracy": self.reference_accuracy, "classes": [asdict(c) for c in self.classes]}

    def table(self) -> str:
        """Markdown table of the classes, largest drop first when there is a reference."""
        rows = self.drops() or self.classes
        lines = ["| class | samples | accuracy | reference | drop (points) |", "|---|---:|---:|---:|---:|"]
        for c in rows:
            ref = "" if c.reference is None else f"{100 * c.reference:.1f}"
            drop = "" if c.drop is None else f"{100 * c.drop:+.1f}"
            lines.append(f"| {c.name} | {c.count} | {100 * c.accuracy:.1f} | {ref} | {drop} |")
        return "\n".join(lines)


@contextlib.contextmanager
def _eval_mode(*models: nn.Module | None) -> Iterator[None]:
    modes = [(m, m.training) for m in models if m is not None]
    for m, _ in modes:
        m.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.train(training)


def _scores(logits: object, classes: int | None, who: str) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise SparsefxError(f"{who} must return one row of class scores per sample (N×classes), got {shape}")
    if classes is not None and logits.shape[1] != classes:
        raise SparsefxError(f"{who} outputs {logits.shape[1]} scores per sample but there are {classes} classes")
    return logits


def _batch(batch: object) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise SparsefxError("the loader must yield (inputs, labels) batches")
    x, y = batch
    if not isinstance(y, torch.Tensor) or y.dtype.is_floating_point or y.dim() != 1:
        raise SparsefxError(f"labels must be a 1-D integer tensor, got {getattr(y, 'dtype', type(y).__name__)}")
    return x, y


def evaluate(model: nn.Module, loader: Batches, reference: nn.Module | None = None,
             class_names: Sequence[str] | None = None) -> Evaluation:
    """Overall and per-class accuracy of `model` on `loader` ((inputs, labels) batches), with
    per-class drops against `reference` (e.g. the dense model) when given."""
    classes = len(class_names) if class_names is not None else None
    counts = correct = ref_correct = None
    with torch.inference_mode(), _eval_mode(model, reference):
        for batch in loader:
            x, y = _batch(batch)
            logits = _scores(model(x), classes, "the model")
            classes = logits.shape[1]
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= classes):
                raise SparsefxError(f"labels must be in [0, {classes}), found {int(y.min())}..{int(y.max())}")
            if counts is None:
                counts, correct, ref_correct = (torch.zeros(classes, dtype=torch.long) for _ in range(3))
            counts += torch.bincount(y, minlength=classes)
            correct += torch.bincount(y[logits.argmax(1) == y], minlength=classes)
            if reference is not None:
                ref_logits = _scores(reference(x), classes, "the reference model")
                ref_correct += torch.bincount(y[ref_logits.argmax(1) == y], minlength=classes)
    if counts is None or int(counts.sum()) == 0:
        raise SparsefxError("the loader yielded no samples; pass a loader over a non-empty dataset")
    names = list(class_names) if class_names is not None else [str(i) for i in range(classes)]
    scores = []
    for i, name in enumerate(names):
        n = int(counts[i])
        acc = int(correct[i]) / n if n else math.nan
        ref = (int(ref_correct[i]) / n if n else math.nan) if reference is not None else None
        drop = ref - acc if ref is not None and n else None
        scores.append(ClassScore(name, n, int(correct[i]), acc, ref, drop))
    total = int(counts.sum())
    ref_acc = int(ref_correct.sum()) / total if reference is not None else None
    return Evaluation(int(correct.sum()) / total, int(correct.sum()), total, scores, ref_acc, model, loader, reference)


def corrupt(x: torch.Tensor, kind: str, severity: float, generator: torch.Generator) -> torch.Tensor:
    """A corrupted copy of a batch: Gaussian noise (std = severity), Gaussian blur (sigma =
    severity pixels, N×C×H×W only) or reduced contrast (keep `severity` of each image's
    deviation from its mean). All three are affine-compatible, so they mean the same on
    normalised data as on raw pixels (blur pads by replication for that reason)."""
    if kind == "noise":
        return x + severity * torch.randn(x.shape, generator=generator, dtype=x.dtype)
    if kind == "contrast":
        mean = x.mean(dim=tuple(range(1, x.dim())), keepdim=True)
        return mean + severity * (x - mean)
    if kind == "blur":
        if x.dim() != 4:
            raise SparsefxError(f"blur needs N×C×H×W images, got shape {tuple(x.shape)}")
        radius = max(1, math.ceil(2 * severity))
        taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=x.dtype) / severity) ** 2)
        taps = taps / taps.sum()
        channels = x.shape[1]
        x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
        x = F.conv2d(x, taps.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
        return F.conv2d(x, taps.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)
    raise SparsefxError(f"unknown corruption {kind!r}; use one of {', '.join(CORRUPTIONS)}")


class CorruptedLoader:
    """The loader's batches corrupted with a fixed seed: every pass, and every model, sees the
    same corrupted copy."""

    def __init__(self, loader: Batches, kind: str = "noise", severity: float | None = None, seed: int = 0) -> None:
        if kind not in CORRUPTIONS:
            raise SparsefxError(f"unknown corruption {kind!r}; use one of {', '.join(CORRUPTIONS)}")
        severity = CORRUPTIONS[kind] if severity is None else severity
        if not isinstance(severity, (int, float)) or severity <= 0:
            raise SparsefxError(f"severity must be a positive number, got {severity!r}")
        self.loader, self.kind, self.severity, self.seed = loader, kind, float(severity), seed

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed)
        for batch in self.loader:
            x, y = _batch(batch)
            yield corrupt(x, self.kind, self.severity, generator), y
