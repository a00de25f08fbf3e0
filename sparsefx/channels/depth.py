"""Depth pruning: remove whole blocks (decoder layers) of a model, the least influential first.

A block's influence is ShortGPT's block influence (Men et al. 2024): one minus the mean cosine
similarity, over the calibration tokens, between the hidden state a block receives and the one
it returns. A block that barely turns the residual stream does little; removing it changes
the output least. Scores are measured once on the dense model (not re-measured after each
removal), as in ShortGPT.

`prune_layers(model, calibration, n)` hands back a copy of the user's model (its own class)
with the `n` lowest-influence blocks gone from the block list, and for a Hugging Face model
its config updated (`num_hidden_layers`, per-layer `layer_types`) and every block's
`layer_idx` renumbered, so the KV cache, `generate()` and `save_pretrained` keep working.
Width pruning composes either way: `sparsefx.prune(prune_layers(model, ...), ...)`.
"""

from __future__ import annotations

import copy
import logging
import operator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sparsefx.channels.calibration import CalibrationError, batches
from sparsefx.errors import PruneError, one_line

log = logging.getLogger("sparsefx.depth")
PER_LAYER_CONFIG = ("layer_types",)  # config lists with one entry per layer, kept for the kept layers


def find_blocks(model: nn.Module, path: str | None = None) -> tuple[str, nn.ModuleList]:
    """The model's block list: `path` (e.g. "model.layers"), or the longest `nn.ModuleList` whose
    entries all share one class (a decoder's layers in every Hugging Face family)."""
    if path is not None:
        try:
            blocks = operator.attrgetter(path)(model)
        except AttributeError:
            raise PruneError(f"layers={path!r} is not an attribute of {type(model).__name__}; "
                             "name its nn.ModuleList of blocks (e.g. 'model.layers')") from None
        if not isinstance(blocks, nn.ModuleList):
            raise PruneError(f"layers={path!r} is a {type(blocks).__name__}, not an nn.ModuleList of blocks")
        return path, blocks
    candidates = [(len(m), name, m) for name, m in model.named_modules()
                  if isinstance(m, nn.ModuleList) and len(m) > 1 and len({type(b) for b in m}) == 1]
    if not candidates:
        raise PruneError(f"{type(model).__name__} has no list of repeated blocks; pass layers='path.to.ModuleList'")
    _, name, blocks = max(candidates, key=lambda c: c[0])
    return name, blocks


def hidden_of(value: object) -> torch.Tensor | None:
    """The hidden state in what a block receives or returns (a tensor or the first of a tuple)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


def block_influence(model: nn.Module, calibration: object, layers: str | None = None) -> np.ndarray:
    """ShortGPT block influence of every block: 1 - mean cosine(input hidden, output hidden) over
    the calibration tokens. Runs `model` (in eval mode, no gradients); changes nothing."""
    _, blocks = find_blocks(model, layers)
    runs = batches(calibration)
    sums, counts = np.zeros(len(blocks)), np.zeros(len(blocks))
    seen: dict[int, torch.Tensor] = {}

    def before(i: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            seen[i] = hidden_of(args) if args else hidden_of(kwargs.get("hidden_states"))
        return hook

    def after(i: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
            x, y = seen.pop(i, None), hidden_of(output)
            if x is None or y is None or x.shape != y.shape:
                raise PruneError(f"block {i} ({type(module).__name__}) does not map a hidden state to one of the "
                                 "same shape; depth pruning needs residual blocks")
            cos = F.cosine_similarity(x.float().flatten(0, -2), y.float().flatten(0, -2), dim=-1)
            sums[i] += (1 - cos).sum().item()
            counts[i] += cos.numel()
        return hook

    handles = [h for i, b in enumerate(blocks) for h in (b.register_forward_pre_hook(before(i), with_kwargs=True),
                                                         b.register_forward_hook(after(i), with_kwargs=True))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i, batch in enumerate(runs):
                check_tokens(model, batch, i)
                try:
                    model(*batch)
                except PruneError:
                    raise
                except Exception as error:
                    raise CalibrationError(f"running the model on calibration batch {i} failed ({one_line(error)}); "
                                           "pass batches of model inputs") from None
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    if not counts.all():
        raise PruneError(f"blocks {np.flatnonzero(counts == 0).tolist()} never ran on the calibration data; "
                         "pass layers= naming the blocks the forward runs")
    return sums / counts


def check_tokens(model: nn.Module, batch: tuple, i: int) -> None:
    """A language model (a config with vocab_size) takes (N, T) integer token ids below its vocabulary."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is None:
        return
    ids = batch[0]
    if ids.is_floating_point() or ids.dim() != 2:
        raise CalibrationError(f"calibration batch {i} is {ids.dtype} {tuple(ids.shape)}; "
                               f"{type(model).__name__} takes (N, T) integer token ids")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise CalibrationError(f"calibration batch {i} has token ids outside [0, {vocab}); "
                               "tokenize with the model's own tokenizer")


def prune_layers(model: nn.Module, calibration: object, n: int, layers: str | None = None) -> nn.Module:
    """A copy of `model` without its `n` least influential blocks (see `block_influence`).

    `layers` names the block list (default: found, e.g. "model.layers" of a Llama). The input
    model is never modified; the copy records the removed and kept block indices in
    `sparsefx_depth` ({"removed": [...], "kept": [...], "influence": [...]})."""
    path, blocks = find_blocks(model, layers)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n < len(blocks):
        raise PruneError(f"n={n!r} blocks to remove: {type(model).__name__} has {len(blocks)} in {path}; "
                         f"pass an integer from 1 to {len(blocks) - 1}")
    influence = block_influence(model, calibration, path)
    removed = sorted(np.argsort(influence, kind="stable")[:n].tolist())
    kept = [i for i in range(len(blocks)) if i not in removed]
    work = copy.deepcopy(model)
    work_blocks = operator.attrgetter(path)(work)
    work.set_submodule(path, nn.ModuleList([work_blocks[i] for i in kept]))
    renumber(operator.attrgetter(path)(work), kept)
    update_config(work, kept, len(blocks))
    work.sparsefx_depth = {"removed": removed, "kept": kept, "influence": [round(float(v), 6) for v in influence]}
    log.info("removed blocks %s of %s (influence %s)", removed, path, [round(float(influence[i]), 4) for i in removed])
    return work.train(model.training)


def renumber(blocks: nn.ModuleList, kept: list[int]) -> None:
    """Set every integer `layer_idx` inside block j to j: a KV cache indexes its layers by it."""
    for new, (block, old) in enumerate(zip(blocks, kept)):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int) and module.layer_idx == old:
                module.layer_idx = new


def update_config(model: nn.Module, kept: list[int], before: int) -> None:
    """A Hugging Face config that counts the layers (num_hidden_layers, or the family's alias of it)
    describes the kept ones; per-layer lists keep the kept entries."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "num_hidden_layers", None) != before:
        if config is not None:
            log.warning("config.num_hidden_layers (%s) is not the %d blocks found; left as is",
                        getattr(config, "num_hidden_layers", None), before)
        return
    for name in PER_LAYER_CONFIG:
        values = getattr(config, name, None)
        if isinstance(values, (list, tuple)) and len(values) == before:
            setattr(config, name, type(values)(values[i] for i in kept))
    config.num_hidden_layers = len(kept)
