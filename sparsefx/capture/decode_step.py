"""One decoding step of a Hugging Face decoder as a module of plain tensors, so it can be compiled.

`generate()` keeps the key/value cache in a `DynamicCache`, an object that neither torch.fx nor
Relax can take as an input. `DecodeStep(model)` takes `(ids, k0, v0, k1, v1, ...)` (the cache of
a context of fixed length) and returns `(logits, k0', v0', ...)`: the logits of the new tokens and
their keys and values only, which the caller appends. Compiled with `sparsefx.compile`, it is
the per-token decode cost at that context length (one build per length: shapes are static).

    past = cache_tensors(model(prompt, use_cache=True))
    step = sparsefx.compile(DecodeStep(model), (next_ids, *past))
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from sparsefx.errors import SparsefxError


class DecodeStep(nn.Module):
    """`model` (a transformers causal LM) on new tokens after a cache passed in as tensors."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not hasattr(getattr(model, "config", None), "num_hidden_layers"):
            raise SparsefxError(f"DecodeStep wraps a transformers decoder with a config; got {type(model).__name__}")
        self.model = model
        # transformers 5.2x renamed the argument (past_key_values is deprecated); older releases have only that
        self.cache_argument = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def forward(self, ids: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        layers = self.model.config.num_hidden_layers
        if len(past) != 2 * layers:
            raise SparsefxError(f"DecodeStep needs a key and a value per layer ({2 * layers} tensors), got "
                                f"{len(past)}; pass cache_tensors(model(context, use_cache=True))")
        cache = DynamicCache(config=self.model.config)
        for i in range(layers):  # onto an empty (0,) tensor, which the importer drops (importer._cat)
            cache.update(past[2 * i], past[2 * i + 1], i)
        logits = self.model(ids, use_cache=True, **{self.cache_argument: cache}).logits
        new = ids.shape[1]
        return (logits, *(t[:, :, -new:] for layer in cache.layers for t in (layer.keys, layer.values)))


def cache_tensors(cache: object) -> tuple[torch.Tensor, ...]:
    """`(k0, v0, k1, v1, ...)` from a transformers cache, or from the output of a model run with
    `use_cache=True`, in `DecodeStep`'s order."""
    for name in ("cache", "past_key_values"):  # a model output: its cache under either release's name
        if not hasattr(cache, "layers") and getattr(cache, name, None) is not None:
            cache = getattr(cache, name)
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise SparsefxError(f"expected a transformers Cache with .layers, got {type(cache).__name__}; "
                            "run the model with use_cache=True")
    return tuple(t for layer in layers for t in (layer.keys, layer.values))
