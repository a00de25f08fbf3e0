"""`plan` and `compile` commands answered from what the same command kept (`cli.recipe`): without
PyTorch, the same files and output, and never where the command, its cost tables or the entry differ."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparsefx.cli import recipe
from sparsefx.cli.main import main

pytestmark = pytest.mark.usefixtures("private_cache")


def test_only_plans_of_named_models_without_calibration_or_sparse_kernels_are_kept_by_command() -> None:
    words, out, model = recipe.command_of(["-q", "plan", "torchvision:resnet18", "--speedup", "2", "--out", "p.json"])
    assert words == ["-q", "plan", "torchvision:resnet18", "--speedup", "2", "--out"] and out == Path("p.json")
    assert model == "torchvision:resnet18"
    assert recipe.command_of(["plan", "default", "--granularity", "channel", "--macs-ratio", "0.5", "--out", "p"])
    assert recipe.command_of(["compile", "hf:bert-base", "--threads", "1", "--out", "m.sfx"])[0][0] == "compile"
    for argv in (["plan", "net.py:build", "--speedup", "2", "--out", "p"],  # a file: its code may change
                 ["plan", "saved_dir", "--speedup", "2", "--out", "p"],
                 ["plan", "default", "--speedup", "2", "--out", "p", "--no-cache"],
                 ["plan", "default", "--speedup", "2", "--out", "p", "--calibration", "data.pt"],
                 ["plan", "default", "--granularity", "channel,block", "--speedup", "2", "--out", "p"],
                 ["plan", "--speedup", "2", "default", "--out", "p"],  # options before the model
                 ["plan", "default", "--speedup", "2"],  # no --out
                 ["compile", "default", "--out", "m.sfx", "--bundle", "b"],
                 ["inspect", "default"]):
        assert recipe.command_of(argv) is None, argv


@pytest.mark.parametrize(("argv", "suffix"), [(["plan", "default", "--macs-ratio", "0.5"], "json"),
                                             (["compile", "default", "--threads", "1"], "sfx")])
def test_a_kept_result_is_written_again_without_importing_pytorch(argv: list[str], suffix: str, tmp_path: Path,
                                                                   capsys) -> None:
    first_out, second_out = str(tmp_path / f"a.{suffix}"), str(tmp_path / f"b.{suffix}")
    assert main([*argv, "--out", first_out]) == 0
    first = capsys.readouterr().out.replace(first_out, "OUT")
    script = ("import sys; from sparsefx.cli import console; "
              f"code = console({[*argv, '--out', second_out]!r}); "
              "assert code == 0 and 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)[:3]")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=os.environ)
    assert done.returncode == 0, done.stderr
    second = done.stdout.replace(second_out, "OUT")
    if suffix == "json":
        assert "its plan is given back" in done.stderr and second == first
    else:  # the same summary, saying it was reused
        assert "reused the artifact" in second and second.splitlines()[0] == first.splitlines()[0]
        assert second.splitlines()[2:] == first.splitlines()[2:]
    assert Path(second_out).read_bytes() == Path(first_out).read_bytes()


def test_a_changed_cost_table_or_a_damaged_entry_plans_again(tmp_path: Path, caplog) -> None:
    argv = ["plan", "default", "--macs-ratio", "0.5", "--out", str(tmp_path / "a.json")]
    assert main(argv) == 0
    assert recipe.kept(argv) is not None
    entry = next((recipe.cache_dir() / "commands").glob("*.json"))
    tables = list(json.loads(entry.read_text())["entries"]["tables"])
    Path(tables[0]).parent.mkdir(parents=True, exist_ok=True)
    saved = Path(tables[0]).read_bytes() if Path(tables[0]).is_file() else None
    Path(tables[0]).write_text("{}")  # another measurement (or any change) since the plan
    assert recipe.kept(argv) is None
    if saved is None:
        Path(tables[0]).unlink()
    else:
        Path(tables[0]).write_bytes(saved)
    assert recipe.kept(argv) is not None
    data = json.loads(entry.read_text())
    data["entries"]["plan"]["entries"] = [{"granularity": "channel"}]  # no name: not a plan
    entry.write_text(json.dumps(data))
    assert recipe.kept(argv) is None and not entry.exists()
    assert "could not be read" in caplog.text
    assert main(argv) == 0 and recipe.kept(argv) is not None  # planned again and kept again
