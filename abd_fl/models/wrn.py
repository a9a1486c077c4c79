"""Wide ResNet (Zagoruyko & Komodakis, 2016), pre-activation variant as used by ZSKT and ABD.

Depth ``6n + 4``: a 3x3 stem conv, three groups of ``n`` BN-ReLU-conv basic blocks with widths
16k, 32k, 64k and strides 1, 2, 2, then BN-ReLU, global average pool and a Linear layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class WideBasicBlock(nn.Module):
    """BN-ReLU-conv3x3(stride)-BN-ReLU-(dropout)-conv3x3 with an identity or 1x1-conv shortcut.

    When the shape changes, the shortcut takes the pre-activated input (as in the original code).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.shortcut: nn.Module | None = None
        if in_channels != out_channels or stride != 1:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv1(pre)
        out = F.relu(self.bn2(out))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        residual = x if self.shortcut is None else self.shortcut(pre)
        return out + residual


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor`` for ``in_channels``-channel images of any size >= 8x8."""

    def __init__(
        self, depth: int, widen_factor: int, num_classes: int, in_channels: int, drop_rate: float = 0.0
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}")
        if widen_factor < 1:
            raise ValueError(f"WRN widen_factor must be >= 1, got {widen_factor}")
        blocks_per_group = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        groups = []
        for group, stride in enumerate((1, 2, 2)):
            out_width = widths[group + 1]
            blocks = [
                WideBasicBlock(widths[group] if i == 0 else out_width, out_width, stride if i == 0 else 1, drop_rate)
                for i in range(blocks_per_group)
            ]
            groups.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = groups
        self.bn = nn.BatchNorm2d(widths[3])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = widths[3]
        self.classifier = nn.Linear(widths[3], num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled penultimate features (N, feature_dim)."""
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn(out))
        return torch.flatten(self.pool(out), 1)

    def stage_modules(self) -> list[nn.Module]:
        """The three groups, whose outputs are the attention-transfer points of ZSKT
        (Micaelli & Storkey, 2019) and of attention transfer (Zagoruyko & Komodakis, 2017)."""
        return [self.block1, self.block2, self.block3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
