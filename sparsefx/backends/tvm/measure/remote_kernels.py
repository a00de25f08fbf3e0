"""Cost-model kernels timed on a device behind TVM's RPC tracker (`CostModel(target, timer=RemoteTimer(...))`).

Such a device has the TVM runtime only, so what runs there is what a model compiled with
`dispatch=False` runs: each convolution (with the epilogue the model fuses into it: bias,
residual add, activation) or matmul is built alone through sparsefx's TIR pipeline for the
target, uploaded, and timed on the device by TVM's time_evaluator. One session serves every
kernel of a planning run; results land in the cost model's table for that device.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tvm
from tvm import relax

from sparsefx.backends.tvm.measure.emit import emit_kernel
from sparsefx.backends.tvm.pipeline import build_module
from sparsefx.backends.tvm.remote import connect, upload
from sparsefx.cost.kernel import Kernel
from sparsefx.cost.timing import Times
from sparsefx.target import Target


def kernel_module(kernel: Kernel) -> tuple[tvm.IRModule, list[tuple[int, ...]]]:
    """`kernel` as a one-function Relax module `main`, and the shapes of its arguments."""
    bb = relax.BlockBuilder()
    shapes = emit_kernel(bb, "main", kernel)
    return bb.get(), shapes


class RemoteTimer:
    """Times kernels on the device the tracker at `tracker` ("HOST:PORT") serves under `key`
    (`cost.timing.Timer`): one implementation, "tir", timed hot by TVM's time_evaluator (the device
    runs the TVM runtime only, so weights cannot be cycled as on the host).

    The tracker ends a session `session_s` after it began, and a planning run can time kernels for
    longer than that (130 kernels of the built-in ResNet: about a minute): an expired session is
    replaced by a new one and the kernel timed again."""

    def __init__(self, tracker: str, key: str, target: Target, repeat: int = 5, session_s: int = 60) -> None:
        self.tracker, self.key, self.target, self.repeat = tracker, key, target, repeat
        self.session_s = session_s
        self.device = f"rpc-{key}"
        self.free_epilogues: dict[str, tuple[str, ...]] = {}
        self._session = None

    def time(self, kernels: list[Kernel], implementations: Sequence[Sequence[str]] | None = None,
             ahead: Sequence[Kernel] = ()) -> list[Times]:  # noqa: ARG002 (each kernel is built as it is timed)
        wanted = implementations if implementations is not None else [("tir",)] * len(kernels)
        return [{"tir": self.time_one(k)} if "tir" in names else {} for k, names in zip(kernels, wanted, strict=True)]

    def overheads(self) -> dict[str, float]:
        return {}

    def calibrate(self) -> dict[str, list[float]]:
        return {}  # the cost model prices element-wise kernels on a device by its roofline

    def time_one(self, kernel: Kernel) -> float:
        """Fastest ms of `kernel` on the device."""
        mod, shapes = kernel_module(kernel)
        executable = build_module(mod, self.target.to_tvm(), self.target)
        try:
            return self._time(executable, shapes)
        except tvm.error.RPCSessionTimeoutError:
            self._session = None
            return self._time(executable, shapes)

    def _time(self, executable: object, shapes: list[tuple[int, ...]]) -> float:
        self._session = self._session or connect(self.tracker, self.key, self.session_s)
        device = self._session.cuda(0) if self.target.is_gpu else self._session.cpu(0)
        vm = relax.VirtualMachine(upload(self._session, executable), device)
        vm.set_input("main", *[tvm.runtime.tensor(np.random.randn(*s).astype("float32"), device) for s in shapes])
        timer = vm.time_evaluator("invoke_stateful", device, number=3, repeat=self.repeat, min_repeat_ms=5)
        return float(min(timer("main").results)) * 1e3
