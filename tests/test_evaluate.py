"""evaluate(): per-class report adds up, drops against a reference, corruptions, plots, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import sparsefx
from sparsefx import SparsefxError
from sparsefx.recovery.data import batches
from sparsefx.recovery.evaluate import CorruptedLoader, corrupt, evaluate


class Fixed(nn.Module):
    """Predicts a given label per sample (the sample's first pixel holds its index)."""

    def __init__(self, predictions: torch.Tensor, classes: int = 3) -> None:
        super().__init__()
        self.predictions, self.classes = predictions, classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(self.predictions[x[:, 0].long()], self.classes).float()


@pytest.fixture
def data() -> tuple[TensorDataset, torch.Tensor]:
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
    return TensorDataset(torch.arange(10.0).unsqueeze(1), labels), labels


def test_per_class_report_adds_up(data):
    dataset, labels = data
    model = Fixed(torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 0]))  # right on 0:3/4, 1:1/2, 2:3/4
    result = evaluate(model, batches(dataset, 3), class_names=["a", "b", "c"])
    assert [c.count for c in result.classes] == [4, 2, 4] and sum(c.count for c in result.classes) == result.total
    assert [c.accuracy for c in result.classes] == [0.75, 0.5, 0.75]
    weighted = sum(c.accuracy * c.count for c in result.classes) / result.total
    assert result.accuracy == pytest.approx(weighted) == 0.7 and result.correct == 7
    assert result.drops() == [] and result.worst_drop is None and "| b | 2 | 50.0 |" in result.table()


def test_drops_against_reference_largest_first(data):
    dataset, labels = data
    model = Fixed(torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 0]))
    result = evaluate(model, batches(dataset, 4), reference=Fixed(labels.clone()))
    assert result.reference_accuracy == 1.0
    assert [(c.name, c.drop) for c in result.drops()] == [("1", 0.5), ("0", 0.25), ("2", 0.25)]
    assert result.worst_drop.name == "1" and result.to_dict()["classes"][1]["reference"] == 1.0


def test_corruptions_are_deterministic_and_hurt():
    torch.manual_seed(0)
    x = torch.randn(4, 1, 12, 12)
    g = lambda: torch.Generator().manual_seed(3)
    assert torch.equal(corrupt(x, "noise", 0.5, g()), corrupt(x, "noise", 0.5, g()))
    blurred = corrupt(x, "blur", 1.0, g())
    assert blurred.shape == x.shape and blurred.std() < x.std()
    flat = torch.full((1, 1, 5, 5), 2.0)
    torch.testing.assert_close(corrupt(flat, "blur", 1.5, g()), flat)  # replicate padding: no dark border
    low = corrupt(x, "contrast", 0.3, g())
    torch.testing.assert_close(low.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)))
    torch.testing.assert_close(low - low.mean(dim=(1, 2, 3), keepdim=True), 0.3 * (x - x.mean(dim=(1, 2, 3), keepdim=True)))


def test_corrupted_evaluation_of_a_trained_model():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 1, 6, 6, generator=g)
    y = (x[:, 0, :3, :3].mean((1, 2)) > x[:, 0, 3:, 3:].mean((1, 2))).long()  # a blob-contrast task
    loader = batches(TensorDataset(x, y), 100)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 2))
    sparsefx.finetune(model, batches(TensorDataset(x, y), 50, shuffle=True), epochs=10, lr=0.05, progress=False)
    clean = evaluate(model, loader, reference=model)
    noisy = clean.corrupted("noise", severity=2.0)
    assert clean.accuracy > 0.9 and noisy.accuracy < clean.accuracy and noisy.total == clean.total
    assert noisy.accuracy == clean.corrupted("noise", severity=2.0).accuracy  # same seed, same copy
    assert all(c.drop == 0 for c in noisy.drops())  # the reference sees the same corrupted copy


def test_plots_write_pngs(tmp_path, data):
    from sparsefx.recovery.plots import pareto_front, plot_class_drops, plot_tradeoff

    dataset, labels = data
    points = [{"accuracy": a, "density": d, "latency_ms": t, "label": lab}
              for a, d, t, lab in [(0.9, 1.0, 2.0, "dense"), (0.89, 0.5, 1.0, "ch"), (0.85, 0.3, 1.5, "ch")]]
    assert [p["accuracy"] for p in pareto_front(points)] == [0.89, 0.9]
    result = evaluate(Fixed(torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 0])), batches(dataset, 5), Fixed(labels))
    for path in (plot_tradeoff(points, tmp_path / "t.png"), plot_class_drops(result, tmp_path / "d.png")):
        assert path.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("make, message", [
    (lambda ds: (Fixed(torch.zeros(10, dtype=torch.long)), []), "no samples"),
    (lambda ds: (Fixed(torch.zeros(10, dtype=torch.long)), [(ds.tensors[0], ds.tensors[1] + 5)]), r"labels must be in \[0, 3\)"),
    (lambda ds: (Fixed(torch.zeros(10, dtype=torch.long), classes=4), batches(ds, 5)), "outputs 4 scores .* 3 classes"),
    (lambda ds: (nn.Flatten(0), batches(ds, 5)), "one row of class scores"),
    (lambda ds: (Fixed(torch.zeros(10, dtype=torch.long)), [ds.tensors[0]]), r"\(inputs, labels\) batches"),
    (lambda ds: (Fixed(torch.zeros(10, dtype=torch.long)), [(ds.tensors[0], ds.tensors[1].float())]), "integer tensor"),
])
def test_bad_input_fails_in_one_line(data, make, message):
    model, loader = make(data[0])
    with pytest.raises(SparsefxError, match=message) as info:
        evaluate(model, loader, class_names=["a", "b", "c"])
    assert "\n" not in str(info.value)


def test_bad_corruption_and_reference_mismatch(data):
    dataset, labels = data
    with pytest.raises(SparsefxError, match="unknown corruption"):
        CorruptedLoader(batches(dataset, 5), "fog")
    with pytest.raises(SparsefxError, match="reference model outputs 4"):
        evaluate(Fixed(labels), batches(dataset, 5), reference=Fixed(labels, classes=4))
