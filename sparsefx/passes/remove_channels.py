"""Alias for pickles made before the move: rewritten graphs called `patched_shape` from here."""

from sparsefx.channels.remove import patched_shape

__all__ = ["patched_shape"]
