"""A LeNet-style CNN with BatchNorm for MNIST-sized inputs (28x28; any size from 8x8 works).

Two conv5x5-BN-ReLU-maxpool2 stages, an average pool to a fixed 4x4 grid, a hidden fully
connected layer with ReLU, then the Linear classifier: the shape of LeCun et al.'s LeNet-5
(1998) with BatchNorm after each conv. The convs are zero-padded ("same"), so 28x28 input
gives 28 -> 14 -> 7 maps and the 4x4 pool makes the head independent of the image size.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

POOLED_SIDE = 4
"""Side of the feature grid in front of the fully connected layers (adaptive average pool)."""


def _conv_stage(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size=5, padding=2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    ]


class LeNet(nn.Module):
    """conv5x5(``widths[0]``)-BN-ReLU-pool, conv5x5(``widths[1]``)-BN-ReLU-pool, 4x4 average
    pool, Linear(``hidden``)-ReLU (the features), Linear (the classifier)."""

    def __init__(
        self, num_classes: int, in_channels: int, widths: Sequence[int] = (16, 32), hidden: int = 128
    ) -> None:
        super().__init__()
        if len(widths) != 2 or any(int(w) < 1 for w in widths):
            raise ValueError(f"LeNet widths must be two positive integers, got {tuple(widths)}")
        if int(hidden) < 1:
            raise ValueError(f"LeNet hidden width must be >= 1, got {hidden}")
        w1, w2 = (int(w) for w in widths)
        self.body = nn.Sequential(
            *_conv_stage(in_channels, w1),
            *_conv_stage(w1, w2),
            nn.AdaptiveAvgPool2d(POOLED_SIDE),
            nn.Flatten(),
        )
        self.fc = nn.Sequential(nn.Linear(w2 * POOLED_SIDE * POOLED_SIDE, int(hidden)), nn.ReLU(inplace=True))
        self.feature_dim = int(hidden)
        self.classifier = nn.Linear(int(hidden), num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, feature_dim): the hidden fully connected layer's output."""
        return self.fc(self.body(x))

    def stage_modules(self) -> list[nn.Module]:
        """The modules whose outputs are the two conv stages' activations (after ReLU, before
        the pool), at full and 1/2 resolution: the attention-transfer points."""
        return [m for m in self.body if isinstance(m, nn.ReLU)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
