"""Small models that exercise each coupling structure (shared by the tests)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn(cin: int, cout: int, groups: int = 1, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU())


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.a = nn.Sequential(conv_bn(16, 24), nn.Conv2d(24, 16, 3, 1, 1), nn.BatchNorm2d(16))
        self.b = nn.Sequential(conv_bn(16, 24), nn.Conv2d(24, 16, 3, 1, 1), nn.BatchNorm2d(16))
        self.down = nn.Conv2d(16, 32, 1, 2)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = F.relu(x + self.a(x))
        x = F.relu(x + self.b(x))
        x = self.down(x).mean((2, 3))
        return self.head(x)


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.left, self.right = conv_bn(3, 12), conv_bn(3, 20)
        self.fuse = conv_bn(32, 24)
        self.split_a, self.split_b = nn.Conv2d(12, 8, 1), nn.Conv2d(12, 8, 1)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fuse(torch.cat([self.left(x), self.right(x)], dim=1))
        a, b = torch.split(y, 12, dim=1)
        z = torch.cat([self.split_a(a), self.split_b(b)], 1)
        return self.head(F.adaptive_avg_pool2d(z, 1).flatten(1))


class Depthwise(nn.Module):
    """Inverted residual: expand 1x1, depthwise 3x3, project 1x1, plus a grouped conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.expand = conv_bn(16, 48)
        self.dw = conv_bn(48, 48, groups=48)
        self.project = nn.Sequential(nn.Conv2d(48, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.grouped = conv_bn(16, 32, groups=4)
        self.norm = nn.GroupNorm(8, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.project(self.dw(self.expand(x)))
        x = F.relu(self.norm(self.grouped(x)))
        return self.head(x.mean((2, 3)))


class SqueezeExcite(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 32)
        self.fc1, self.fc2 = nn.Conv2d(32, 8, 1), nn.Conv2d(8, 32, 1)
        self.body = conv_bn(32, 24)
        self.head = nn.Linear(24 * 4 * 4, 10)  # flatten -> linear: channel x spatial

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        scale = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        x = self.body(x * scale)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 4), 1))


class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections and an MLP."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.embed = nn.Linear(8, dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(dim, 64), nn.Linear(64, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        att = torch.softmax(q @ k.transpose(-2, -1) * self.head_dim ** -0.5, dim=-1)
        x = x + self.o((att @ v).transpose(1, 2).reshape(b, n, self.heads * self.head_dim))
        x = x + self.fc2(F.relu(self.fc1(x)))
        return self.head(x.mean(1))


class SdpaAttention(Attention):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, -1, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        x = x + self.o(out.transpose(1, 2).reshape(b, n, -1))
        return self.head(x.mean(1))


class PackedAttention(nn.Module):
    """Transformer block on nn.MultiheadAttention (packed q/k/v, as torchvision's ViT)."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.head = nn.Linear(dim, 3)  # no LayerNorm: its statistics change when channels go

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return self.head(x[:, 0])


def image() -> tuple[torch.Tensor]:
    return (torch.randn(2, 3, 16, 16),)


def tokens() -> tuple[torch.Tensor]:
    return (torch.randn(2, 6, 8),)


CASES = {
    "residual": (Residual, image), "concat": (Concat, image), "depthwise": (Depthwise, image),
    "squeeze_excite": (SqueezeExcite, image), "attention": (Attention, tokens),
    "sdpa_attention": (SdpaAttention, tokens), "packed_attention": (PackedAttention, tokens),
}
