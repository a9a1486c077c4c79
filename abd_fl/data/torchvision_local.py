"""Image datasets read from local files in torchvision's on-disk layout (never downloaded).

Supported names and the files expected under ``root``:

* ``cifar10``      ``root/cifar-10-batches-py/data_batch_1..5`` and ``test_batch`` (python pickles)
* ``mnist``        ``root/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``
* ``fashionmnist`` ``root/FashionMNIST/raw/`` with the same four file names
* ``svhn``         ``root/train_32x32.mat`` and ``root/test_32x32.mat``
* ``gtsrb``        ``root/gtsrb/GTSRB/Training/000NN/*.ppm``, ``root/gtsrb/GTSRB/Final_Test/Images/*.ppm``
                   and ``root/gtsrb/GT-final_test.csv``

MNIST, FashionMNIST and GTSRB are read through torchvision (``download=False``).
CIFAR-10 and SVHN are read by the small readers below instead: torchvision's ``CIFAR10`` and
``SVHN`` refuse to load unless every file's MD5 equals the official archive's hash, so they can
only open the byte-identical official files. The readers parse exactly the same files the same
way (CIFAR-10: pickled dicts with ``data`` (N, 3072) uint8 and ``labels``; SVHN: ``.mat`` with
``X`` (32, 32, 3, N) uint8 and ``y`` (N, 1), label 10 meaning digit 0) but skip the MD5 check,
which keeps them testable with tiny files in the real format. Like torchvision, the CIFAR-10
reader unpickles its files, so only point ``root`` at data you trust.
"""

from __future__ import annotations

import pickle
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image

from .base import DatasetBundle, ImageData
from .errors import DatasetNotFoundError, not_found_message
from .imageops import channel_stats, resize_images

LOCAL_DATASET_NAMES = ("cifar10", "mnist", "fashionmnist", "svhn", "gtsrb")

GTSRB_DEFAULT_SIZE = 32
"""GTSRB images come in many sizes; every image is resized to this unless ``image_size`` is given."""

_NUM_CLASSES = {"cifar10": 10, "mnist": 10, "fashionmnist": 10, "svhn": 10, "gtsrb": 43}

# (name, root, target size or None) -> (train, test)
_Reader = Callable[[str, Path, int | None], tuple[ImageData, ImageData]]


def load_local_bundle(name: str, root: str, image_size: int | None = None) -> DatasetBundle:
    """Load ``name`` from ``root`` as a :class:`DatasetBundle` with pixels in [0, 1].

    ``image_size`` resizes every image (bilinear) to ``image_size`` x ``image_size``; ``None``
    keeps the native size (GTSRB: 32). mean/std are per channel on the train split.
    Raises :class:`DatasetNotFoundError` (one line) when the files are not under ``root``.
    """
    if name not in _READERS:
        raise ValueError(f"unknown local dataset '{name}'; choose one of: {', '.join(LOCAL_DATASET_NAMES)}")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image_size must be a positive integer or None, got {image_size!r}")
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise DatasetNotFoundError(not_found_message(name, str(root_path), _example_path(name, root_path)))
    train, test = _READERS[name](name, root_path, image_size)
    mean, std = channel_stats(train.images)
    return DatasetBundle(name=name, train=train, test=test, num_classes=_NUM_CLASSES[name], mean=mean, std=std)


def _example_path(name: str, root: Path) -> str:
    """The first file or folder of the torchvision layout for ``name``, shown in errors."""
    examples = {
        "cifar10": root / "cifar-10-batches-py",
        "mnist": root / "MNIST" / "raw" / "train-images-idx3-ubyte",
        "fashionmnist": root / "FashionMNIST" / "raw" / "train-images-idx3-ubyte",
        "svhn": root / "train_32x32.mat",
        "gtsrb": root / "gtsrb" / "GTSRB" / "Training",
    }
    return str(examples[name])


@contextmanager
def _missing_files_raise(name: str, root: Path, expected: Path | str) -> Iterator[None]:
    """Turn torchvision's "Dataset not found" errors (and missing files) into DatasetNotFoundError."""
    try:
        yield
    except DatasetNotFoundError:
        raise
    except FileNotFoundError as err:
        raise DatasetNotFoundError(not_found_message(name, str(root), str(expected))) from err
    except RuntimeError as err:
        if "not found" not in str(err).lower():
            raise
        raise DatasetNotFoundError(not_found_message(name, str(root), str(expected))) from err


def _require_file(name: str, root: Path, path: Path) -> None:
    if not path.is_file():
        raise DatasetNotFoundError(not_found_message(name, str(root), str(path)))


def _to_image_data(
    images_uint8: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, size: int | None
) -> ImageData:
    """uint8 (N, C, H, W) images and integer labels -> ImageData in [0, 1], optionally resized."""
    images = torch.as_tensor(images_uint8).float().div_(255.0)
    if size is not None:
        images = resize_images(images, size)
    return ImageData(images.contiguous(), torch.as_tensor(labels).long().reshape(-1).contiguous())


# ---------------------------------------------------------------- CIFAR-10 (own reader)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch file -> uint8 (N, 3, 32, 32) images and int64 labels."""
    try:
        with open(path, "rb") as handle:
            entry = pickle.load(handle, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
        raise ValueError(f"'{path}' is not a CIFAR-10 python batch file ({err})") from err
    data = entry.get("data") if isinstance(entry, dict) else None
    labels = entry.get("labels") if isinstance(entry, dict) else None
    if data is None or labels is None:
        raise ValueError(f"'{path}' is not a CIFAR-10 python batch file (needs keys 'data' and 'labels')")
    data = np.asarray(data, dtype=np.uint8)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
        raise ValueError(
            f"'{path}' is not a CIFAR-10 python batch file (data {data.shape} must be (N, 3072) "
            f"with one label per row, got {labels.shape[0]} labels)"
        )
    return data.reshape(-1, 3, 32, 32), labels


def _read_cifar10(name: str, root: Path, size: int | None) -> tuple[ImageData, ImageData]:
    folder = root / "cifar-10-batches-py"
    splits = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    result = []
    for files in splits.values():
        for file in files:
            _require_file(name, root, folder / file)
        parts = [_read_cifar_batch(folder / file) for file in files]
        images = np.concatenate([part[0] for part in parts])
        labels = np.concatenate([part[1] for part in parts])
        result.append(_to_image_data(images, labels, size))
    return result[0], result[1]


# ---------------------------------------------------------------- SVHN (own reader)


def _read_svhn_split(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One SVHN ``*_32x32.mat`` file -> uint8 (N, 3, 32, 32) images and labels in 0..9."""
    import scipy.io  # imported lazily: only SVHN needs scipy's .mat reader

    try:
        mat = scipy.io.loadmat(str(path))
    except (ValueError, TypeError, OSError) as err:
        raise ValueError(f"'{path}' is not an SVHN .mat file ({err})") from err
    if "X" not in mat or "y" not in mat:
        raise ValueError(f"'{path}' is not an SVHN .mat file (needs variables 'X' and 'y')")
    images = np.asarray(mat["X"], dtype=np.uint8)
    labels = np.asarray(mat["y"]).astype(np.int64).reshape(-1)
    if images.ndim != 4 or images.shape[2] != 3 or images.shape[3] != labels.shape[0]:
        raise ValueError(f"'{path}' is not an SVHN .mat file (X {images.shape} must be (H, W, 3, N) with N labels)")
    labels[labels == 10] = 0  # SVHN stores digit 0 as label 10
    return np.ascontiguousarray(images.transpose(3, 2, 0, 1)), labels


def _read_svhn(name: str, root: Path, size: int | None) -> tuple[ImageData, ImageData]:
    result = []
    for split in ("train", "test"):
        path = root / f"{split}_32x32.mat"
        _require_file(name, root, path)
        images, labels = _read_svhn_split(path)
        result.append(_to_image_data(images, labels, size))
    return result[0], result[1]


# ---------------------------------------------------------------- MNIST / FashionMNIST (torchvision)


def _read_mnist_like(name: str, root: Path, size: int | None) -> tuple[ImageData, ImageData]:
    from torchvision.datasets import MNIST, FashionMNIST

    cls = MNIST if name == "mnist" else FashionMNIST
    result = []
    for train, prefix in ((True, "train"), (False, "t10k")):
        expected = root / cls.__name__ / "raw" / f"{prefix}-images-idx3-ubyte"
        with _missing_files_raise(name, root, expected):
            ds = cls(str(root), train=train, download=False)
        result.append(_to_image_data(ds.data.unsqueeze(1), ds.targets, size))
    return result[0], result[1]


# ---------------------------------------------------------------- GTSRB (torchvision)


def _pil_to_hwc(image: Image.Image, size: int) -> np.ndarray:
    """RGB PIL image -> uint8 (size, size, 3) array (bilinear resize)."""
    return np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.uint8)


def _check_gtsrb_class_folders(root: Path) -> None:
    """torchvision numbers GTSRB classes by sorted folder name; require 00000, 00001, ... so index == ClassId."""
    training = root / "gtsrb" / "GTSRB" / "Training"
    if not training.is_dir():
        return  # torchvision reports the missing folder
    names = sorted(p.name for p in training.iterdir() if p.is_dir())
    for index, folder in enumerate(names):
        if folder != f"{index:05d}":
            raise ValueError(
                f"GTSRB class folders under '{training}' must be named 00000, 00001, ... without gaps "
                f"(folder index = ClassId); found '{folder}' at position {index}"
            )


def _read_gtsrb(name: str, root: Path, size: int | None) -> tuple[ImageData, ImageData]:
    from torchvision.datasets import GTSRB

    size = GTSRB_DEFAULT_SIZE if size is None else size
    _check_gtsrb_class_folders(root)
    base = root / "gtsrb"
    expected = {"train": base / "GTSRB" / "Training", "test": base / "GTSRB" / "Final_Test" / "Images"}
    result = []
    for split in ("train", "test"):
        if split == "test" and (base / "GTSRB" / "Final_Test" / "Images").is_dir():
            _require_file(name, root, base / "GT-final_test.csv")  # the test labels
        with _missing_files_raise(name, root, expected[split]):
            ds = GTSRB(str(root), split=split, download=False, transform=partial(_pil_to_hwc, size=size))
        with _missing_files_raise(name, root, expected[split]):
            samples = [ds[i] for i in range(len(ds))]
        if not samples:
            raise DatasetNotFoundError(not_found_message(name, str(root), str(expected[split])))
        images = np.stack([s[0] for s in samples]).transpose(0, 3, 1, 2)
        labels = np.asarray([s[1] for s in samples], dtype=np.int64)
        if labels.min() < 0 or labels.max() >= _NUM_CLASSES["gtsrb"]:
            raise ValueError(f"GTSRB labels must be in 0..42, got values {labels.min()}..{labels.max()} under '{base}'")
        result.append(_to_image_data(np.ascontiguousarray(images), labels, size))
    return result[0], result[1]


_READERS: dict[str, _Reader] = {
    "cifar10": _read_cifar10,
    "mnist": _read_mnist_like,
    "fashionmnist": _read_mnist_like,
    "svhn": _read_svhn,
    "gtsrb": _read_gtsrb,
}
