"""Runtime-only bundles: build for CUDA under the size budget; run the CPU one in a Python 3.12 that has no TVM."""

from __future__ import annotations

import ctypes.util
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import sparsefx
from sparsefx.backends.tvm import compile
from sparsefx.capture.compare import output_error

from .models_zoo import CASES

BUDGET = 64 * 2**20


def _python312() -> str | None:
    """A working CPython 3.12 (pyenv's shims exist even where they cannot run it)."""
    candidates = [*map(str, sorted(Path.home().glob(".pyenv/versions/3.12*/bin/python3.12"))), shutil.which("python3.12")]
    for python in filter(None, candidates):
        if subprocess.run([python, "-I", "-c", "pass"], capture_output=True).returncode == 0:
            return python
    return None


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _residual() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    build, make_inputs = CASES["residual"]
    return build().eval(), make_inputs()


@pytest.mark.skipif(not list(Path("/usr/local").glob("cuda*/include/cuda_runtime.h")), reason="no CUDA toolkit")
def test_cuda_bundle_builds_with_precompiled_kernels_under_budget(tmp_path) -> None:
    model, inputs = _residual()
    bundle = compile(model, inputs, target="cuda:sm_90", verbose=False).export_bundle(tmp_path / "gpu")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["bundle"]["runtime_libs"][-1] == "libtvm_runtime_cuda.so"
    assert any(w.startswith("apache_tvm_ffi") and "cp312" in w for w in manifest["bundle"]["wheels"])
    cubins = [bundle / "kernels" / f"{d}.cubin" for d in manifest["bundle"]["cuda_kernels"]]
    assert cubins and all(c.read_bytes()[:4] == b"\x7fELF" for c in cubins)
    assert _size(bundle) < BUDGET
    archive = compile(model, inputs, target="cuda:sm_90", verbose=False).export_bundle(tmp_path / "gpu.tar.gz")
    assert archive.stat().st_size < BUDGET
    if ctypes.util.find_library("cuda") is None and _python312():  # this host has no NVIDIA driver
        done = subprocess.run([_python312(), "-I", "-S", str(bundle / "run.py")], capture_output=True, text=True,
                              env={}, timeout=300)
        lines = done.stderr.strip().splitlines()
        assert done.returncode != 0 and len(lines) == 1 and "NVIDIA driver" in lines[0], done.stderr[-2000:]


@pytest.mark.skipif(_python312() is None, reason="no Python 3.12 interpreter")
def test_cpu_bundle_runs_with_only_the_bundled_runtime(tmp_path) -> None:
    model, inputs = _residual()
    bundle = compile(model, inputs, dispatch=False, verbose=False).export_bundle(tmp_path / "cpu")
    np.save(tmp_path / "x.npy", inputs[0].numpy())
    # -I -S: no site-packages, no environment: only the standard library and what the bundle ships
    done = subprocess.run([_python312(), "-I", "-S", str(bundle / "run.py"), str(tmp_path / "x.npy"),
                           "--out", str(tmp_path / "y.npy")], capture_output=True, text=True, env={}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    with torch.no_grad():
        expected = model(*inputs)
    actual = torch.from_numpy(np.load(tmp_path / "y.npy"))
    assert output_error(expected, actual).ok()
    # an input 4 bytes off TVM's 64-byte alignment (numpy promises only 16) reaches the kernels aligned
    probe = (f"import sys; sys.path.insert(0, {str(bundle)!r}); import run; m = run.Model(); import numpy as np\n"
             f"x = np.load({str(tmp_path / 'x.npy')!r}); raw = np.empty(x.nbytes + 128, np.uint8)\n"
             "start = (-raw.ctypes.data) % 64 + 4; a = raw[start:start + x.nbytes].view(x.dtype).reshape(x.shape)\n"
             "a[...] = x; assert a.ctypes.data % 64 == 4\n"
             "print(np.from_dlpack(m._to_device(a)).ctypes.data % 64, float(abs(m.run([a])[0]).max()))")
    done = subprocess.run([_python312(), "-I", "-S", "-c", probe], capture_output=True, text=True, env={}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    alignment, peak = done.stdout.split()
    assert alignment == "0" and float(peak) == pytest.approx(float(actual.abs().max()), rel=1e-5)


def test_bundle_refuses_pytorch_kernels(tmp_path) -> None:
    model, inputs = _residual()
    compiled = compile(model, inputs, dispatch=False, verbose=False)
    compiled.manifest["dispatch"] = {"conv2d|...": {"impl": "torch"}}
    with pytest.raises(sparsefx.SparsefxError, match="dispatch='own'"):
        compiled.export_bundle(tmp_path / "b")
    own = compile(model, inputs, dispatch="own", verbose=False)  # what the error proposes bundles
    assert own.export_bundle(tmp_path / "own").exists()


def test_compiled_model_aligns_inputs_and_names_a_missing_gpu() -> None:
    model, inputs = _residual()
    compiled = compile(model, inputs, dispatch=False, verbose=False)
    x = inputs[0]
    storage = torch.empty(x.numel() + 1)
    shifted = storage[1:].view_as(x)  # 4 bytes past PyTorch's 64-byte alignment
    shifted.copy_(x)
    assert shifted.data_ptr() % 64 == 4
    assert torch.from_dlpack(compiled.argument(shifted)).data_ptr() % 64 == 0
    torch.testing.assert_close(compiled(shifted), compiled(x))
    if not torch.cuda.is_available():
        gpu = compile(model, inputs, target="cuda:sm_90", verbose=False)
        with pytest.raises(sparsefx.SparsefxError, match="compiled for an NVIDIA GPU and PyTorch sees none"):
            gpu(x)
