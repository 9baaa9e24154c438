"""Tiny models for tests: a non-sequential net with a residual block, BatchNorm and functional ops."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)
        self.bn = nn.BatchNorm2d(ch)

    def forward(self, x):
        return F.relu(x + self.bn(self.conv(x)))  # residual + functional op


class TinyNet(nn.Module):
    """1x12x12 -> 4 classes."""

    def __init__(self, in_channels: int = 1, num_classes: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.block = Block(4)
        self.fc = nn.Linear(4 * 6 * 6, num_classes)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = self.block(x)
        x = F.max_pool2d(x, 2)
        return self.fc(torch.flatten(x, 1))


def build() -> nn.Module:
    torch.manual_seed(0)
    return TinyNet()


def build_rgb() -> nn.Module:
    torch.manual_seed(0)
    return TinyNet(in_channels=3)


class TinyDropNet(TinyNet):
    """TinyNet with dropout before its classifier: in training mode it draws from torch's global generator."""

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        x = self.block(F.relu(self.stem(x)))
        return self.fc(self.drop(torch.flatten(F.max_pool2d(x, 2), 1)))


def build_with_dropout() -> nn.Module:
    torch.manual_seed(0)
    return TinyDropNet()


def smooth_images(n: int, gen: torch.Generator) -> torch.Tensor:
    """Smooth random 12x12 images in [0, 1], TinyNet's input (the white-box attacks' tests)."""
    return F.interpolate(torch.rand(n, 1, 4, 4, generator=gen), size=(12, 12), mode="bilinear", align_corners=False)


def white_box_setup(n_aux: int, n_eval: int):
    """A seeded TinyNet in eval mode with ``n_aux`` and ``n_eval`` smooth images (the white-box attacks' tests)."""
    torch.manual_seed(0)
    model = TinyNet().eval()
    gen = torch.Generator().manual_seed(0)
    return model, smooth_images(n_aux, gen), smooth_images(n_eval, gen)
