"""Remote measurement through a TVM RPC tracker and server on loopback."""

from __future__ import annotations

import pytest
from tvm import rpc
from tvm.rpc.tracker import Tracker

import sparsefx
from sparsefx.backends.tvm import compile
from sparsefx.backends.tvm.remote import measure_remote, parse_tracker

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
