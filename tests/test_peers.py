"""The peer runtimes benchmarks compare with: each builds a small model and matches eager."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from sparsefx.backends.peers import RUNTIMES, PeerError, Peers, available
from sparsefx.capture.compare import TOLERANCE, calibrate_norm_statistics, check_reference, output_error
from sparsefx.cli.main import main

pytestmark = pytest.mark.usefixtures("private_cache")


def _model() -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    inputs = (torch.randn(1, 3, 16, 16),)
    calibrate_norm_statistics(model, inputs)
    return model.eval(), inputs


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.skipif(not available(n), reason=f"{n} not installed"))
                                  for n in ("eager", "onnxruntime", "openvino-fp32", "openvino")])
def test_peer_runs_the_model_like_eager(name: str, tmp_path) -> None:
    model, inputs = _model()
    expected = check_reference(model, inputs)
    runner = Peers(model, inputs, threads=1, workdir=tmp_path / "new").build(name)  # made if missing
    error = output_error(expected, runner(*inputs))
    # OpenVINO's default precision is bf16 on CPUs with bf16 instructions: about 1e-2, not fp32's 1e-7
    assert error.ok(TOLERANCE if name != "openvino" else 3e-2), error
    assert runner.compile_s >= 0 and runner.name == name


@pytest.mark.skipif(not available("onnxruntime"), reason="onnxruntime not installed")
def test_onnxruntime_session_uses_the_threads_asked_for(tmp_path) -> None:
    model, inputs = _model()
    runner = Peers(model, inputs, threads=2, workdir=tmp_path).build("onnxruntime")
    assert runner.native.get_session_options().intra_op_num_threads == 2


def test_unknown_and_missing_runtimes_are_one_line_errors(monkeypatch) -> None:
    model, inputs = _model()
    with pytest.raises(PeerError, match="unknown runtime 'tensorrt'"):
        Peers(model, inputs, threads=1).build("tensorrt")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    with pytest.raises(PeerError, match="pip install openvino"):
        Peers(model, inputs, threads=1).build("openvino")
    assert "sparsefx" in RUNTIMES and available("eager")


@pytest.mark.skipif(not (available("onnxruntime") and available("openvino")), reason="onnxruntime/openvino not installed")
def test_cli_bench_prints_the_peers_beside_sparsefx(capsys) -> None:
    assert main(["bench", "default", "--prune", "0.5", "--vs", "onnxruntime,openvino", "--repeat", "2",
                 "--threads", "1"]) == 0
    names = [line.split()[0] + " " + line.split()[1] for line in capsys.readouterr().out.splitlines()[1:]]
    assert names == ["eager dense", "eager pruned", "tvm dense", "tvm pruned", "onnxruntime dense",
                     "onnxruntime pruned", "openvino dense", "openvino pruned"]


def test_cli_bench_refuses_an_unknown_peer(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "default", "--vs", "onnxruntime,tvm"])
    assert exit_.value.code == 2 and "unknown runtime 'tvm'" in capsys.readouterr().err
