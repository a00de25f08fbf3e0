"""Small classifiers for 28×28 grey images (Fashion-MNIST), the models recovery is measured on."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparsefx.capture.models import BasicBlock


class LeNet300100(nn.Module):
    """The fully connected LeNet-300-100 (LeCun et al. 1998), the classic weight-sparsity testbed."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(28 * 28, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc3(torch.relu(self.fc2(x)))


class LeNet5(nn.Module):
    """LeNet-5 with ReLU and max pooling; the first conv pads to keep 28×28 as in the 32×32 original.

    Pooling is F.max_pool2d: the coupling rules know it, not the `torch.max_pool2d` alias."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = F.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc3(torch.relu(self.fc2(x)))


class SmallResNet(nn.Module):
    """A ResNet for 28×28 grey images: a 3×3 stem, then one residual block per stage, each halving
    the resolution (14, 7, 4), so it trains on a CPU in minutes (about 2.6M MACs per image)."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64), num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks, in_ch = [], widths[0]
        for width in widths:
            blocks.append(BasicBlock(in_ch, width, stride=2))
            in_ch = width
        self.stages = nn.Sequential(*blocks)
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(x.mean(dim=(2, 3)))


ZOO = {"lenet300": LeNet300100, "lenet5": LeNet5, "resnet": SmallResNet}
