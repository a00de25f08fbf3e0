"""2:4 sparse tensor-core GEMM (`mma.sp`): packing round trip, the kernel's layout in numpy, CUDA
builds checked by nvcc, and the fp16 Relax lowering. Nothing here runs on a GPU."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import torch
import tvm
from torch import nn

import sparsefx
from sparsefx import SparsefxError
from sparsefx.backends.tvm.sparse import mma as sparse_mma
from sparsefx.backends.tvm.sparse.mma import MmaSpec
from sparsefx.sparse.formats import NM, mma24_pack, mma24_unpack
from sparsefx.sparse.masks import Sparsity
from sparsefx.sparse.sparsify import sparsify
from sparsefx.target import resolve_target


def _packed(rows: int, cols: int, seed: int = 0) -> tuple[NM, np.ndarray, np.ndarray]:
    torch.manual_seed(seed)
    nm = NM.from_dense(torch.randn(rows, cols), 2, 4)
    return (nm, *mma24_pack(nm))


@pytest.mark.parametrize("shape", [(16, 32), (48, 96), (128, 64)])
def test_mma24_pack_round_trip(shape: tuple[int, int]) -> None:
    nm, values, meta = _packed(*shape)
    rows, cols = shape
    assert values.dtype == np.float16 and values.shape == (rows, cols // 2)
    assert meta.dtype == np.uint32 and meta.shape == (rows // 16, cols // 32, 16)
    np.testing.assert_array_equal(mma24_unpack(values, meta), nm.to_dense().half().float().numpy())
    # every position read back from the documented word / bit address
    position = nm.indices.numpy().astype(int)
    for r in range(rows):
        for c in range(cols // 2):
            word = int(meta[r // 16, c // 16, r % 8 * 2 + c % 16 // 8])
            assert word >> (r % 16 // 8 * 16 + c % 8 * 2) & 3 == position[r, c]


def test_mma24_pack_keeps_masked_groups_and_rejects_other_patterns() -> None:
    weight = torch.randn(16, 32)
    mask = torch.zeros(16, 32)
    mask[:, ::4] = 1  # one kept per group: the second value is a zero at a distinct, later position
    nm = NM.from_dense(weight, 2, 4, mask)
    np.testing.assert_array_equal(mma24_unpack(*mma24_pack(nm)), (weight * mask).half().float().numpy())
    with pytest.raises(SparsefxError):
        mma24_pack(NM.from_dense(weight, 1, 4))
    with pytest.raises(SparsefxError):
        mma24_pack(NM.from_dense(torch.randn(8, 32), 2, 4))


PIPELINED = [MmaSpec(128, 256, 128, "float32", bm=128, bn=128, warps_m=2, warps_n=2, stages=3),  # K steps > stages
             MmaSpec(128, 64, 128, "float32", bm=128, bn=128, warps_m=2, warps_n=4, stages=4),  # 8 warps, 1 K step
             MmaSpec(128, 192, 128, "float32", bm=64, bn=128, warps_m=2, warps_n=2, stages=2),  # 2 blocks, 3 K steps
             MmaSpec(128, 128, 128, "float32", bm=128, bn=128, warps_m=2, warps_n=4, stages=3, staged_out=True)]


@pytest.mark.parametrize("spec", [MmaSpec(128, 128, 128, "float32"), MmaSpec(192, 64, 64, "float32"), *PIPELINED],
                         ids=lambda s: s.name)
def test_emulated_kernel_matches_dense(spec: MmaSpec) -> None:
    """The kernel's own index functions, lane by lane, through the PTX-ISA model of mma.sp."""
    _, values, meta = _packed(spec.rows, spec.cols)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((spec.tokens, spec.cols)).astype(np.float16)
    bias = rng.standard_normal(spec.rows).astype(np.float32)
    want = x.astype(np.float32) @ mma24_unpack(values, meta).T + bias
    got = sparse_mma.emulate(spec, x, values, meta, bias)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def _emulation_error(spec: MmaSpec, seed: int = 1) -> float:
    """Largest difference of the emulated kernel from the dense product of the decompressed weight."""
    _, values, meta = _packed(spec.rows, spec.cols)
    x = np.random.default_rng(seed).standard_normal((spec.tokens, spec.cols)).astype(np.float16)
    want = x.astype(np.float32) @ mma24_unpack(values, meta).T
    return float(np.abs(sparse_mma.emulate(spec, x, values, meta, np.zeros(spec.rows, np.float32)) - want).max())


def test_emulation_catches_a_wrong_fragment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sparse_mma, "_e_frag", lambda wrow, mi, g, t, ks: (wrow // 16 + mi, ks, g * 2))
    assert _emulation_error(MmaSpec(64, 64, 64, "float32")) > 1e-2


def test_emulation_catches_a_wrong_ldmatrix_address(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = MmaSpec(64, 64, 64, "float32", bm=64, bn=64, warps_m=2, warps_n=2, stages=2)
    assert _emulation_error(spec) < 1e-3
    # matrices 1 and 2 swapped: rows g + 8 and columns 4..7 of the compressed tile trade places
    monkeypatch.setattr(sparse_mma, "_a_ldm", lambda wrow, mi, lane, ks: (wrow + mi * 16 + lane % 8 + lane // 16 * 8,
                                                                         ks * 8 + lane // 8 % 2 * 4))
    assert _emulation_error(spec) > 1e-2


def test_emulation_catches_a_stage_read_before_its_copies_land(monkeypatch: pytest.MonkeyPatch) -> None:
    wait = sparse_mma.AsyncCopyModel.wait
    monkeypatch.setattr(sparse_mma.AsyncCopyModel, "wait", lambda self, n: wait(self, n + 1))  # one group too few
    spec = MmaSpec(64, 256, 64, "float32", bm=64, bn=64, warps_m=2, warps_n=2, stages=3)
    assert _emulation_error(spec, seed=2) > 1e-2


def test_candidates_tile_their_shape() -> None:
    for rows, cols, tokens in [(4096, 4096, 4096), (3072, 768, 128), (768, 3072, 512), (11008, 4096, 2048)]:
        found = sparse_mma.candidates(MmaSpec(rows, cols, tokens))
        assert found[0].stages == 0 and len({s.name for s in found}) == len(found)
        assert any(s.stages >= 2 for s in found)
        for s in found:
            bm, bn = s.tile
            assert sparse_mma.refusal(s) is None and rows % bm == 0 and tokens % bn == 0
            assert s.smem_bytes <= sparse_mma.MAX_SMEM
    assert all(s.tile[1] <= 128 for s in sparse_mma.candidates(MmaSpec(4096, 4096, 128)))


def test_reference_kernel_runs_on_cpu() -> None:
    spec = MmaSpec(64, 128, 64, "float32")
    _, values, meta = _packed(64, 128)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((64, 128)).astype(np.float16)
    bias = rng.standard_normal(64).astype(np.float32)
    lib = tvm.compile(tvm.IRModule({"f": sparse_mma.reference_kernel(spec).with_attr("global_symbol", "f")}),
                      resolve_target("cpu").to_tvm())
    out = tvm.runtime.empty((64, 64), "float32")
    lib["f"](*[tvm.runtime.tensor(a) for a in (x, values, meta, bias)], out)
    np.testing.assert_allclose(out.numpy(), x.astype(np.float32) @ mma24_unpack(values, meta).T + bias,
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_mma_kernel_compiles_and_assembles(arch: str, tmp_path: object) -> None:
    single = [MmaSpec(128, 256, 128), MmaSpec(64, 64, 64, "float32")]
    specs = [*single, *sparse_mma.candidates(MmaSpec(256, 256, 256))[1:3]]
    lib = sparse_mma.build(specs, resolve_target(f"cuda:{arch}").to_tvm())
    source = lib.mod.imports[0].inspect_source()
    assert sparse_mma.instruction() in source and all(s.name in source for s in specs)
    assert source.count("asm volatile(\"mma.sp") == 1  # one helper, called per m16n8 tile
    # every staging copy moves whole 128-bit words: a (row, col) tuple bound inside the vectorized copy
    # once became a scalar, so 3 of every 4 words were never staged (wrong results on an H200)
    for tile in ("a_s_ptr", "b_s_ptr"):
        assert source.count(f"*(uint4*)({tile}") >= len(single)
    # the pipelined kernels: 16-byte cp.async into one dynamic pool, fragments by ldmatrix.x4
    assert "cp.async.cg.shared.global [%0], [%1], 16;" in source and "cp.async.wait_group 1;" in source
    assert "ldmatrix.sync.aligned.m8n8.x4.shared.b16" in source and source.count("extern __shared__") == 2
    assert specs[-1].staged_out and "*(half4*)(out_ptr" in source and "make_ulonglong4" not in source
    if shutil.which("nvcc") is None:
        pytest.skip("no nvcc: the CUDA source was generated but not assembled")
    path = tmp_path / "k.cu"
    path.write_text(source)
    done = subprocess.run(["nvcc", f"-arch={arch}", "-cubin", "-o", str(tmp_path / "k.cubin"), str(path)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]


def test_unsupported_shapes_are_refused() -> None:
    assert not sparse_mma.supported(96, 64, 64) and not sparse_mma.supported(64, 48, 64)
    target = resolve_target("cuda:sm_90").to_tvm()
    for spec in [MmaSpec(64, 64, 32), MmaSpec(768, 3072, 128, bm=128, bn=256, warps_m=2, warps_n=4, stages=3),
                 MmaSpec(256, 256, 256, bm=256, bn=256, warps_m=2, warps_n=2, stages=4)]:  # too much shared memory
        with pytest.raises(sparse_mma.UnsupportedMmaShape) as caught:
            sparse_mma.build([spec], target)
        assert isinstance(caught.value, SparsefxError) and "\n" not in str(caught.value)


def test_fp16_24_linear_lowers_to_mma_operands() -> None:
    """fp16 2:4 linears: CPU reference kernel matches PyTorch; the CUDA build swaps in mma.sp."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64)).eval()
    sparse = sparsify(model, {"0": Sparsity(0.5, "nm", m=4), "2": Sparsity(0.5, "nm", m=4)}).half()
    x = torch.randn(64, 128).half()
    compiled = sparsefx.compile(sparse, (x,), verbose=False, dispatch=False)
    got = compiled(x)
    want = sparse.float()(x.float()).detach().numpy()
    assert got.dtype == torch.float16
    assert np.abs(got.float().numpy() - want).max() < 2e-3 * max(1.0, np.abs(want).max())
    gpu = sparsefx.compile(sparse.half(), (x,), target="cuda:sm_80", verbose=False)
    assert "SparseKernels" in gpu.manifest["passes"]
    cuda = [m for host in gpu.executable.mod.imports for m in host.imports if m.kind == "cuda"]
    assert sparse_mma.instruction() in cuda[0].inspect_source()
