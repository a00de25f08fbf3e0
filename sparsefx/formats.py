"""Sparse weight formats: block-sparse rows (BSR) and N:M, converted from a masked dense weight.

A weight is the matrix of rows = output units and columns = what one output reads (a
conv's in_channels × kh × kw in memory order), the view `sparsefx.masks` documents.

- `BSR`: the nonzero (br × bc) blocks, block row by block row. `values` (nnzb, br, bc),
  `indices` (nnzb,) int32 block-column of each block, `indptr` (rows / br + 1,) int32 where
  block row i owns blocks indptr[i]:indptr[i+1]. Block 1×1 is CSR (unstructured masks).
- `NM`: exactly N kept of every M consecutive weights of a row. `values` (rows, cols·N/M)
  and `indices` (rows, cols·N/M) int8, the position (0..M-1) of each value inside its group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import SparsefxError
from .masks import Sparsity, _check_block, _check_m

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
        _check_block(weight, block)
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
        _check_m(weight, m)
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
