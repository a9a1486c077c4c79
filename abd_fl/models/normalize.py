"""Input normalisation as the first layer of every model, and the wrapper that applies it."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; ``mean`` and ``std`` are buffers of shape (1, C, 1, 1)."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std) or len(mean) == 0:
            raise ValueError(f"mean and std need the same non-zero length, got {len(mean)} and {len(std)}")
        if any(float(s) <= 0 for s in std):
            raise ValueError(f"std values must be > 0, got {tuple(float(s) for s in std)}")
        self.register_buffer("mean", torch.tensor([float(m) for m in mean], dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor([float(s) for s in std], dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


class ClassifierWithNormalization(nn.Module):
    """A classifier taking pixel-space input: ``forward(x) = net(normalize(x))``.

    ``features``, ``classifier`` and ``feature_dim`` delegate to ``net`` (features are computed
    on the normalised input as well). The feature / head split is exact for every model of
    the registry: ``forward(x) == head(features(x))`` (``head`` is ``classifier``, the final
    Linear; FedGen generates in the space of ``features``).
    """

    def __init__(self, normalize: Normalize, net: nn.Module) -> None:
        super().__init__()
        self.normalize = normalize
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, feature_dim) of pixel-space input ``x``."""
        return self.net.features(self.normalize(x))

    def stage_modules(self) -> list[nn.Module]:
        """Modules of ``net`` whose outputs are its stage activations, shallow to deep
        (attention transfer records them with forward hooks)."""
        return list(self.net.stage_modules())

    @property
    def classifier(self) -> nn.Linear:
        """The final linear layer of ``net``."""
        return self.net.classifier

    @property
    def head(self) -> nn.Linear:
        """The classifier head (the final Linear, ``classifier``): ``forward(x) == head(features(x))``."""
        return self.net.classifier

    @property
    def feature_dim(self) -> int:
        """Width of the penultimate features."""
        return int(self.net.feature_dim)
