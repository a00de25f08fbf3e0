"""Keep a pruned Hugging Face model's config true to its layers, where one number can say it.

`save_pretrained` writes the config and `from_pretrained` builds the model from it, so a
config that still says intermediate_size=3072 after the MLPs were cut to 1536 makes the
saved model unloadable. A size field is updated when every layer that had that width before
removal has one and the same width after (the MLPs pruned evenly); uneven widths, or pruned
heads (BERT derives the head width from hidden_size / num_attention_heads), are beyond what the
config can describe: it is left as it was and `from_pretrained` refuses the shapes.
"""

from __future__ import annotations

from torch import nn

from sparsefx.log import get_logger

LOG = get_logger("channels")
# Config fields that are the width of a family of Linear layers' outputs (MLP hidden sizes).
WIDTH_FIELDS = ("intermediate_size", "n_inner", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim")


def linear_widths(model: nn.Module) -> dict[str, int]:
    return {name: m.out_features for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def sync_config(model: nn.Module, widths_before: dict[str, int]) -> list[str]:
    """Update `model.config`'s width fields to the pruned layers; returns the fields changed."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return []
    after = linear_widths(model)
    changed = []
    for field in WIDTH_FIELDS:
        width = getattr(config, field, None)
        if not isinstance(width, int):
            continue
        family = [name for name, before in widths_before.items() if before == width and name in after]
        new = {after[name] for name in family}
        if len(new) == 1 and width not in new:
            setattr(config, field, new.pop())
            changed.append(field)
        elif len(new) > 1:
            LOG.info(f"config.{field} cannot describe the pruned widths {sorted(new)}; "
                     "save_pretrained will write a config from_pretrained refuses (save with sparsefx.save)")
    return changed
