"""Half precision for CUDA targets, built here without a GPU: tensor-core kernels in the generated CUDA,
every kernel compiling for the arch, the arch checks, and the conv -> matmul rewrite's numerics on CPU.

The first fp16 build of a process imports TVM's CUDA tensor intrinsics (tens of seconds on a busy
machine); the builds after it take seconds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import tvm
from torch import nn
from tvm import relax

import sparsefx
from sparsefx.backends.tvm import pipeline
from sparsefx.backends.tvm.bundle import precompile_cuda
from sparsefx.backends.tvm.half import conv_to_matmul_pass, half_passes
from sparsefx.backends.tvm.importer import to_relax
from sparsefx.target import Target, TargetError, check_precision, host_cpu, resolve_target

needs_cuda_toolkit = pytest.mark.skipif(not list(Path("/usr/local").glob("cuda*/include/cuda_runtime.h")),
                                reason="no CUDA toolkit")


def _mlp() -> tuple[nn.Module, torch.Tensor]:
    """A transformer-style MLP block: every matmul dimension above DLight's tensor-core threshold (64)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.LayerNorm(512), nn.Linear(512, 256),
                         nn.Softmax(-1)).eval(), torch.randn(128, 256)


def _convnet() -> tuple[nn.Module, torch.Tensor]:
    """A 3x3 conv (im2col), a 1x1 conv large enough for tensor cores, ReLU6 (a clip) and a depthwise conv
    (stays a conv): MobileNetV2's pieces."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 96, 3, padding=1), nn.BatchNorm2d(96), nn.ReLU(), nn.Conv2d(96, 128, 1),
                         nn.ReLU6(), nn.Conv2d(128, 128, 3, groups=128, padding=1), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(128, 10)).eval(), torch.randn(1, 3, 16, 16)


MODELS = {"mlp": _mlp, "convnet": _convnet}


def _cuda_source(compiled: sparsefx.backends.tvm.CompiledModel) -> str:
    def modules(library: object) -> list:
        return [library, *(m for child in library.imports for m in modules(child))]

    return "".join(m.inspect_source("cuda") for m in modules(compiled.executable.mod) if m.kind == "cuda")


@needs_cuda_toolkit
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("name", list(MODELS))
def test_half_builds_compile_for_the_arch(name: str, precision: str, arch: str, tmp_path: Path) -> None:
    model, x = MODELS[name]()
    compiled = sparsefx.compile(model, x, target=f"cuda:{arch}", precision=precision, verbose=False)
    assert compiled.manifest["precision"] == precision
    assert "ConvToMatmul" in compiled.manifest["passes"]
    source = _cuda_source(compiled)
    if precision == "fp16":  # DLight tensorizes float16 matmuls only: the Linear layers and the 1x1 conv
        assert "wmma::mma_sync" in source
    else:
        assert "nv_bfloat16" in source and "wmma" not in source
    cubins = precompile_cuda(compiled.executable.mod, arch, tmp_path)
    assert cubins and all((tmp_path / f"{c}.cubin").read_bytes()[:4] == b"\x7fELF" for c in cubins)


@needs_cuda_toolkit
def test_fp16_bundle_keeps_float32_inputs_and_ships_no_numpy(tmp_path: Path) -> None:
    model, x = _mlp()
    compiled = sparsefx.compile(model, x, target="cuda:sm_90", precision="fp16", verbose=False)
    bundle = compiled.export_bundle(tmp_path / "gpu", numpy=False)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["inputs"] == [{"shape": [128, 256], "dtype": "float32"}]
    assert not any(w.startswith("numpy") for w in manifest["bundle"]["wheels"])
    assert manifest["bundle"]["cuda_kernels"]


def test_precision_needs_the_arch() -> None:
    with pytest.raises(TargetError, match="sm_70 or newer") as error:
        check_precision("fp16", Target("cuda", "cuda", "sm_61", 0, 1024))
    assert "\n" not in str(error.value)
    with pytest.raises(TargetError, match="sm_80 or newer"):
        check_precision("bf16", resolve_target("cuda:sm_75"))
    with pytest.raises(TargetError, match="for CUDA targets"):
        check_precision("fp16", host_cpu())
    assert check_precision("fp16", resolve_target("cuda:sm_70")) == "fp16"
    assert check_precision("bf16", resolve_target("cuda:sm_90a")) == "bf16"
    model, x = _mlp()
    with pytest.raises(TargetError, match="sm_80 or newer"):
        sparsefx.compile(model, x, target="cuda:sm_75", precision="bf16", verbose=False)


def test_conv_to_matmul_matches_the_convs_on_cpu() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, stride=2, padding=(1, 2), dilation=(1, 2)), nn.Conv2d(32, 32, 1),
                          nn.Conv2d(32, 32, 3, groups=32), nn.Conv2d(32, 8, (2, 3), stride=(2, 1))).eval()
    x = torch.randn(2, 3, 20, 18)
    spec = host_cpu()
    tvm_target = spec.to_tvm()
    mod = pipeline.run(pipeline.optimize_passes(), to_relax(model, (x,))[0], tvm_target)
    rewritten = conv_to_matmul_pass()(mod)
    script = rewritten.script()
    assert script.count("R.nn.conv2d(") == 1 and script.count("R.matmul(") == 4  # the depthwise conv stays
    outputs = []
    for module in (mod, rewritten):
        vm = relax.VirtualMachine(pipeline.build_module(module, tvm_target, spec), tvm.cpu())
        outputs.append(vm["main"](tvm.runtime.tensor(x.numpy())).numpy())
    np.testing.assert_allclose(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_half_passes_stay_close_to_fp32_on_cpu(name: str) -> None:
    """The rewrites are target independent: run on llvm, fp16 and bf16 stay within a few of their rounding
    steps (2^-11, 2^-8) of PyTorch's fp32, relative to the largest output."""
    model, x = MODELS[name]()
    expected = model(x).detach().numpy()
    spec = host_cpu()
    tvm_target = spec.to_tvm()
    fp32 = pipeline.run(pipeline.optimize_passes(), to_relax(model, (x,))[0], tvm_target)
    for precision, step in (("fp16", 2**-11), ("bf16", 2**-8)):
        mod = pipeline.run(half_passes(precision), fp32, tvm_target)
        vm = relax.VirtualMachine(pipeline.build_module(mod, tvm_target, spec), tvm.cpu())
        out = vm["main"](tvm.runtime.tensor(x.numpy())).numpy()
        assert out.dtype == np.float32
        assert np.abs(out - expected).max() < 8 * step * np.abs(expected).max()
