"""Tests for abd_fl.data: digits, local datasets in their real on-disk formats, partitions, OOD images."""

from __future__ import annotations

import csv
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from abd_fl.data import (
    DATASET_NAMES,
    DatasetBundle,
    DatasetNotFoundError,
    load_dataset,
    load_ood_source_images,
    partition_indices,
)

LOCAL_NAMES = ("cifar10", "mnist", "fashionmnist", "svhn", "gtsrb")
N_TRAIN, N_TEST = 12, 6


def _assert_pixels(bundle: DatasetBundle) -> None:
    for split in (bundle.train, bundle.test):
        assert split.images.dtype == torch.float32
        assert split.labels.dtype == torch.int64
        assert float(split.images.min()) >= 0.0 and float(split.images.max()) <= 1.0
    assert len(bundle.mean) == len(bundle.std) == bundle.in_channels
    assert all(s > 0 for s in bundle.std)


# ----------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits() -> DatasetBundle:
    return load_dataset("digits")


def test_digits_shapes_and_range(digits: DatasetBundle) -> None:
    assert digits.name == "digits" and digits.num_classes == 10
    assert len(digits.train) == 1297 and len(digits.test) == 500
    assert digits.train.shape == (1, 8, 8) and digits.image_size == 8 and digits.in_channels == 1
    _assert_pixels(digits)
    assert float(digits.train.images.max()) == 1.0  # 16 / 16
    expected_mean = float(digits.train.images.mean())
    assert digits.mean[0] == pytest.approx(expected_mean, rel=1e-5)
    assert digits.std[0] == pytest.approx(float(digits.train.images.std(unbiased=False)), rel=1e-4)


def test_digits_upsampled() -> None:
    bundle = load_dataset("digits", image_size=16)
    assert bundle.train.shape == (1, 16, 16) and len(bundle.train) == 1297
    _assert_pixels(bundle)


def test_digits_split_is_deterministic_and_stratified(digits: DatasetBundle) -> None:
    again = load_dataset("digits", seed=0)
    assert torch.equal(again.train.labels, digits.train.labels)
    assert torch.equal(again.test.images, digits.test.images)
    other = load_dataset("digits", seed=1)
    assert not torch.equal(other.test.images, digits.test.images)
    test_counts = torch.bincount(digits.test.labels, minlength=10)
    assert (test_counts >= 45).all()  # stratified: ~50 per class


@pytest.mark.parametrize("size", [7, 12, 40, 0])
def test_digits_bad_image_size(size: int) -> None:
    with pytest.raises(ValueError, match=rf"image_size {size}.*8, 16, 24, 32"):
        load_dataset("digits", image_size=size)


def test_unknown_dataset_name() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'foo'; choose one of: digits, mnist5k, cifar10"):
        load_dataset("foo")


def test_local_dataset_needs_root() -> None:
    with pytest.raises(ValueError, match="cifar10"):
        load_dataset("cifar10", root=None)


# ----------------------------------------------------------------------------- real-format writers


def _pattern(n: int, channels: int, height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, channels, height, width), dtype=np.uint8)


def _labels(n: int, num_classes: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, num_classes, size=n).astype(np.int64)


def write_cifar10(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """cifar-10-batches-py/: data_batch_1..5, test_batch (pickled dicts) and batches.meta."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train = (_pattern(N_TRAIN, 3, 32, 32, 1), _labels(N_TRAIN, 10, 2))
    test = (_pattern(N_TEST, 3, 32, 32, 3), _labels(N_TEST, 10, 4))
    for i, rows in enumerate(np.array_split(np.arange(N_TRAIN), 5), start=1):
        entry = {
            "batch_label": f"training batch {i} of 5",
            "labels": train[1][rows].tolist(),
            "data": train[0][rows].reshape(len(rows), -1),
            "filenames": [f"img_{r}.png" for r in rows],
        }
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(entry, protocol=2))
    entry = {"batch_label": "testing batch 1 of 1", "labels": test[1].tolist(), "data": test[0].reshape(N_TEST, -1)}
    (folder / "test_batch").write_bytes(pickle.dumps(entry, protocol=2))
    meta = {"num_cases_per_batch": 10000, "label_names": [f"class{i}" for i in range(10)], "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return {"train": train, "test": test}


def _write_idx(path: Path, array: np.ndarray) -> None:
    magic = 0x0800 | array.ndim  # unsigned byte data
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _write_mnist_like(root: Path, folder_name: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    raw = root / folder_name / "raw"
    raw.mkdir(parents=True)
    data = {
        "train": (_pattern(N_TRAIN, 1, 28, 28, 5), _labels(N_TRAIN, 10, 6)),
        "test": (_pattern(N_TEST, 1, 28, 28, 7), _labels(N_TEST, 10, 8)),
    }
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = data[split]
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images[:, 0])
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return data


def write_mnist(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return _write_mnist_like(root, "MNIST")


def write_fashionmnist(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return _write_mnist_like(root, "FashionMNIST")


def write_svhn(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """train_32x32.mat / test_32x32.mat: X (32, 32, 3, N) uint8, y (N, 1) uint8 in 1..10 (10 = digit 0)."""
    import scipy.io

    data = {
        "train": (_pattern(N_TRAIN, 3, 32, 32, 9), _labels(N_TRAIN, 10, 10)),
        "test": (_pattern(N_TEST, 3, 32, 32, 11), _labels(N_TEST, 10, 12)),
    }
    data["train"][1][:2] = 0  # make sure the 10 -> 0 mapping is exercised
    for split, (images, labels) in data.items():
        stored = np.where(labels == 0, 10, labels).astype(np.uint8).reshape(-1, 1)
        scipy.io.savemat(str(root / f"{split}_32x32.mat"), {"X": images.transpose(2, 3, 1, 0), "y": stored})
    return data


def write_gtsrb(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """gtsrb/GTSRB/Training/000NN/*.ppm (+ GT csv), gtsrb/GTSRB/Final_Test/Images/*.ppm, gtsrb/GT-final_test.csv."""
    rng = np.random.default_rng(13)
    base = root / "gtsrb"
    train_labels = np.arange(N_TRAIN) % 3  # class folders 00000..00002
    for i, label in enumerate(train_labels):
        folder = base / "GTSRB" / "Training" / f"{label:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        size = (int(rng.integers(20, 50)), int(rng.integers(20, 50)))
        pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{label:05d}_{i:05d}.ppm")
    header = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"
    (base / "GTSRB" / "Training" / "00000" / "GT-00000.csv").write_text(header)  # must be ignored
    test_dir = base / "GTSRB" / "Final_Test" / "Images"
    test_dir.mkdir(parents=True)
    test_labels = np.array([0, 42, 7, 3, 42, 1])
    with open(base / "GT-final_test.csv", "w", newline="") as handle:
        writer = csv.writer(handle, delimiter=";")
        writer.writerow(["Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId"])
        for i, label in enumerate(test_labels):
            name = f"{i:05d}.ppm"
            Image.fromarray(rng.integers(0, 256, size=(31 + i, 29, 3), dtype=np.uint8)).save(test_dir / name)
            writer.writerow([name, 29, 31 + i, 5, 5, 24, 26 + i, int(label)])
    return {"train": (None, train_labels), "test": (None, test_labels)}


WRITERS = {
    "cifar10": write_cifar10,
    "mnist": write_mnist,
    "fashionmnist": write_fashionmnist,
    "svhn": write_svhn,
    "gtsrb": write_gtsrb,
}
EXPECTED_SHAPE = {
    "cifar10": (3, 32, 32),
    "mnist": (1, 28, 28),
    "fashionmnist": (1, 28, 28),
    "svhn": (3, 32, 32),
    "gtsrb": (3, 32, 32),
}


# ----------------------------------------------------------------------------- local datasets


def test_dataset_names() -> None:
    assert DATASET_NAMES == ("digits", "mnist5k") + LOCAL_NAMES


@pytest.mark.parametrize("name", LOCAL_NAMES)
def test_local_dataset_loads_real_format(name: str, tmp_path: Path) -> None:
    written = WRITERS[name](tmp_path)
    bundle = load_dataset(name, root=str(tmp_path))
    assert bundle.name == name
    assert bundle.num_classes == (43 if name == "gtsrb" else 10)
    assert len(bundle.train) == N_TRAIN and len(bundle.test) == N_TEST
    assert bundle.train.shape == EXPECTED_SHAPE[name] and bundle.test.shape == EXPECTED_SHAPE[name]
    _assert_pixels(bundle)
    for split in ("train", "test"):
        images, labels = written[split]
        data = getattr(bundle, split)
        if name == "gtsrb":
            assert sorted(data.labels.tolist()) == sorted(labels.tolist())
        else:
            assert data.labels.tolist() == labels.tolist()
            assert torch.allclose(data.images, torch.from_numpy(images).float() / 255.0)
    mean = bundle.train.images.mean(dim=(0, 2, 3))
    assert torch.allclose(torch.tensor(bundle.mean, dtype=torch.float32), mean, atol=1e-5)


@pytest.mark.parametrize("name", ["mnist", "gtsrb", "cifar10"])
def test_local_dataset_resized(name: str, tmp_path: Path) -> None:
    WRITERS[name](tmp_path)
    bundle = load_dataset(name, root=str(tmp_path), image_size=16)
    assert bundle.image_size == 16 and bundle.test.shape[1:] == (16, 16)
    _assert_pixels(bundle)


@pytest.mark.parametrize("name", ["cifar10", "svhn"])
def test_own_readers_match_torchvision(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Our CIFAR-10/SVHN readers exist only because torchvision MD5-checks those files.

    Cross-check: with torchvision's MD5 check switched off (in this test only), it parses the
    same tiny files to the same pixels and labels.
    """
    from torchvision.datasets import CIFAR10, SVHN

    WRITERS[name](tmp_path)
    bundle = load_dataset(name, root=str(tmp_path))
    cls = CIFAR10 if name == "cifar10" else SVHN
    monkeypatch.setattr(cls, "_check_integrity", lambda self: True)
    if name == "cifar10":
        monkeypatch.setattr(cls, "_load_meta", lambda self: None)
        reference = {"train": cls(str(tmp_path), train=True), "test": cls(str(tmp_path), train=False)}
        as_nchw = {k: (np.asarray(v.data).transpose(0, 3, 1, 2), v.targets) for k, v in reference.items()}
    else:
        reference = {k: cls(str(tmp_path), split=k) for k in ("train", "test")}
        as_nchw = {k: (v.data, v.labels) for k, v in reference.items()}
    for split, (images, labels) in as_nchw.items():
        data = getattr(bundle, split)
        assert torch.equal(data.images, torch.from_numpy(np.ascontiguousarray(images)).float() / 255.0)
        assert data.labels.tolist() == list(np.asarray(labels).tolist())


@pytest.mark.parametrize("name", LOCAL_NAMES)
def test_missing_root_folder(name: str, tmp_path: Path) -> None:
    missing = tmp_path / "no_such_folder"
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset(name, root=str(missing))
    message = str(info.value)
    assert "\n" not in message
    assert f"dataset '{name}' not found under '{missing}'" in message
    assert "downloads are disabled" in message
    assert isinstance(info.value, FileNotFoundError)


@pytest.mark.parametrize("name", LOCAL_NAMES)
def test_empty_root_folder(name: str, tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset(name, root=str(tmp_path))
    message = str(info.value)
    assert "\n" not in message and str(tmp_path) in message


def test_cifar10_missing_batch_is_named(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetNotFoundError, match="data_batch_3"):
        load_dataset("cifar10", root=str(tmp_path))


def test_gtsrb_missing_test_csv(tmp_path: Path) -> None:
    write_gtsrb(tmp_path)
    (tmp_path / "gtsrb" / "GT-final_test.csv").unlink()
    with pytest.raises(DatasetNotFoundError, match="GT-final_test.csv"):
        load_dataset("gtsrb", root=str(tmp_path))


def test_gtsrb_class_folders_must_be_contiguous(tmp_path: Path) -> None:
    write_gtsrb(tmp_path)
    training = tmp_path / "gtsrb" / "GTSRB" / "Training"
    (training / "00001").rename(training / "00005")
    with pytest.raises(ValueError, match="found '00002' at position 1"):
        load_dataset("gtsrb", root=str(tmp_path))


def test_corrupt_cifar_batch(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="test_batch.*not a CIFAR-10"):
        load_dataset("cifar10", root=str(tmp_path))


# ----------------------------------------------------------------------------- partitions


def _assert_disjoint_cover(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert joined.dtype == np.int64
    assert len(joined) == n and np.array_equal(np.sort(joined), np.arange(n))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partitions_disjoint_cover_deterministic(scheme: str, digits: DatasetBundle) -> None:
    labels = digits.train.labels
    parts = partition_indices(labels, 8, scheme=scheme, alpha=0.5, seed=3)
    assert len(parts) == 8
    _assert_disjoint_cover(parts, len(labels))
    again = partition_indices(labels.numpy(), 8, scheme=scheme, alpha=0.5, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = partition_indices(labels, 8, scheme=scheme, alpha=0.5, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))
    assert min(len(p) for p in parts) >= 10


def test_iid_partitions_are_balanced_and_mixed(digits: DatasetBundle) -> None:
    labels = digits.train.labels.numpy()
    parts = partition_indices(labels, 10, scheme="iid")
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert all(len(np.unique(labels[p])) == 10 for p in parts)  # shuffled, not contiguous label blocks


def test_dirichlet_small_alpha_is_skewed(digits: DatasetBundle) -> None:
    labels = digits.train.labels.numpy()
    skewed = partition_indices(labels, 5, scheme="dirichlet", alpha=0.1, seed=0)
    top_share = np.mean([np.bincount(labels[p], minlength=10).max() / len(p) for p in skewed])
    assert top_share > 0.3  # iid would give about 0.1


def test_single_partition() -> None:
    parts = partition_indices([0, 1, 0, 1], 1)
    _assert_disjoint_cover(parts, 4)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"scheme": "shards"}, "unknown partition scheme 'shards'; choose one of: iid, dirichlet"),
        ({"scheme": "dirichlet", "alpha": 0.0}, "alpha must be > 0, got 0.0"),
        ({"scheme": "dirichlet", "alpha": -1.0}, "alpha must be > 0"),
        ({"num_partitions": 0}, r"num_partitions must be an integer between 1 and the number of samples \(40\), got 0"),
        ({"num_partitions": 41}, "got 41"),
        ({"scheme": "dirichlet", "num_partitions": 5, "min_partition_size": 9}, "cannot give 5 partitions at least 9"),
    ],
)
def test_partition_bad_arguments(kwargs: dict, pattern: str) -> None:
    arguments = {"num_partitions": 4, **kwargs}
    with pytest.raises(ValueError, match=pattern):
        partition_indices(np.arange(40) % 4, **arguments)


def test_dirichlet_unsatisfiable_min_size_is_explained() -> None:
    labels = np.repeat(np.arange(2), 20)
    with pytest.raises(ValueError, match="could not give each of 8 partitions at least 5 samples from 40 samples"):
        partition_indices(labels, 8, scheme="dirichlet", alpha=0.01, min_partition_size=5, seed=0)


# ----------------------------------------------------------------------------- OOD source images


def test_ood_source_images() -> None:
    images = load_ood_source_images()
    assert images.dtype == torch.float32 and images.ndim == 4
    assert images.shape[:2] == (2, 3) and images.shape[2] >= 64 and images.shape[3] >= 64
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    assert float(images.std()) > 0.05
