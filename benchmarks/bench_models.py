"""Small MNIST models the benchmarks train (an MLP, a VGG-style CNN with BatchNorm, a ResNet-8 with
BatchNorm), shared so every benchmark measures the same architectures."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["mlp", "small_vgg", "BasicBlock", "SmallResNet"]


def mlp(width: int = 512) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, 10),
    )


def small_vgg(width: int = 32) -> nn.Module:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    w = width
    return nn.Sequential(
        *block(1, w), *block(w, w), nn.MaxPool2d(2),
        *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),
        *block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4 * w, 10),
    )  # fmt: skip


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A ResNet-8 for 1-channel images: stem, three basic blocks (c, 2c, 4c channels), pooling, linear."""

    def __init__(self, width: int = 16):
        super().__init__()
        c = (width, 2 * width, 4 * width)
        self.conv = nn.Conv2d(1, c[0], 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(c[0])
        self.layer1 = BasicBlock(c[0], c[0])
        self.layer2 = BasicBlock(c[0], c[1], 2)
        self.layer3 = BasicBlock(c[1], c[2], 2)
        self.fc = nn.Linear(c[2], 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
