"""Sparse weight formats: block-sparse rows (BSR) and N:M, converted from a masked dense weight.

A weight is the matrix of rows = output units and columns = what one output reads (a
conv's in_channels × kh × kw in memory order), the view `sparsefx.masks` documents.

- `BSR`: the nonzero (br × bc) blocks, block row by block row. `values` (nnzb, br, bc),
  `indices` (nnzb,) int32 block-column of each block, `indptr` (rows / br + 1,) int32 where
  block row i owns blocks indptr[i]:indptr[i+1]. Block 1×1 is CSR (unstructured masks).
- `NM`: exactly N kept of every M consecutive weights of a row. `values` (rows, cols·N/M)
  and `indices` (rows, cols·N/M) int8, the position (0..M-1) of each value inside its group.
- `mma24_pack`: a 2:4 `NM` in the operand layout of the sparse tensor cores (`mma.sp`, used by
  `backends/tvm/sparse_mma.py`); `mma24_unpack` is its pure-numpy inverse.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sparsefx.errors import SparsefxError
from sparsefx.sparse.masks import Sparsity, check_block, check_m

BLOCKS = ((32, 1), (16, 1), (4, 4), (1, 16), (8, 1), (1, 8), (4, 1), (1, 4), (2, 2), (2, 1), (1, 2))
"""Block shapes `detect` tries, largest first: the first one the mask is constant over wins."""


def _matrix(weight: torch.Tensor) -> torch.Tensor:
    if weight.dim() < 2:
        raise SparsefxError(f"a sparse format needs a weight of 2 or more dimensions, got {tuple(weight.shape)}")
    return weight.detach().reshape(weight.shape[0], -1)


@dataclass
class BSR:
    values: torch.Tensor
    indices: torch.Tensor
    indptr: torch.Tensor
    shape: tuple[int, int]

    @property
    def block(self) -> tuple[int, int]:
        return tuple(self.values.shape[1:])

    @property
    def density(self) -> float:
        return self.values.numel() / (self.shape[0] * self.shape[1])

    @classmethod
    def from_dense(cls, weight: torch.Tensor, block: tuple[int, int], mask: torch.Tensor | None = None) -> BSR:
        """The blocks of `weight` (times `mask`) that hold any nonzero."""
        check_block(weight, block)
        matrix = _matrix(weight if mask is None else weight * mask.to(weight.dtype))
        (rows, cols), (br, bc) = matrix.shape, block
        blocks = matrix.reshape(rows // br, br, cols // bc, bc).permute(0, 2, 1, 3)
        keep = blocks.ne(0).any(dim=(2, 3))
        if not keep.any():  # an all-zero weight still needs one block: kernels take no empty buffers
            keep[0, 0] = True
        block_rows, block_cols = keep.nonzero(as_tuple=True)  # row-major: sorted by block row
        indptr = torch.zeros(rows // br + 1, dtype=torch.int32)
        indptr[1:] = torch.cumsum(keep.sum(dim=1), 0)
        return cls(blocks[block_rows, block_cols].contiguous(), block_cols.to(torch.int32), indptr, (rows, cols))

    def to_dense(self) -> torch.Tensor:
        (rows, cols), (br, bc) = self.shape, self.block
        counts = (self.indptr[1:] - self.indptr[:-1]).long()
        block_rows = torch.repeat_interleave(torch.arange(rows // br), counts)
        dense = self.values.new_zeros(rows // br, cols // bc, br, bc)
        dense[block_rows, self.indices.long()] = self.values
        return dense.permute(0, 2, 1, 3).reshape(rows, cols)


@dataclass
class NM:
    values: torch.Tensor
    indices: torch.Tensor
    n: int
    m: int
    shape: tuple[int, int]

    @property
    def density(self) -> float:
        return self.n / self.m

    @classmethod
    def from_dense(cls, weight: torch.Tensor, n: int, m: int, mask: torch.Tensor | None = None) -> NM:
        """Keep `n` of every `m`: the mask's kept positions (it must keep at most n per group),
        or the n largest magnitudes without a mask."""
        if not isinstance(n, int) or not isinstance(m, int) or not 1 <= n < m:
            raise SparsefxError(f"N:M sparsity needs integers 1 <= N < M, got {n}:{m}")
        check_m(weight, m)
        matrix = _matrix(weight)
        rows, cols = matrix.shape
        groups = matrix.reshape(rows, cols // m, m)
        if mask is None:
            score = groups.abs()
        else:
            kept = mask.reshape(rows, cols // m, m).bool()
            if int(kept.sum(dim=2).max()) > n:
                raise SparsefxError(f"the mask keeps more than {n} of some group of {m} weights; "
                                    f"it is not {n}:{m} sparse (build it with masks.nm_mask(weight, {n}, {m}))")
            score = kept.float()  # a group with fewer than n kept pads with zeros at unkept positions
            groups = groups * kept
        position = score.topk(n, dim=2).indices.sort(dim=2).values
        values = groups.gather(2, position).reshape(rows, -1).contiguous()
        return cls(values, position.reshape(rows, -1).to(torch.int8), n, m, (rows, cols))

    def to_dense(self) -> torch.Tensor:
        rows, cols = self.shape
        dense = self.values.new_zeros(rows, cols // self.m, self.m)
        dense.scatter_(2, self.indices.long().reshape(rows, -1, self.n), self.values.reshape(rows, -1, self.n))
        return dense.reshape(rows, cols)


SparseFormat = BSR | NM


def _mma24_shifts() -> np.ndarray:
    """Bit offset of each 2-bit position in a metadata word, indexed (row half, column j)."""
    return (16 * np.arange(2)[:, None] + 2 * np.arange(8)[None, :]).astype(np.uint32)


def mma24_pack(nm: NM) -> tuple[np.ndarray, np.ndarray]:
    """A 2:4 weight as `mma.sp.*.m16n8k32.row.col.f32.f16.f16.f32` takes it: (values, meta).

    `values` (rows, cols/2) float16: the two kept weights of each group of 4, in column order
    (exactly `nm.values`), so a b32 register is two neighbouring kept values of one row.
    `meta` (rows/16, cols/32, 16) uint32: one word per (16-row tile, 32-column step, word w),
    w = 2·g + h for g = 0..7, h = 0, 1; bits 2j..2j+1 (j = 0..7) hold the position (0..3 inside its
    group of 4) of kept value 8h + j of tile row g within the step (its group is (8h + j) // 2),
    bits 16 + 2j.. the same for tile row g + 8. Lane l of a warp reads word 2·(l // 4) + l % 2:
    with sparsity selector 0 lanes with l % 4 = 0, 1 supply it (PTX ISA 9.7.16.6, m16n8k32 f16).
    Needs rows % 16 == 0, cols % 32 == 0 and sorted positions (`NM.from_dense` sorts them), which
    `mma.sp::ordered_metadata` requires."""
    if (nm.n, nm.m) != (2, 4):
        raise SparsefxError(f"the sparse tensor cores take 2:4 sparsity, got {nm.n}:{nm.m}")
    rows, cols = nm.shape
    if rows % 16 or cols % 32:
        raise SparsefxError(f"mma.sp packing needs rows % 16 == 0 and cols % 32 == 0, got {rows}x{cols}")
    position = nm.indices.detach().cpu().numpy().astype(np.uint32).reshape(rows, cols // 4, 2)
    if not (position[..., 0] < position[..., 1]).all() or position.max() > 3:
        raise SparsefxError("mma.sp metadata needs two distinct, sorted positions 0..3 per group of 4")
    values = nm.values.detach().cpu().to(torch.float16).numpy().reshape(rows, cols // 2)
    # (tile, row half, g, step, h, j) -> word (tile, step, g, h)
    fields = position.reshape(rows // 16, 2, 8, cols // 32, 2, 8) << _mma24_shifts()[None, :, None, None, None, :]
    meta = np.bitwise_or.reduce(np.bitwise_or.reduce(fields, axis=5), axis=1)
    return np.ascontiguousarray(values), np.ascontiguousarray(meta.transpose(0, 2, 1, 3).reshape(rows // 16, -1, 16))


def mma24_unpack(values: np.ndarray, meta: np.ndarray) -> np.ndarray:
    """The dense (rows, cols) float32 matrix that `mma24_pack`'s (values, meta) stand for,
    decoded from the metadata words alone (the reference the packing is tested against)."""
    rows, half = values.shape
    cols = half * 2
    words = np.asarray(meta, np.uint32).reshape(rows // 16, cols // 32, 8, 2).transpose(0, 2, 1, 3)
    fields = (words[:, None, :, :, :, None] >> _mma24_shifts()[None, :, None, None, None, :]) & 3
    position = fields.reshape(rows, cols // 2).astype(np.int64)
    dense = np.zeros((rows, cols), np.float32)
    group = np.arange(cols // 2) // 2 * 4
    np.put_along_axis(dense, group[None, :] + position, np.asarray(values, np.float32), axis=1)
    return dense


def from_dense(weight: torch.Tensor, sparsity: Sparsity, mask: torch.Tensor | None = None) -> SparseFormat:
    """The format `sparsity` asks for, holding `weight` under `mask` (or the mask `sparsity`
    chooses by magnitude when none is given). Unstructured sparsity is stored as CSR (BSR 1×1)."""
    if not isinstance(sparsity, Sparsity):
        raise SparsefxError(f"expected a sparsefx.Sparsity, got {type(sparsity).__name__}")
    if sparsity.pattern == "nm":
        n = round(sparsity.density * sparsity.m)
        if n >= sparsity.m:
            raise SparsefxError(f"N:M sparsity needs N < M; density {sparsity.density} keeps {n} of {sparsity.m}, "
                                "which is dense: lower the density")
        return NM.from_dense(weight, n, sparsity.m, sparsity.mask(weight) if mask is None else mask)
    block = sparsity.block if sparsity.pattern == "block" else (1, 1)
    return BSR.from_dense(weight, block, sparsity.mask(weight) if mask is None else mask)


def detect(mask: torch.Tensor) -> Sparsity:
    """The sparsity a mask has: N:M when every group of M (4, 8, 16) keeps the same N < M,
    else block when the mask is constant over one of `BLOCKS`, else unstructured."""
    matrix = _matrix(mask).bool()
    rows, cols = matrix.shape
    density = matrix.float().mean().item()
    if density == 0:
        raise SparsefxError("the mask keeps no weight; a sparse layer needs a density in (0, 1]")
    for m in (4, 8, 16):
        if cols % m == 0:
            kept = matrix.reshape(rows, -1, m).sum(dim=2)
            if int(kept.min()) == int(kept.max()) < m:
                return Sparsity(density, "nm", m=m)
    for br, bc in BLOCKS:
        if rows % br == 0 and cols % bc == 0 and rows * cols > br * bc:
            blocks = matrix.reshape(rows // br, br, cols // bc, bc)
            if bool((blocks.all(dim=(1, 3)) | ~blocks.any(dim=(1, 3))).all()):
                return Sparsity(density, "block", block=(br, bc))
    return Sparsity(density, "unstructured")
