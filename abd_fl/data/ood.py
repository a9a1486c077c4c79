"""Out-of-distribution source images: scikit-learn's embedded photos (no download needed)
or one image file of the user's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_sample_images

OOD_SOURCE_NAMES = ("china", "flower")
"""The embedded photos, in the order :func:`load_ood_source_images` returns them."""


def load_ood_source_images() -> torch.Tensor:
    """Return scikit-learn's two sample photos (china, flower) as float32 (2, 3, H, W) in [0, 1]."""
    photos = np.stack(load_sample_images().images)  # (2, H, W, 3) uint8
    return torch.from_numpy(photos).permute(0, 3, 1, 2).float().div_(255.0).contiguous()


def load_ood_image(name: str = "china", path: str | Path | None = None) -> torch.Tensor:
    """One source image as float32 (3, H, W) in [0, 1]: the file at ``path`` (any format PIL
    reads, converted to RGB) if given, else the embedded photo ``name``.

    Raises ``ValueError`` with one line naming the file when it is missing or unreadable.
    """
    if path is None or str(path) == "":
        if name not in OOD_SOURCE_NAMES:
            raise ValueError(f"unknown OOD source image '{name}'; choose one of: {', '.join(OOD_SOURCE_NAMES)} (or set an image_path)")
        return load_ood_source_images()[OOD_SOURCE_NAMES.index(name)]
    from PIL import Image, UnidentifiedImageError

    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"OOD image '{file}' does not exist or is not a file")
    try:
        with Image.open(file) as img:
            rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as err:
        reason = " ".join(str(err).split())
        raise ValueError(f"cannot read OOD image '{file}' as an image: {reason}") from None
    if rgb.ndim != 3 or min(rgb.shape[:2]) < 1:
        raise ValueError(f"OOD image '{file}' holds an empty image of shape {rgb.shape}")
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).float().div_(255.0).contiguous()
