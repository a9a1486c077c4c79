"""A small CNN for digits-sized inputs (8x8 to 32x32)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def _conv_block(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class DigitsCNN(nn.Module):
    """Three conv3x3-BN-ReLU blocks (2x2 max-pool after the first two), global average pool, Linear."""

    def __init__(self, num_classes: int, in_channels: int, widths: Sequence[int] = (32, 64, 64)) -> None:
        super().__init__()
        if len(widths) != 3 or any(w < 1 for w in widths):
            raise ValueError(f"widths must be three positive integers, got {tuple(widths)}")
        w1, w2, w3 = (int(w) for w in widths)
        self.body = nn.Sequential(
            *_conv_block(in_channels, w1),
            nn.MaxPool2d(2),
            *_conv_block(w1, w2),
            nn.MaxPool2d(2),
            *_conv_block(w2, w3),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.feature_dim = w3
        self.classifier = nn.Linear(w3, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled penultimate features (N, feature_dim)."""
        return self.body(x)

    def stage_modules(self) -> list[nn.Module]:
        """The modules whose outputs are the three conv blocks' activations (after ReLU),
        at full, 1/2 and 1/4 resolution: the attention-transfer points."""
        return [m for m in self.body if isinstance(m, nn.ReLU)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
