"""Small tensor helpers shared by the dataset loaders: resizing and per-channel statistics."""

from __future__ import annotations

import torch
import torch.nn.functional as F

_CHUNK = 4096


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinearly resize (N, C, H, W) images in [0, 1] to ``size`` x ``size`` and clamp to [0, 1].

    Returns ``images`` unchanged when it already has that size. Anti-aliasing is used when
    shrinking. Works in chunks so that large sets (e.g. CIFAR-10) need little extra memory.
    """
    if size < 1:
        raise ValueError(f"image size must be >= 1, got {size}")
    height, width = images.shape[-2:]
    if height == size and width == size:
        return images
    shrink = size < height or size < width
    out = torch.empty(images.shape[0], images.shape[1], size, size, dtype=torch.float32)
    for start in range(0, images.shape[0], _CHUNK):
        chunk = images[start : start + _CHUNK].float()
        resized = F.interpolate(chunk, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
        out[start : start + _CHUNK] = resized.clamp_(0.0, 1.0)
    return out


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) standard deviation of (N, C, H, W) images.

    Accumulates in float64, chunk by chunk, so the result is exact enough for large sets.
    """
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"need a non-empty (N, C, H, W) tensor, got shape {tuple(images.shape)}")
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    for start in range(0, images.shape[0], _CHUNK):
        chunk = images[start : start + _CHUNK].to(torch.float64)
        total += chunk.sum(dim=(0, 2, 3))
        total_sq += chunk.pow(2).sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    var = (total_sq / count - mean.pow(2)).clamp_min(0.0)
    std = var.sqrt().clamp_min(1e-6)  # a constant channel must not divide by zero later
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)
