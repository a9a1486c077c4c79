"""Tests for abd_fl.metrics (acc / ASR / ASR floor) and abd_fl.train.train_classifier."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from abd_fl.data.base import ImageData
from abd_fl.metrics import accuracy, backdoor_metrics, predict
from abd_fl.train import train_classifier

NUM_CLASSES = 4


def _coded_data(labels: list[int]) -> ImageData:
    """Images of shape (1, 4, 4) whose pixel [0, 0, 0] encodes the label as label / 10."""
    y = torch.tensor(labels, dtype=torch.long)
    x = torch.full((len(labels), 1, 4, 4), 0.5)
    x[:, 0, 0, 0] = y.float() / 10
    return ImageData(x, y)


class ConstantModel(nn.Module):
    """Always predicts class ``cls``."""

    def __init__(self, cls: int = 0) -> None:
        super().__init__()
        self.cls = cls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(torch.full((x.shape[0],), self.cls), NUM_CLASSES).float()


def oracle(x: torch.Tensor) -> torch.Tensor:
    """A plain callable that reads the label encoded in pixel [0, 0, 0]."""
    y = torch.round(x[:, 0, 0, 0] * 10).long()
    return nn.functional.one_hot(y, NUM_CLASSES).float()


LABELS = [0, 0, 1, 2, 3, 1, 2, 3, 0, 1]


def test_constant_model_metrics() -> None:
    clean = _coded_data(LABELS)
    poisoned = _coded_data([1, 2, 3])
    m = backdoor_metrics(ConstantModel(0), clean, poisoned, target_label=0, device="cpu")
    assert m["acc"] == pytest.approx(LABELS.count(0) / len(LABELS))
    assert m["asr"] == 1.0 and m["asr_floor"] == 1.0


def test_oracle_metrics_and_callable_model() -> None:
    clean = _coded_data(LABELS)
    poisoned = ImageData(clean.images[:3].clone(), torch.zeros(3, dtype=torch.long))
    m = backdoor_metrics(oracle, clean, poisoned, target_label=0, device="cpu")
    assert m["acc"] == 1.0 and m["asr_floor"] == 0.0
    assert m["asr"] == pytest.approx(2 / 3)  # first three images are labels 0, 0, 1
    assert accuracy(oracle, clean, "cpu", batch_size=3) == 1.0


def test_empty_sets() -> None:
    clean = _coded_data(LABELS)
    empty = ImageData(torch.zeros(0, 1, 4, 4), torch.zeros(0, dtype=torch.long))
    assert math.isnan(backdoor_metrics(oracle, clean, empty, 0, "cpu")["asr"])
    with pytest.raises(ValueError, match="empty"):
        backdoor_metrics(oracle, empty, clean, 0, "cpu")
    with pytest.raises(ValueError, match="empty"):
        accuracy(oracle, empty, "cpu")


def test_predict_restores_mode_and_batches() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, NUM_CLASSES), nn.Dropout(0.5))
    x = torch.rand(10, 1, 4, 4)
    model.train()
    p1 = predict(model, x, "cpu", batch_size=3)
    assert model.training
    model.eval()
    p2 = predict(model, x, "cpu")
    assert not model.training
    assert p1.dtype == torch.long and torch.equal(p1, p2)  # dropout off in both calls


# --------------------------------------------------------------------------- training


def _separable(n: int = 256, seed: int = 0) -> ImageData:
    """Two-class problem: class 1 has a bright top half, class 0 a bright bottom half."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.rand(n, 1, 4, 4, generator=g) * 0.3
    x[y == 1, :, :2] += 0.6
    x[y == 0, :, 2:] += 0.6
    return ImageData(x.clamp(0, 1), y)


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 2))


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_train_classifier_learns_and_is_deterministic(opt: str) -> None:
    data = _separable()
    lr = 0.1 if opt == "sgd" else 0.01
    m1, m2 = _tiny_model(), _tiny_model()
    r1 = train_classifier(m1, data, epochs=8, lr=lr, batch_size=32, device="cpu", seed=3, optimizer=opt)
    r2 = train_classifier(m2, data, epochs=8, lr=lr, batch_size=32, device="cpu", seed=3, optimizer=opt)
    assert set(r1) == {"loss", "accuracy"} and r1 == r2
    assert r1["accuracy"] > 0.95
    assert not m1.training
    assert accuracy(m1, data, "cpu") > 0.95
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)


def test_train_classifier_seed_changes_result_and_zero_epochs() -> None:
    data = _separable(64)
    m1, m2 = _tiny_model(), _tiny_model()
    train_classifier(m1, data, epochs=1, lr=0.1, batch_size=16, seed=0)
    train_classifier(m2, data, epochs=1, lr=0.1, batch_size=16, seed=1)
    assert not torch.equal(m1[1].weight, m2[1].weight)
    m3 = _tiny_model()
    before = m3[1].weight.clone()
    r = train_classifier(m3, data, epochs=0, lr=0.1)
    assert math.isnan(r["loss"]) and torch.equal(before, m3[1].weight)


def test_train_classifier_batchnorm_single_leftover() -> None:
    data = _separable(33)  # 33 = 2 * 16 + 1: the single leftover sample is merged, BN does not fail
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    train_classifier(model, data, epochs=1, lr=0.05, batch_size=16)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"epochs": -1, "lr": 0.1}, "epochs must be an int >= 0, got -1"),
        ({"epochs": 1, "lr": 0.0}, "lr must be a finite number > 0, got 0.0"),
        ({"epochs": 1, "lr": -1.0}, "lr must be a finite number > 0, got -1.0"),
        ({"epochs": 1, "lr": 0.1, "optimizer": "rmsprop"}, "unknown optimizer 'rmsprop'; choose one of: sgd, adam"),
        ({"epochs": 1, "lr": 0.1, "batch_size": 0}, "batch_size must be >= 1, got 0"),
    ],
)
def test_train_classifier_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        train_classifier(_tiny_model(), _separable(16), **kwargs)
