"""The scikit-learn ``digits`` set (1797 8x8 grey images, 10 classes): small, offline, fast."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from .base import DatasetBundle, ImageData
from .imageops import channel_stats, resize_images

DIGITS_IMAGE_SIZES = (8, 16, 24, 32)
"""Allowed ``image_size`` values: the native 8 and multiples of 8 up to 32."""


def load_digits_bundle(image_size: int = 8, test_size: int = 500, seed: int = 0) -> DatasetBundle:
    """Load scikit-learn's digits as a :class:`DatasetBundle` (1 channel, pixels in [0, 1]).

    The split is stratified by label (``train_test_split(test_size, random_state=seed)``);
    with the defaults that is 1297 train and 500 test images. ``image_size`` > 8 upsamples
    bilinearly. mean/std are computed on the train split.
    """
    if image_size not in DIGITS_IMAGE_SIZES:
        allowed = ", ".join(str(s) for s in DIGITS_IMAGE_SIZES)
        raise ValueError(f"digits image_size {image_size!r} is not supported; choose one of: {allowed}")
    raw = load_digits()
    images = torch.from_numpy((raw.images / 16.0).astype(np.float32)).unsqueeze(1)  # (N, 1, 8, 8)
    labels = torch.from_numpy(raw.target.astype(np.int64))
    if not 0 < test_size < len(labels):
        raise ValueError(f"digits test_size must be between 1 and {len(labels) - 1}, got {test_size}")
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_size, random_state=seed, stratify=raw.target
    )
    images = resize_images(images, image_size)
    train = ImageData(images[train_idx].contiguous(), labels[train_idx].contiguous())
    test = ImageData(images[test_idx].contiguous(), labels[test_idx].contiguous())
    mean, std = channel_stats(train.images)
    return DatasetBundle(name="digits", train=train, test=test, num_classes=10, mean=mean, std=std)
