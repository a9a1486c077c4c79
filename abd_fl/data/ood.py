"""Out-of-distribution source images that ship with scikit-learn (no download needed)."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_sample_images


def load_ood_source_images() -> torch.Tensor:
    """Return scikit-learn's two sample photos (china, flower) as float32 (2, 3, H, W) in [0, 1]."""
    photos = np.stack(load_sample_images().images)  # (2, H, W, 3) uint8
    return torch.from_numpy(photos).permute(0, 3, 1, 2).float().div_(255.0).contiguous()
