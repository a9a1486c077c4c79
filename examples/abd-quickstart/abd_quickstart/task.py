"""The model, the data and local training of abd-quickstart.

The data is scikit-learn's embedded digits (1797 8x8 grey images; nothing is downloaded)
through abd-fl's helpers: a seeded train/test split (:func:`abd_fl.data.load_dataset`), an
IID partition per SuperNode (Flower Datasets' partitioner, :func:`abd_fl.data.partition_indices`)
and, for an attacker, BadNets poisoning (:mod:`abd_fl.attacks`).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from abd_fl.attacks import build_trigger, make_poisoned_test_set, poison_data
from abd_fl.data import DatasetBundle, ImageData, load_dataset, partition_indices

IMAGE_SHAPE = (1, 8, 8)  # (C, H, W), pixels in [0, 1]
NUM_CLASSES = 10
TRIGGER = "badnets_square"  # a 2x2 white patch
TARGET = 0  # the attackers' target class


class Net(nn.Module):
    """A small CNN for 8x8 grey digits. DataFreeKD needs nothing from it but its state dict
    and logits; ABD's vaccine shuffles the input channels of its last conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(64)
        self.fc = nn.Linear(64, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)  # 4x4
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


@functools.lru_cache(maxsize=2)
def digits(seed: int) -> DatasetBundle:
    """The digits' stratified train (1297) / test (500) split for ``seed``."""
    return load_dataset("digits", seed=seed)


@functools.lru_cache(maxsize=8)
def _partitions(num_partitions: int, seed: int) -> tuple[np.ndarray, ...]:
    return tuple(partition_indices(digits(seed).train.labels, num_partitions, scheme="iid", seed=seed))


def load_partition(partition_id: int, num_partitions: int, seed: int = 0, poison_rate: float = 0.0) -> ImageData:
    """This SuperNode's share of the training images; an attacker (``poison_rate`` > 0) puts
    the trigger on that share of them and relabels them to :data:`TARGET`."""
    data = digits(seed).train.subset(_partitions(num_partitions, seed)[partition_id])
    if poison_rate > 0:
        data, _ = poison_data(data, build_trigger(TRIGGER, IMAGE_SHAPE), poison_rate, TARGET, seed=seed + partition_id)
    return data


def eval_sets(seed: int = 0) -> tuple[ImageData, ImageData]:
    """(clean test images, triggered non-target test images labelled :data:`TARGET`): Acc and ASR."""
    test = digits(seed).test
    return test, make_poisoned_test_set(test, build_trigger(TRIGGER, IMAGE_SHAPE), TARGET)


def train(model: nn.Module, data: ImageData, epochs: int, lr: float, batch_size: int = 32, seed: int = 0) -> float:
    """Plain SGD on ``data``; returns the mean training loss of the last epoch."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    mean_loss = float("nan")
    for _ in range(epochs):
        total, seen = 0.0, 0
        for idx in torch.randperm(len(data), generator=gen).split(batch_size):
            if len(idx) < 2:  # BatchNorm cannot train on one image
                continue
            loss = F.cross_entropy(model(data.images[idx]), data.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, seen = total + loss.item() * len(idx), seen + len(idx)
        mean_loss = total / max(seen, 1)
    return mean_loss
