"""Datasets (pixel space [0, 1]), federated partitioning and out-of-distribution source images."""

from .base import DatasetBundle, ImageData
from .errors import DatasetNotFoundError
from .ood import OOD_SOURCE_NAMES, load_ood_image, load_ood_source_images
from .partition import partition_indices
from .registry import DATASET_NAMES, load_dataset

__all__ = [
    "DATASET_NAMES",
    "DatasetBundle",
    "DatasetNotFoundError",
    "ImageData",
    "load_dataset",
    "OOD_SOURCE_NAMES",
    "load_ood_image",
    "load_ood_source_images",
    "partition_indices",
]
