"""TIR sparse kernels: CPU results against dense numpy, CUDA builds, Relax lowering, latency table."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import tvm
from torch import nn

import sparsefx
from sparsefx import SparsefxError
from sparsefx.backends.tvm.sparse import kernels as sparse_kernels
from sparsefx.backends.tvm.sparse.kernels import KernelSpec, build
from sparsefx.backends.tvm.sparse.latency import measure_sparse_latency, random_operands
from sparsefx.cache import cache_dir
from sparsefx.capture.models import load_model
from sparsefx.sparse.masks import Sparsity
from sparsefx.sparse.sparsify import sparsify
from sparsefx.target import resolve_target

# Every CPU code path: GEMV (width 1) and SpMM, both output layouts, width tails, batches,
# row tiles 1/2/4, row groups that do not fill 16, N:M with chunked columns.
SPECS = [
    KernelSpec("bsr", 64, 48, (1, 16), 5, 1, 1), KernelSpec("bsr", 64, 48, (16, 1), 40, 2, 1),
    KernelSpec("bsr", 64, 48, (4, 4), 50, 1, 1), KernelSpec("bsr", 96, 64, (32, 1), 30, 1, 1),
    KernelSpec("bsr", 24, 16, (2, 2), 20, 1, 1), KernelSpec("bsr", 64, 48, (1, 4), 100, 1, 70, True),
    KernelSpec("bsr", 64, 48, (4, 4), 60, 1, 64, True), KernelSpec("bsr", 24, 48, (2, 1), 80, 1, 5, True),
    KernelSpec("bsr", 64, 48, (16, 1), 40, 2, 67), KernelSpec("bsr", 32, 48, (1, 1), 300, 1, 20),
    KernelSpec("nm", 64, 48, (2, 4), 24, 1, 1), KernelSpec("nm", 24, 64, (1, 4), 16, 2, 1),
    KernelSpec("nm", 64, 1024, (2, 4), 512, 1, 70, True), KernelSpec("nm", 40, 64, (4, 8), 32, 2, 9),
    # ResNet-50-like 1×1 convs: width 49 (7×7, last vector shifted back) on 2048 rows, width 196
    # (a one-vector tail tile with 16-row tiles), a shifted vector in the transposed output
    KernelSpec("bsr", 2048, 32, (16, 1), 2000, 1, 49), KernelSpec("bsr", 2048, 32, (4, 4), 1000, 2, 49),
    KernelSpec("bsr", 2048, 32, (1, 16), 2000, 1, 49), KernelSpec("bsr", 96, 64, (32, 1), 40, 1, 196),
    KernelSpec("bsr", 64, 48, (16, 1), 40, 1, 20, True), KernelSpec("nm", 2048, 32, (2, 4), 16, 1, 49),
    KernelSpec("nm", 64, 48, (1, 4), 12, 1, 37, True),
    # batch > 1 with a width that is not whole vectors runs as one (cols, batch·width) problem:
    # vectors span images (stored lane by lane), a tail tile, lanes < 16 per image
    KernelSpec("bsr", 2048, 64, (4, 4), 4000, 3, 49), KernelSpec("bsr", 2048, 64, (16, 1), 4000, 3, 49),
    KernelSpec("bsr", 256, 64, (32, 1), 200, 3, 196), KernelSpec("bsr", 64, 32, (1, 4), 200, 2, 5),
    KernelSpec("nm", 2048, 64, (2, 4), 32, 3, 49), KernelSpec("nm", 64, 32, (1, 4), 8, 3, 7),
]


def _dense(spec: KernelSpec, operands: list[np.ndarray]) -> np.ndarray:
    if spec.fmt == "bsr":
        _, values, indices, indptr, _ = operands
        (br, bc), weight = spec.block, np.zeros((spec.rows, spec.cols), np.float32)
        for i in range(len(indptr) - 1):
            for j in range(indptr[i], indptr[i + 1]):
                weight[i * br:(i + 1) * br, indices[j] * bc:(indices[j] + 1) * bc] = values[j]
        return weight
    values, indices = operands[1:3]
    if spec.width == 1:  # GEMV operands are stored transposed
        values, indices = values.T, indices.T
    n, m = spec.block
    weight = np.zeros((spec.rows, spec.cols // m, m), np.float32)
    np.put_along_axis(weight, indices.astype(np.int64).reshape(spec.rows, -1, n), values.reshape(spec.rows, -1, n), 2)
    return weight.reshape(spec.rows, spec.cols)


def _expected(spec: KernelSpec, operands: list[np.ndarray]) -> np.ndarray:
    out = np.einsum("nk,bkp->bnp", _dense(spec, operands), operands[0]) + operands[-1][None, :, None]
    return out[0].T if spec.transpose_out else out


def _run(lib: object, spec: KernelSpec, operands: list[np.ndarray], name: str | None = None) -> np.ndarray:
    out = tvm.runtime.empty(spec.out_shape, "float32")
    lib[name or spec.name](*[tvm.runtime.tensor(a) for a in operands], out)
    return out.numpy()


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))


def test_cpu_kernels_match_dense() -> None:
    lib = build(SPECS, resolve_target("cpu").to_tvm())
    for spec in SPECS:
        operands = random_operands(spec)
        assert _rel(_run(lib, spec, operands), _expected(spec, operands)) < 1e-4, spec


def test_batched_convs_run_as_one_wide_problem() -> None:
    flat = [s for s in SPECS if sparse_kernels.runs_flat(s)]
    assert len(flat) == 9 and all(s.batch > 1 and s.width % sparse_kernels.LANES for s in flat)


def test_compiled_batched_conv_at_7x7_matches_reference() -> None:
    """1×1 convs at 7×7, batch 3, BSR 4×4 / 16×1 and N:M through the Relax lowering."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(32, 64, 1), nn.ReLU(), nn.Conv2d(64, 64, 1), nn.ReLU(), nn.Conv2d(64, 32, 1)).eval()
    model = sparsify(model, {"0": Sparsity(0.5, "block", block=(4, 4)), "2": Sparsity(0.3, "block", block=(16, 1)),
                             "4": Sparsity(0.5, "nm", m=4)})
    x = torch.randn(3, 32, 7, 7)
    compiled = sparsefx.compile(model, (x,), verbose=False)
    assert _rel(compiled(x).numpy(), model(x).detach().numpy()) < 1e-4


def test_cuda_kernel_loops_match_dense_when_run_serially() -> None:
    """The CUDA kernels with their thread loops serial: checks their indexing on the CPU."""
    specs = [s for s in SPECS if s.width > 1]
    funcs = {f"k{i}": (sparse_kernels.bsr_cuda if s.fmt == "bsr" else sparse_kernels.nm_cuda)(s, bind=False)
             .with_attr("global_symbol", f"k{i}") for i, s in enumerate(specs)}
    lib = tvm.compile(tvm.IRModule(funcs), resolve_target("cpu").to_tvm())
    for i, spec in enumerate(specs):
        operands = random_operands(spec)
        assert _rel(_run(lib, spec, operands, f"k{i}"), _expected(spec, operands)) < 1e-4, spec


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_kernels_compile(arch: str) -> None:
    specs = [SPECS[0], SPECS[5], SPECS[10], SPECS[12]]
    lib = build(specs, resolve_target(f"cuda:{arch}").to_tvm())
    source = lib.mod.imports[0].inspect_source()
    assert all(s.name in source for s in specs)


def _mixed_model() -> tuple[nn.Module, torch.Tensor]:
    """Removed channels (prune), dense layers and BSR / N:M / CSR layers in one model."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 1, stride=2), nn.ReLU(),
                          nn.Conv2d(32, 16, 3, padding=1), nn.Flatten(), nn.Linear(16 * 4 * 4, 64), nn.ReLU(),
                          nn.Linear(64, 16)).eval()
    x = torch.randn(2, 8, 8, 8)
    pruned = sparsefx.prune(model, (x,), ratio={"0": 0.5})
    specs = {"2": Sparsity(0.25, "block", block=(4, 4)), "4": Sparsity(0.5, "nm", m=4),
             "6": Sparsity(0.1, "block", block=(16, 1)), "8": Sparsity(0.3)}
    return sparsify(pruned, specs), x


def test_compiled_mixed_model_matches_reference() -> None:
    model, x = _mixed_model()
    want = model(x)
    for inputs in ((x,), (x[:1],)):
        compiled = sparsefx.compile(model, inputs, verbose=False)
        assert compiled.manifest["import_route"] == "fx"
        assert _rel(compiled(*inputs).numpy(), model(*inputs).detach().numpy()) < 1e-4
    assert want.shape == (2, 16)


def test_export_route_lowers_sparse_layers() -> None:
    model, inputs = load_model("hf:bert-base?layers=1&hidden_size=64&intermediate_size=128"
                               "&num_attention_heads=2&vocab_size=100", input_shape=(1, 16))
    sparse = sparsify(model, {"encoder.layer.0.intermediate.dense": Sparsity(0.2, "block", block=(16, 1)),
                              "encoder.layer.0.output.dense": Sparsity(0.5, "nm", m=4)})
    compiled = sparsefx.compile(sparse, inputs, verbose=False)
    assert compiled.manifest["import_route"] == "export"
    got, want = compiled(*inputs)[0], sparse(*inputs).last_hidden_state
    assert _rel(got.numpy(), want.detach().numpy()) < 1e-4


def test_mixed_model_compiles_for_cuda() -> None:
    model, x = _mixed_model()
    compiled = sparsefx.compile(model, (x,), target="cuda:sm_80", verbose=False)
    assert "SparseKernels" in compiled.manifest["passes"]


def test_measured_latency_is_cached() -> None:
    spec = Sparsity(0.1, "block", block=(16, 1))
    first = measure_sparse_latency(spec, 64, 128, 1)
    assert first > 0 and measure_sparse_latency(spec, 64, 128, 1) == first
    target = resolve_target("cpu")
    table = json.loads((cache_dir() / "sparse" / f"{target.arch}-{target.cores}.json").read_text())["entries"]
    assert first in table.values()
    for bad in [lambda: measure_sparse_latency(spec, 60, 128, 1), lambda: measure_sparse_latency(spec, 64, 128, 0),
                lambda: measure_sparse_latency(Sparsity(1.0, "nm"), 64, 128, 1),
                lambda: measure_sparse_latency(spec, 64, 128, 1, target="cuda:sm_80")]:
        with pytest.raises(SparsefxError):
            bad()


def test_tir_emits_sparse_tensor_core_mma() -> None:
    """TIR reaches 2:4 sparse tensor cores: `T.ptx` emits mma.sp, which nvcc accepts for sm_80."""
    from tvm.script import tirx as T

    chain = "mma.sp.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"

    @T.prim_func
    def probe(a: T.Buffer((32, 2), "uint32"), b: T.Buffer((32, 2), "uint32"), e: T.Buffer((32,), "uint32"),
              out: T.Buffer((32, 4), "float32")):
        T.func_attr({"global_symbol": "probe"})
        for tx in T.thread_binding(32, "threadIdx.x"):
            d = T.alloc_buffer((4,), "float32", scope="local")
            for i in range(4):
                d[i] = T.float32(0)
            T.ptx[chain](d[0], d[1], d[2], d[3], a[tx, 0], a[tx, 1], b[tx, 0], b[tx, 1], d[0], d[1], d[2], d[3],
                         e[tx], 0)
            for i in range(4):
                out[tx, i] = d[i]

    lib = tvm.compile(tvm.IRModule({"probe": probe}), resolve_target("cuda:sm_80").to_tvm())
    assert chain in lib.mod.imports[0].inspect_source()
