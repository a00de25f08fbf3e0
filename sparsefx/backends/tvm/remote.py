"""Latency measured on another device through TVM's RPC tracker and server.

How users reach a phone or an edge board: the device runs `python -m tvm.exec.rpc_server
--tracker HOST:PORT --key KEY`, this host uploads the compiled library and times it there.
The remote side has the TVM runtime only, so artifacts measured this way must be compiled
with `dispatch=False` (no PyTorch kernels).
"""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path

import numpy as np
import tvm
from tvm import relax, rpc

from sparsefx.backends.tvm.compiler import CompiledModel, quiet_native_stderr
from sparsefx.errors import SparsefxError, one_line


def parse_tracker(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise SparsefxError(f"tracker address {address!r} is not HOST:PORT, e.g. 127.0.0.1:9190")
    return host, int(port)


def connect(tracker: str, key: str, timeout_s: int = 60) -> rpc.RPCSession:
    """A session on the device the tracker serves under `key` (one-line error if there is none)."""
    host, port = parse_tracker(tracker)
    hint = "start one with python -m tvm.exec.rpc_server --tracker HOST:PORT --key KEY"
    try:
        client = rpc.connect_tracker(host, port)
        # A request for a key nobody serves waits forever: ask the tracker first.
        keys = {info["key"].split(":", 1)[-1] for info in client.summary().get("server_info", [])}
        if key not in keys:
            raise LookupError(f"the tracker knows {sorted(keys) or 'no devices'}")
        return client.request(key, priority=1, session_timeout=timeout_s)
    except Exception as error:  # connection refused, unknown key, timeout
        raise SparsefxError(f"cannot reach device {key!r} through tracker {tracker} "
                            f"({one_line(error)}); {hint}") from None


def upload(session: rpc.RPCSession, executable: object) -> tvm.runtime.Module:
    """Export `executable` as a shared library, send it to the device and load it there. Each
    upload gets a new name: the device's loader hands back an already loaded library of the same
    path, and the server crashed running a second kernel through the first one's functions."""
    name = f"sfx-{uuid.uuid4().hex}.so"
    with tempfile.TemporaryDirectory() as tmp:
        library = Path(tmp) / name
        with quiet_native_stderr():
            executable.export_library(str(library))
        session.upload(str(library))
        return session.load_module(name)


def measure_remote(compiled: CompiledModel, tracker: str, key: str, repeat: int = 20,
                   timeout_s: int = 60) -> dict[str, float]:
    """Median/min latency (ms) of `compiled` on a device registered with the tracker under `key`."""
    if compiled.manifest["dispatch"] and any(d["impl"] == "torch" for d in compiled.manifest["dispatch"].values()):
        raise SparsefxError("this artifact runs some ops on PyTorch kernels, which a TVM RPC device lacks; "
                            "compile with dispatch=False to measure it remotely")
    session = connect(tracker, key, timeout_s)
    remote_lib = upload(session, compiled.executable)
    device = session.cuda(0) if compiled.target.is_gpu else session.cpu(0)
    vm = relax.VirtualMachine(remote_lib, device)
    inputs = [tvm.runtime.tensor(np.random.rand(*i["shape"]).astype(i["dtype"]), device)
              for i in compiled.manifest["inputs"]]
    vm.set_input("main", *inputs)
    result = vm.time_evaluator("invoke_stateful", device, number=1, repeat=repeat)("main")
    times = np.array(result.results) * 1e3
    return {"median_ms": float(np.median(times)), "min_ms": float(times.min()), "runs": len(times),
            "device": key}
