"""Remote measurement through a TVM RPC tracker and server on loopback."""

from __future__ import annotations

import time

import pytest
from tvm import rpc
from tvm.rpc.tracker import Tracker

import sparsefx
from sparsefx.backends.tvm import compile
from sparsefx.backends.tvm.measure.remote_kernels import RemoteTimer
from sparsefx.backends.tvm.remote import measure_remote, parse_tracker
from sparsefx.cost.kernel import conv2d_kernel, matmul_kernel
from sparsefx.planning.pricing import cost_model
from sparsefx.target import resolve_target

from .models_zoo import CASES


@pytest.fixture(scope="module")
def device():
    tracker = Tracker("127.0.0.1", port=9190, port_end=9290, silent=True)
    server = rpc.Server("127.0.0.1", port=9300, port_end=9400, key="sfx-test",
                        tracker_addr=("127.0.0.1", tracker.port), silent=True)
    yield f"127.0.0.1:{tracker.port}"
    server.terminate()
    tracker.terminate()


def test_latency_measured_on_the_rpc_device(device, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEFX_CACHE", str(tmp_path))
    build, make_inputs = CASES["residual"]
    compiled = compile(build().eval(), make_inputs(), dispatch=False, verbose=False)
    result = measure_remote(compiled, device, "sfx-test", repeat=3)
    assert result["runs"] == 3 and 0 < result["min_ms"] <= result["median_ms"]


def test_unreachable_device_is_a_clear_error(device, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEFX_CACHE", str(tmp_path))
    build, make_inputs = CASES["residual"]
    compiled = compile(build().eval(), make_inputs(), dispatch=False, verbose=False)
    with pytest.raises(sparsefx.SparsefxError, match="cannot reach device 'nope'"):
        measure_remote(compiled, device, "nope", repeat=1, timeout_s=2)
    with pytest.raises(sparsefx.SparsefxError, match="HOST:PORT"):
        parse_tracker("localhost")


def test_cost_model_times_kernels_on_the_rpc_device_in_a_table_of_its_own(device, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEFX_CACHE", str(tmp_path))
    cost = cost_model("cpu", rpc=(device, "sfx-test"))
    conv = conv2d_kernel((1, 16, 16, 16), (1, 32, 16, 16), 1, (3, 3), (1, 1), (1, 1), (1, 1),
                         cost.lanes).with_epilogue("relu", True)
    depthwise = conv2d_kernel((1, 32, 16, 16), (1, 32, 8, 8), 32, (3, 3), (2, 2), (1, 1), (1, 1), cost.lanes)
    matmul = matmul_kernel(1, 8, 64, 64, cost.lanes)
    times = [cost.latency(k) for k in (conv, depthwise, matmul)]
    assert all(t > 0 for t in times) and cost.sources == {"measured": 3}
    cost.save()
    assert cost.path.name.endswith("-rpc-sfx-test.json")
    again = cost_model("cpu", rpc=(device, "unreachable-but-cached"), path=cost.path)
    assert [again.latency(k) for k in (conv, depthwise, matmul)] == times  # from the table, no session needed
    assert not (tmp_path / "costmodel" / f"{cost.target.arch}-{cost.target.cores}.json").exists()


def test_an_expired_session_is_replaced(device, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEFX_CACHE", str(tmp_path))
    remote = RemoteTimer(device, "sfx-test", resolve_target("cpu"), repeat=1, session_s=2)
    kernel = matmul_kernel(1, 8, 64, 64, 16)
    assert remote.time([kernel])[0]["tir"] > 0
    first = remote._session
    time.sleep(2.5)
    assert remote.time([kernel])[0]["tir"] > 0 and remote._session is not first


def test_cli_plan_on_the_rpc_device(device, tmp_path, monkeypatch, capsys):
    from sparsefx.cli.main import main
    from sparsefx.planning.plan import Plan

    monkeypatch.setenv("SPARSEFX_CACHE", str(tmp_path))
    out = tmp_path / "plan.json"
    assert main(["plan", "default", "--speedup", "1.2", "--rpc", device, "--out", str(out)]) == 2
    assert "--rpc-key" in capsys.readouterr().err
    # three convs, not the default ResNet: the plan times each candidate kernel over RPC
    (tmp_path / "convs.py").write_text(
        "from torch import nn\n\ndef build():\n    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), "
        "nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), "
        "nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))\n")
    assert main(["plan", f"{tmp_path / 'convs.py'}:build", "--input-shape", "1,3,16,16", "--speedup", "1.2", "--rpc",
                 device, "--rpc-key", "sfx-test", "--out", str(out)]) == 0
    assert Plan.load(out).predicted["speedup"] >= 1.2
    assert list((tmp_path / "costmodel").glob("*-rpc-sfx-test.json"))
