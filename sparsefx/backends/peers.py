"""The runtimes a user could deploy a (pruned) model with instead, built the way their docs say.

Each is the yardstick sparsefx's compiled model is measured against, never part of its own path:
PyTorch eager, `torch.compile` (inductor), ONNX Runtime (CPU execution provider, all graph
optimisations, intra-op threads set), OpenVINO in fp32 (INFERENCE_PRECISION_HINT=f32) and in its
default precision (bf16 where the CPU has AMX or AVX512-BF16), and sparsefx.compile. onnxruntime
and openvino are optional (the dev extra): imported when a runner is built, and `available` says
whether they are installed. ONNX Runtime and OpenVINO read one ONNX export of the model
(`backends.export`), made once per model and reused.

A runner is a callable (torch tensors in, first output as a torch tensor out) plus its build time.
Eager and torch.compile run on PyTorch's intra-op pool: the caller sets its thread count.
"""

from __future__ import annotations

import importlib.util
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sparsefx.backends.export import export
from sparsefx.capture.compare import first_tensor
from sparsefx.errors import SparsefxError, one_line
from sparsefx.target import TargetError

RUNTIMES = ("eager", "torch.compile", "onnxruntime", "openvino-fp32", "openvino", "sparsefx", "sparsefx-bf16")
NEEDS = {"onnxruntime": "onnxruntime", "openvino-fp32": "openvino", "openvino": "openvino"}  # runtime -> package
ONNX_RUNTIMES = ("onnxruntime", "openvino-fp32", "openvino")


class PeerError(SparsefxError):
    """A runtime that is not installed, not known, or cannot build the model."""


@dataclass
class Runner:
    name: str
    run: Callable[..., torch.Tensor]
    compile_s: float  # building it: torch.compile's first call, session / compiled-model creation
    details: dict = field(default_factory=dict)  # JSON-able facts: versions, precision, export seconds
    native: object = None  # what it runs: the session, compiled model or module

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.run(*inputs)


def available(name: str) -> bool:
    """Whether `name` can be built here (its optional package installed)."""
    check(name)
    return name not in NEEDS or importlib.util.find_spec(NEEDS[name]) is not None


def check(name: str) -> str:
    if name not in RUNTIMES:
        raise PeerError(f"unknown runtime {name!r}; use one of {', '.join(RUNTIMES)}")
    return name


class Peers:
    """Builds runners of one model at one thread count; ONNX Runtime and OpenVINO share one export."""

    def __init__(self, model: nn.Module, inputs: tuple, threads: int, workdir: str | Path | None = None) -> None:
        self.model, self.inputs, self.threads = model.eval(), inputs, threads
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="sparsefx-peers-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.onnx_path: Path | None = None
        self.export_s = 0.0

    def build(self, name: str) -> Runner:
        """The runner of `name`; raises PeerError when its package is missing or it cannot build the model."""
        if not available(name):
            raise PeerError(f"{name} is not installed: pip install {NEEDS[name]}")
        builder = {"eager": self.eager, "torch.compile": self.torch_compile, "onnxruntime": self.onnxruntime,
                   "openvino-fp32": lambda: self.openvino(fp32=True), "openvino": lambda: self.openvino(fp32=False),
                   "sparsefx": self.sparsefx, "sparsefx-bf16": lambda: self.sparsefx("bf16")}[name]
        try:
            return builder()
        except PeerError:
            raise
        except Exception as error:  # a runtime that cannot take the model is a result, said in one line
            raise PeerError(f"{name} cannot build the model: {one_line(error)}") from None

    def onnx(self) -> Path:
        if self.onnx_path is None:
            started = time.perf_counter()
            self.onnx_path = export(self.model, self.inputs, self.workdir / "model.onnx", format="onnx")
            self.export_s = time.perf_counter() - started
        return self.onnx_path

    def eager(self) -> Runner:
        def run(*inputs: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return first_tensor(self.model(*inputs))

        return Runner("eager", run, 0.0, native=self.model)

    def torch_compile(self) -> Runner:
        compiled = torch.compile(self.model, backend="inductor")

        def run(*inputs: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return first_tensor(compiled(*inputs))

        started = time.perf_counter()
        run(*self.inputs)  # inductor compiles on the first call
        return Runner("torch.compile", run, time.perf_counter() - started, native=compiled)

    def onnxruntime(self) -> Runner:
        import onnxruntime

        path = self.onnx()
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        started = time.perf_counter()
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        compile_s = time.perf_counter() - started
        names = [arg.name for arg in session.get_inputs()]

        def run(*inputs: torch.Tensor) -> torch.Tensor:
            feed = {name: x.detach().numpy() for name, x in zip(names, inputs)}
            return torch.from_numpy(session.run(None, feed)[0])

        return Runner("onnxruntime", run, compile_s, {"export_s": round(self.export_s, 2),
                                                      "onnxruntime": onnxruntime.__version__}, session)

    def openvino(self, fp32: bool) -> Runner:
        import openvino

        path = self.onnx()
        config = {"INFERENCE_NUM_THREADS": self.threads, "PERFORMANCE_HINT": "LATENCY"}
        if fp32:
            config["INFERENCE_PRECISION_HINT"] = "f32"
        core = openvino.Core()
        started = time.perf_counter()
        compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        compile_s = time.perf_counter() - started
        request = compiled.create_infer_request()
        precision = str(compiled.get_property("INFERENCE_PRECISION_HINT"))

        def run(*inputs: torch.Tensor) -> torch.Tensor:
            request.infer([np.ascontiguousarray(x.detach().numpy()) for x in inputs])
            return torch.from_numpy(request.get_output_tensor(0).data.copy())

        name = "openvino-fp32" if fp32 else "openvino"
        return Runner(name, run, compile_s, {"export_s": round(self.export_s, 2), "precision": precision,
                                            "openvino": openvino.__version__}, compiled)

    def sparsefx(self, precision: str = "fp32") -> Runner:
        from sparsefx.backends import tvm as backend  # TVM loads with the compiled runner only

        started = time.perf_counter()
        try:
            compiled = backend.compile(self.model, self.inputs, threads=self.threads, verbose=False,
                                       precision=precision)
        except TargetError as error:  # bf16 on a CPU without the instructions
            raise PeerError(one_line(error)) from None
        compile_s = time.perf_counter() - started

        def run(*inputs: torch.Tensor) -> torch.Tensor:
            return first_tensor(compiled(*inputs))

        dispatch = compiled.manifest["dispatch"].values()
        return Runner("sparsefx" if precision == "fp32" else f"sparsefx-{precision}", run, compile_s,
                      {"torch_kernels": f"{sum(d['impl'] == 'torch' for d in dispatch)}/{len(dispatch)}"}, compiled)
