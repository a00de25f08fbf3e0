"""Run a sparsefx runtime bundle with only the TVM runtime (no compiler, no torch, no network).

    python run.py                          # random inputs of the compiled shapes; prints output shapes
    python run.py x.npy [more.npy] --out y.npy
    import run; outputs = run.Model().run([array, ...])   # numpy in, numpy out

The first run unpacks the bundled wheels (apache-tvm-ffi, numpy unless the bundle leaves it to the host)
into site/ beside this file. Inputs and outputs are float32 for fp16/bf16 models too (they cast inside).
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import sys
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
POOLED_ALLOCATOR = 2
CPU, CUDA = 1, 2  # DLPack device types
ALIGNMENT = 64  # bytes: what TVM's allocator gives and its generated code may assume


def unpack_wheels() -> None:
    site = HERE / "site"
    for wheel in sorted((HERE / "wheels").glob("*.whl")):
        marker = site / f".{wheel.name}.unpacked"
        if not marker.exists():
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(site)
            marker.touch()
    sys.path.insert(0, str(site))


def load_runtime(names: list[str]) -> None:
    """Load the bundled TVM runtime libraries, dependencies first, global so later ones link."""
    for name in names:
        try:
            ctypes.CDLL(str(HERE / "lib" / name), mode=ctypes.RTLD_GLOBAL)
        except OSError as error:
            gpu = "cuda" in name or "cudart" in name
            raise SystemExit(f"run.py: cannot load {name} ({error}); " + (
                "this bundle is for an NVIDIA GPU: run it on a host with the NVIDIA driver (libcuda.so.1)"
                if gpu else "the bundle is incomplete: export it again")) from None


def serve_precompiled_kernels(tvm_ffi: object, kernel_dir: Path, digests: list[str]) -> None:
    """TVM's CUDA runtime compiles kernel source through this callback when the library loads;
    answer with the cubins compiled when the bundle was made, so no CUDA compiler is needed here."""
    cubins = {d: (kernel_dir / f"{d}.cubin").read_bytes() for d in digests}

    @tvm_ffi.register_global_func("tvm_callback_cuda_compile", override=True)
    def _precompiled(source: str) -> bytes:
        digest = hashlib.sha256(source.encode()).hexdigest()
        if digest not in cubins:
            raise RuntimeError(f"no precompiled kernels for CUDA source {digest[:12]}; rebuild the bundle")
        return cubins[digest]


class Model:
    """The bundled model on its device: `run(arrays)` takes and returns numpy arrays."""

    def __init__(self) -> None:
        self.manifest = json.loads((HERE / "manifest.json").read_text())
        unpack_wheels()
        import tvm_ffi

        self.ffi = tvm_ffi
        load_runtime(self.manifest["bundle"]["runtime_libs"])
        self.gpu = self.manifest["target"]["kind"] == "cuda"
        if self.gpu:
            serve_precompiled_kernels(tvm_ffi, HERE / "kernels", self.manifest["bundle"]["cuda_kernels"])
        self.device = tvm_ffi.device("cuda" if self.gpu else "cpu", 0)
        self.vm = tvm_ffi.load_module(str(HERE / "model.so"))["vm_load_executable"]()
        devices = [CUDA, 0, POOLED_ALLOCATOR, CPU, 0, POOLED_ALLOCATOR] if self.gpu else [CPU, 0, POOLED_ALLOCATOR]
        self.vm["vm_initialization"](*devices)
        self._alloc = tvm_ffi.get_global_func("runtime.TVMTensorAllocWithScope")
        self._copy = tvm_ffi.get_global_func("runtime.TVMTensorCopyFromTo")

    def random_inputs(self) -> list:
        import numpy as np

        rng = np.random.default_rng(0)
        return [rng.standard_normal(i["shape"]).astype(i["dtype"]) for i in self.manifest["inputs"]]

    def run(self, arrays: list) -> list:
        import numpy as np

        expected = [tuple(i["shape"]) for i in self.manifest["inputs"]]
        if [tuple(a.shape) for a in arrays] != expected:
            raise SystemExit(f"run.py: inputs must have shapes {expected}, got {[a.shape for a in arrays]}")
        args = [self._to_device(np.ascontiguousarray(a)) for a in arrays]
        result = self.vm["main"](*args)
        outputs = list(result) if isinstance(result, (list, tuple, self.ffi.Array)) else [result]
        return [np.from_dlpack(self._to_host(o)).copy() for o in outputs]

    def _to_device(self, array: object) -> object:
        host = self.ffi.from_dlpack(array)
        if not self.gpu and array.ctypes.data % ALIGNMENT == 0:
            return host
        # TVM's kernels assume 64-byte aligned buffers (its allocator's); numpy only promises 16
        device = self._alloc(self.ffi.Shape(array.shape), str(array.dtype), self.device, None)
        self._copy(host, device)
        return device

    def _to_host(self, tensor: object) -> object:
        if not self.gpu:
            return tensor
        host = self._alloc(tensor.shape, tensor.dtype, self.ffi.device("cpu", 0), None)
        self._copy(tensor, host)
        return host


def main() -> int:
    parser = argparse.ArgumentParser(description="run a sparsefx runtime bundle")
    parser.add_argument("inputs", nargs="*", type=Path, help=".npy files, one per model input (default: random)")
    parser.add_argument("--out", type=Path, help="write the first output here (.npy)")
    args = parser.parse_args()
    model = Model()
    import numpy as np  # the bundled one: Model() unpacked it

    arrays = [np.load(p) for p in args.inputs] if args.inputs else model.random_inputs()
    outputs = model.run(arrays)
    if args.out:
        np.save(args.out, outputs[0])
    print(json.dumps({"device": "cuda" if model.gpu else "cpu", "outputs": [list(o.shape) for o in outputs]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
