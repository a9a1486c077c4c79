"""In-memory image datasets shared by every part of abd-fl.

Images are kept in *pixel space*: float32 tensors of shape ``(N, C, H, W)`` with values
in ``[0, 1]``. Triggers are applied there (before normalisation, as in the paper's
threat model); normalisation is the first layer of every model built by
:func:`abd_fl.models.build_model`, so generators, triggers and the Self-Retrospection
perturbation all live in the same pixel space.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch


@dataclass(frozen=True)
class ImageData:
    """A labelled image set: ``images`` (N, C, H, W) float32 in [0, 1], ``labels`` (N,) int64."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise ValueError(f"images must have shape (N, C, H, W), got {tuple(self.images.shape)}")
        if self.labels.ndim != 1 or self.labels.shape[0] != self.images.shape[0]:
            raise ValueError(
                f"labels must have shape ({self.images.shape[0]},), got {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> "ImageData":
        """Return the samples at ``indices`` (a copy)."""
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return ImageData(self.images[idx].clone(), self.labels[idx].clone())

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)


@dataclass(frozen=True)
class DatasetBundle:
    """A dataset with its train/test split and the per-channel normalisation statistics."""

    name: str
    train: ImageData
    test: ImageData
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def in_channels(self) -> int:
        return self.train.shape[0]

    @property
    def image_size(self) -> int:
        return self.train.shape[1]
