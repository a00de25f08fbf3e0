"""`sparsefx prune --importance wanda --calibration PATH` (text as byte tokens, or a .pt of batches) and
`--experts N` on a small Hugging Face mixture-of-experts spec."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

import sparsefx
import sparsefx.cli.plan
from sparsefx.channels.moe_layout import moe_blocks
from sparsefx.cli.calibration import read_calibration
from sparsefx.cli.main import main

pytest.importorskip("transformers")
MIXTRAL = ("hf:mixtral?layers=1&hidden_size=64&intermediate_size=32&num_attention_heads=4&num_key_value_heads=2"
           "&head_dim=16&num_local_experts=4&num_experts_per_tok=2&vocab_size=300")
TEXT = Path(__file__).read_bytes()  # any text: its bytes are the tokens


def test_prune_with_text_calibration_and_experts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """The text's bytes reach prune as (1, 32) token batches, in order; one expert goes first, then
    heads and expert units; the saved model loads from its spec (replaying the expert step, the graph
    step and the unit step in that order) with the smaller sizes."""
    (tmp_path / "corpus.txt").write_bytes(TEXT)
    seen = {}
    prune = sparsefx.prune

    def spy(*args: object, **kwargs: object) -> torch.nn.Module:
        seen.update(kwargs)
        return prune(*args, **kwargs)

    monkeypatch.setattr(sparsefx, "prune", spy)
    out = tmp_path / "pruned"
    argv = ["prune", MIXTRAL, "--input-shape", "1,32", "--importance", "wanda", "--calibration",
            str(tmp_path / "corpus.txt"), "--calibration-batches", "3", "--experts", "1", "--ratio", "0.5",
            "--repeat", "1", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    batches = seen["calibration"]
    assert [tuple(b.shape) for b in batches] == [(1, 32)] * 3 and seen["importance"] == "wanda"
    assert bytes(torch.cat(batches, 1).flatten().tolist()) == TEXT[:96]
    loaded = sparsefx.load(out)
    assert [(b.num_experts, b.width) for b in moe_blocks(loaded)] == [(3, 16)]
    assert loaded.config.num_local_experts == 3 and loaded.config.intermediate_size == 16
    assert [step["method"] for step in loaded.sparsefx_removal["steps"]] == ["moe", "export", "moe"]
    assert loaded.layers[0].self_attn.o_proj.in_features == 32  # heads pruned too, replayed between the two


def test_pt_calibration_is_read_without_unpickling(tmp_path: Path) -> None:
    torch.save([torch.arange(8).view(1, 8), torch.arange(8, 16).view(1, 8)], tmp_path / "batches.pt")
    args = argparse.Namespace(importance="taylor", calibration=tmp_path / "batches.pt", calibration_batches=8)
    data = read_calibration(args, torch.nn.Linear(2, 2), (torch.zeros(1, 8, dtype=torch.long),))
    assert [t.tolist() for t in data] == [[list(range(8))], [list(range(8, 16))]]


@pytest.mark.parametrize("extra, message", [
    (["--importance", "l1"], "add --importance wanda or taylor"),
    (["--importance", "wanda", "--calibration-batches", "2", "--input-shape", "1,4096"], "holds"),
    (["--importance", "wanda", "--input-shape", "1,8", "--calibration-batches", "0"], "must be 1..64"),
])
def test_calibration_mistakes_are_one_line_errors(tmp_path: Path, capsys, extra: list[str], message: str) -> None:
    (tmp_path / "short.txt").write_bytes(TEXT[:2000])
    argv = ["prune", MIXTRAL, "--calibration", str(tmp_path / "short.txt"), *extra, "--out", str(tmp_path / "x")]
    assert main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("sparsefx: error: --calibration") and message in last


def test_text_calibration_needs_token_inputs(tmp_path: Path, capsys) -> None:
    (tmp_path / "t.txt").write_text("hello " * 100)
    argv = ["prune", "default", "--importance", "wanda", "--calibration", str(tmp_path / "t.txt"),
            "--out", str(tmp_path / "x")]
    assert main(argv) == 2
    assert "not (N, T) token ids; pass a .pt file" in capsys.readouterr().err


LLAMA = ("hf:llama?layers=1&hidden_size=64&intermediate_size=128&num_attention_heads=4&num_key_value_heads=2"
         "&head_dim=16&vocab_size=300")


def test_plan_takes_calibration_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """`sparsefx plan --importance taylor --calibration` feeds the batches to the planner, and taylor
    scores a bare decoder (hidden states out, not vocabulary logits) without a cross-entropy over them."""
    (tmp_path / "corpus.txt").write_bytes(TEXT)
    seen = {}
    plan = sparsefx.cli.plan.plan

    def spy(*args: object, **kwargs: object) -> object:
        seen.update(kwargs)
        return plan(*args, **kwargs)

    monkeypatch.setattr(sparsefx.cli.plan, "plan", spy)
    argv = ["plan", LLAMA, "--input-shape", "1,16", "--macs-ratio", "0.6", "--importance", "taylor", "--calibration",
            str(tmp_path / "corpus.txt"), "--calibration-batches", "2", "--out", str(tmp_path / "plan.json")]
    assert main(argv) == 0, capsys.readouterr().err
    assert [tuple(b.shape) for b in seen["calibration"]] == [(1, 16)] * 2 and seen["importance"] == "taylor"
    assert (tmp_path / "plan.json").is_file()
