"""Cost-model kernels timed on a device behind TVM's RPC tracker (`CostModel(target, rpc=...)`).

Such a device has the TVM runtime only, so what runs there is what a model compiled with
`dispatch=False` runs: each convolution (with the epilogue the model fuses into it: bias,
residual add, activation) or matmul is built alone through sparsefx's TIR pipeline for the
target, uploaded, and timed on the device by TVM's time_evaluator. One session serves every
kernel of a planning run; results land in the cost model's table for that device.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from sparsefx.backends.tvm.compiler import build_module
from sparsefx.backends.tvm.remote import connect, upload
from sparsefx.cost.model import Kernel, _conv_workload
from sparsefx.target import Target

_ACTIVATIONS = {"none": lambda t: t, "relu": relax.op.nn.relu, "relu6": lambda t: relax.op.clip(t, 0.0, 6.0),
                "silu": relax.op.nn.silu}


def kernel_module(kernel: Kernel) -> tuple[tvm.IRModule, list[tuple[int, ...]]]:
    """`kernel` as a one-function Relax module `main`, and the shapes of its arguments."""
    if kernel.op == "conv2d":
        (sh, sw, ph, pw, dh, dw, groups), (x_shape, w_shape, out_shape), act, residual = _conv_workload(kernel)
        shapes = [x_shape, w_shape, (1, w_shape[0], 1, 1)] + ([out_shape] if residual else [])
    else:
        b, m, k, n = kernel.dims
        shapes = [(b, m, k), (b, k, n)] if b > 1 else [(m, k), (k, n)]
    params = [relax.Var(f"a{i}", relax.TensorType(s, "float32")) for i, s in enumerate(shapes)]
    bb = relax.BlockBuilder()
    with bb.function("main", params):
        with bb.dataflow():
            if kernel.op == "conv2d":
                out = relax.op.add(relax.op.nn.conv2d(params[0], params[1], (sh, sw), (ph, pw, ph, pw), (dh, dw), groups),
                                   params[2])
                out = _ACTIVATIONS[act](relax.op.add(out, params[3]) if residual else out)
            else:
                out = relax.op.matmul(params[0], params[1])
            result = bb.emit_output(bb.emit(out))
        bb.emit_func_output(result)
    return bb.get(), shapes


class RemoteKernels:
    """Times kernels on the device the tracker at `tracker` ("HOST:PORT") serves under `key`.

    The tracker ends a session `session_s` after it began, and a planning run can time kernels for
    longer than that (130 kernels of the built-in ResNet: about a minute): an expired session is
    replaced by a new one and the kernel timed again."""

    def __init__(self, tracker: str, key: str, target: Target, repeat: int = 5, session_s: int = 60) -> None:
        self.tracker, self.key, self.target, self.repeat = tracker, key, target, repeat
        self.session_s = session_s
        self._session = None

    def time(self, kernel: Kernel) -> float:
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
