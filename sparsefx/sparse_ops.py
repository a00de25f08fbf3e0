"""Alias for pickles made before the move: the sparse layers live in `sparsefx.sparse.layers`."""

from sparsefx.sparse.layers import SparseConv2d, SparseLinear

__all__ = ["SparseConv2d", "SparseLinear"]
