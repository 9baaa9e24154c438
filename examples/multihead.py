"""A multi-head model whose forward returns a tuple, with a block that returns a dict: what real
detection, landmark and multi-task models look like. splitaudit audits it without a wrapper:

    splitaudit cuts --model examples/multihead.py:build --data builtin:mnist
    splitaudit audit --model examples/multihead.py:build --data builtin:mnist --output 0 --profile quick

``--output 0`` (the default: the first tensor) picks the class logits for accuracy; ``--output 1`` would
pick the landmarks, which have no classes. The block's dict is a cut on its first tensor (``block``),
or on another one by name (``block:skip``); its bytes count every tensor it returns.
"""

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return {"out": torch.relu(self.conv(x)), "skip": x}


class MultiHead(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.block = Block(8)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.classes = nn.Linear(8 * 16, num_classes)
        self.landmarks = nn.Linear(8 * 16, 4)

    def forward(self, x):
        h = self.block(self.stem(x))
        f = torch.flatten(self.pool(h["out"] + h["skip"]), 1)
        return self.classes(f), self.landmarks(f)


def build() -> nn.Module:
    torch.manual_seed(0)
    return MultiHead()
