"""The `sparsefx` command end to end on the embedded default model."""

import logging
import time
from pathlib import Path

import pytest
import torch

import sparsefx
from sparsefx.backends.eager import measure_latencies, measure_latency
from sparsefx.capture.models import load_model
from sparsefx.cli.main import main, print_profiles


def test_inspect_default_lists_groups_and_layer_totals(capsys):
    assert main(["inspect", "default"]) == 0
    out = capsys.readouterr().out
    assert "channel groups:" in out
    total_line = [line for line in out.splitlines() if line.startswith("total")]
    assert len(total_line) == 1
    model, inputs = load_model("default")
    assert f"{sparsefx.count_macs(model, inputs):,}" in total_line[0]


def test_prune_default_saves_a_smaller_loadable_model(tmp_path, capsys):
    out_file = tmp_path / "pruned"
    assert main(["prune", "default", "--ratio", "0.5", "--repeat", "2", "--out", str(out_file)]) == 0
    assert "MACs" in capsys.readouterr().out
    pruned = sparsefx.load(out_file)  # rebuilt from the spec stored with it, no pickle
    dense, inputs = load_model("default")
    with torch.inference_mode():
        assert pruned(*inputs).shape == dense(*inputs).shape
    assert sparsefx.count_macs(pruned, inputs) < sparsefx.count_macs(dense, inputs)
    assert sparsefx.count_params(pruned) < sparsefx.count_params(dense)


def test_demo_prunes_and_checks_the_forward_shape(capsys):
    assert main(["demo", "--repeat", "2"]) == 0
    assert "unchanged" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        ["inspect", "no-such-model"],
        ["prune", "torchvision:resnet81", "--out", "x.pt"],
        ["prune", "default", "--out", "/no/such/dir/x.pt"],
    ],
)
def test_user_errors_exit_2_with_one_line(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    # Progress lines ("[sparsefx] ...") may come first; the error itself is one final line.
    assert err.splitlines()[-1].startswith("sparsefx: error: ")
    assert sum(line.startswith("sparsefx:") for line in err.splitlines()) == 1
    assert "Traceback" not in err


def test_bad_ratio_is_rejected_by_argparse():
    with pytest.raises(SystemExit) as info:
        main(["prune", "default", "--ratio", "half", "--out", "x.pt"])
    assert info.value.code == 2


def _sleeps(ms: float):
    return lambda x: time.sleep(ms / 1e3)


def test_measure_latency_reports_ordered_percentiles():
    stats = measure_latency(_sleeps(3.0), (torch.zeros(1),), warmup=1, repeat=5)
    assert stats["runs"] >= 5
    assert 3.0 <= stats["p10_ms"] <= stats["median_ms"] <= stats["p90_ms"]  # a sleep lasts at least its time


def test_measure_latencies_times_every_model():
    latencies = measure_latencies({"a": _sleeps(4.0), "b": _sleeps(1.0)}, (torch.zeros(1),), repeat=4, rounds=2)
    assert set(latencies) == {"a", "b"}
    assert latencies["a"] >= 4.0 and 1.0 <= latencies["b"] < latencies["a"]  # each model's own time, not a mix


@pytest.mark.slow
@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="dataset-fashion-mnist missing")
def test_finetune_then_evaluate_on_fashion_mnist(tmp_path, capsys):
    from sparsefx.recovery.zoo import ZOO

    torch.manual_seed(0)
    dense = ZOO["lenet5"]()
    torch.save(dense, tmp_path / "dense.pt")
    assert main(["finetune", str(tmp_path / "dense.pt"), "--epochs", "1", "--train-limit", "2000",
                 "--out", str(tmp_path / "tuned.pt")]) == 0
    assert main(["evaluate", str(tmp_path / "tuned.pt"), "--reference", str(tmp_path / "dense.pt"),
                 "--corruptions", "noise"]) == 0
    out = capsys.readouterr().out
    assert "epoch 1: loss" in out and "| class |" in out and "noise: accuracy" in out


def test_evaluate_missing_model_is_one_line_error(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "nope.pt")]) == 2
    assert "no saved model" in capsys.readouterr().err


def test_bench_profile_table_sets_kinds_side_by_side(capsys):
    rows = {"tvm dense": [{"name": "pointwise_8to16", "kind": "pointwise", "shapes": [[1, 8, 4, 4]], "ms": 0.4},
                          {"name": "vm.builtin.alloc_tensor", "kind": "vm", "shapes": [], "ms": 0.01}],
            "tvm pruned": [{"name": "pointwise_4to8", "kind": "pointwise", "shapes": [[1, 4, 4, 4]], "ms": 0.1}]}
    print_profiles(rows)
    out = capsys.readouterr().out.splitlines()
    assert [line.split() for line in out if line.startswith(("pointwise", "vm", "total"))] == [
        ["pointwise", "0.400", "0.100"], ["vm", "0.010", "0.000"], ["total", "0.410", "0.100"]]
    assert any("pointwise_8to16  1x8x4x4" in line for line in out)


@pytest.mark.parametrize("flags", [[], ["-q"], ["inspect", "--quiet"], ["-v"]])
def test_status_lines_follow_verbose_and_quiet(flags, capsys):
    argv = [*flags, "inspect", "default"] if flags[:1] != ["inspect"] else [*flags, "default"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    quiet = "-q" in flags or "--quiet" in flags
    assert ("[sparsefx] loading default" in captured.err) != quiet
    assert "channel groups:" in captured.out  # the report itself is never silenced
    logger = logging.getLogger("sparsefx")
    assert not [h for h in logger.handlers if not isinstance(h, logging.NullHandler)]  # main leaves no handler
