"""Alias for pickles made before the move: `HeadAttention` lives in `sparsefx.channels.attention`."""

from sparsefx.channels.attention import HeadAttention

__all__ = ["HeadAttention"]
