"""The repository's own example model: a small ResNet with BatchNorm, for the demo and CLI.

Trained by ``launch/train.py`` on scikit-learn's 8x8 digits, and what
``python -m distnorm plan distnorm.examples:small_resnet --input-shape 1,8,8`` plans
when neither torchvision nor timm is installed. Its layers follow He et al. (2016),
"Deep Residual Learning for Image Recognition", Fig. 2 (basic block), with a BatchNorm
after every convolution, so that every way distnorm can change a BatchNorm has a layer
to act on: stem, block and projection-shortcut BatchNorms over feature maps of 8x8 and
4x4 positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus a (projected when the shape changes) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A ResNet for 8x8 single-channel images: stem, two stages, global pool, linear."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.stage1 = BasicBlock(width, width)
        self.stage2 = BasicBlock(width, 2 * width, stride=2)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.stage1(self.stem(x)))
        return self.head(x.mean(dim=(2, 3)))


def small_resnet(num_classes: int = 10, width: int = 16) -> SmallResNet:
    """The demo's model (``package.module:factory`` form for the CLI)."""
    return SmallResNet(num_classes, width)
