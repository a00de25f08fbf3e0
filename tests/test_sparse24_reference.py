"""The 2:4 tensor-core path against references it shares no code with.

The weight is built 2:4 sparse directly (two random positions of every four), not by NM.from_dense;
the packed metadata is decoded by a plain loop written from the layout the PTX ISA gives for
mma.sp.m16n8k32 f16 (per 16-row tile and 32-column step, word 2g + h holds, for tile rows g and
g + 8 in its low and high halves, the 2-bit position of kept values 8h..8h+7 of that row), not by
mma24_unpack; and products are taken in float64 from the directly built weight. Checked: the
packer, the PTX-model emulation of the CUDA kernel (sparse_mma.emulate) and the CPU reference
kernel compiled by TVM. The GPU itself is checked by benchmarks/gpu_backend.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm

from sparsefx.backends.tvm.sparse import mma as sparse_mma
from sparsefx.backends.tvm.sparse.mma import MmaSpec
from sparsefx.sparse.formats import NM, mma24_pack
from sparsefx.target import resolve_target


def direct_24_weight(rows: int, cols: int, seed: int) -> np.ndarray:
    """A 2:4 weight, fp16-representable, made without any sparsefx code: two random slots of every 4 kept."""
    rng = np.random.default_rng(seed)
    weight = np.zeros((rows, cols), np.float32)
    for r in range(rows):
        for group in range(0, cols, 4):
            for slot in rng.choice(4, size=2, replace=False):
                weight[r, group + slot] = rng.uniform(0.5, 2.0) * rng.choice([-1.0, 1.0])  # never 0
    return weight.astype(np.float16).astype(np.float32)


def decode_by_loop(values: np.ndarray, meta: np.ndarray) -> np.ndarray:
    """The dense weight that packed (values, meta) stand for, one kept value at a time."""
    rows, cols = values.shape[0], values.shape[1] * 2
    dense = np.zeros((rows, cols), np.float32)
    for row in range(rows):
        tile, in_tile = divmod(row, 16)
        g, upper = in_tile % 8, in_tile // 8
        for step in range(cols // 32):
            for kept in range(16):  # 8 groups of 4 columns, 2 kept each
                h, j = divmod(kept, 8)
                word = int(meta[tile, step, 2 * g + h])
                position = (word >> (16 * upper + 2 * j)) & 3
                column = step * 32 + (kept // 2) * 4 + position
                assert dense[row, column] == 0, "two kept values decoded onto one column"
                dense[row, column] = values[row, step * 16 + kept]
    return dense


def _packed(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return mma24_pack(NM.from_dense(torch.from_numpy(weight), 2, 4))


@pytest.mark.parametrize("shape", [(16, 32), (32, 64), (48, 96)])
def test_packed_weight_decodes_to_the_weight_it_was_built_from(shape: tuple[int, int]) -> None:
    weight = direct_24_weight(*shape, seed=sum(shape))
    np.testing.assert_array_equal(decode_by_loop(*_packed(weight)), weight)


def test_the_loop_decoder_sees_a_wrong_metadata_bit() -> None:
    weight = direct_24_weight(16, 32, seed=1)
    values, meta = _packed(weight)
    meta = meta.copy()
    meta[0, 0, 0] ^= np.uint32(1)  # tile row 0, first kept value: its position moves by one column
    assert not np.array_equal(decode_by_loop(values, meta), weight)


def _product(weight: np.ndarray, x: np.ndarray, bias: np.ndarray) -> np.ndarray:
    return x.astype(np.float64) @ weight.astype(np.float64).T + bias


@pytest.mark.parametrize("spec", [MmaSpec(64, 64, 64, "float32"), MmaSpec(128, 192, 64, "float32")])
def test_emulated_kernel_matches_the_dense_product(spec: MmaSpec) -> None:
    assert sparse_mma.supported(spec.rows, spec.cols, spec.tokens)  # whole tiles: the kernel covers every output
    weight = direct_24_weight(spec.rows, spec.cols, seed=spec.rows)
    values, meta = _packed(weight)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((spec.tokens, spec.cols)).astype(np.float16)
    bias = rng.standard_normal(spec.rows).astype(np.float32)
    want = _product(weight, x, bias)
    got = sparse_mma.emulate(spec, x, values, meta, bias)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5


def test_cpu_reference_kernel_matches_the_dense_product() -> None:
    spec = MmaSpec(64, 128, 32, "float32")
    weight = direct_24_weight(spec.rows, spec.cols, seed=7)
    values, meta = _packed(weight)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((spec.tokens, spec.cols)).astype(np.float16)
    bias = rng.standard_normal(spec.rows).astype(np.float32)
    lib = tvm.compile(tvm.IRModule({"f": sparse_mma.reference_kernel(spec).with_attr("global_symbol", "f")}),
                      resolve_target("cpu").to_tvm())
    out = tvm.runtime.empty((spec.tokens, spec.rows), "float32")
    lib["f"](*[tvm.runtime.tensor(a) for a in (x, values, meta, bias)], out)
    want = _product(weight, x, bias)
    assert np.linalg.norm(out.numpy() - want) / np.linalg.norm(want) < 1e-5
