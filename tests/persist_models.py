"""Small models for the save/load and export tests, as model-spec factories
(`tests/persist_models.py:vit`): the test process and a fresh process build the same architecture."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer
from transformers import BertConfig, BertModel

from sparsefx.recovery.zoo import ZOO


def vit() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """A 2-layer, 4-head ViT at 32x32; its zero-initialised head gets weights so outputs are not all zero."""
    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128,
                              num_classes=10).eval()
    for layer in model.modules():
        if isinstance(layer, nn.Linear) and not layer.weight.any():
            nn.init.normal_(layer.weight, std=0.02)
    return model, (torch.randn(2, 3, 32, 32),)


def bert() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """A 2-layer BERT with hidden 64, 4 heads and token ids of length 16."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=32)
    return BertModel(config).eval(), (torch.randint(0, 120, (1, 16)),)


def lenet() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """LeNet-5 for Fashion-MNIST (1x28x28), what `sparsefx finetune` trains."""
    torch.manual_seed(0)
    return ZOO["lenet5"]().eval(), (torch.randn(1, 1, 28, 28),)
