"""Tests for abd_fl.models: every architecture, normalisation in front, registry errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from abd_fl.models import MODEL_NAMES, Normalize, build_model


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_model_names() -> None:
    assert MODEL_NAMES == ("cnn_small", "cnn", "wrn16_1", "wrn16_2", "wrn40_2", "resnet18", "lenet_small", "lenet")


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize(("channels", "size"), [(1, 8), (3, 32)])
def test_model_runs_and_exposes_features(name: str, channels: int, size: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, in_channels=channels, mean=[0.5] * channels, std=[0.25] * channels)
    x = torch.rand(2, channels, size, size)
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 10)
        features = model.features(x)
        assert features.shape == (2, model.feature_dim)
        assert isinstance(model.classifier, nn.Linear)
        assert model.classifier.in_features == model.feature_dim and model.classifier.out_features == 10
        assert torch.allclose(model.classifier(features), model(x), atol=1e-5)
    assert model.net.feature_dim == model.feature_dim and model.net.classifier is model.classifier


@pytest.mark.parametrize("name", ["cnn_small", "wrn16_1"])
def test_model_trains_end_to_end(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, in_channels=1, mean=[0.3], std=[0.4]).train()
    loss = nn.functional.cross_entropy(model(torch.rand(4, 1, 8, 8)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.normalize.mean.grad is None  # statistics are buffers, not parameters


def test_parameter_counts() -> None:
    assert 40_000 <= _n_params(build_model("cnn", 10, 1, [0.3], [0.4])) <= 70_000
    assert 8_000 <= _n_params(build_model("cnn_small", 10, 1, [0.3], [0.4])) <= 20_000
    assert 150_000 <= _n_params(build_model("wrn16_1", 10, 3, [0.5] * 3, [0.2] * 3)) <= 200_000
    assert 2_000_000 <= _n_params(build_model("wrn40_2", 10, 3, [0.5] * 3, [0.2] * 3)) <= 2_500_000
    assert 11_000_000 <= _n_params(build_model("resnet18", 10, 3, [0.5] * 3, [0.2] * 3)) <= 11_500_000


@pytest.mark.parametrize("name", ["cnn", "wrn16_1"])
def test_normalization_is_applied_first(name: str) -> None:
    mean, std = [0.2, 0.4, 0.6], [0.1, 0.2, 0.3]
    model = build_model(name, 10, 3, mean, std).eval()
    assert isinstance(model.normalize, Normalize)
    assert model.normalize.mean.shape == (1, 3, 1, 1) and model.normalize.std.shape == (1, 3, 1, 1)
    at_mean = torch.tensor(mean).view(1, 3, 1, 1).expand(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(model(at_mean), model.net(torch.zeros(2, 3, 8, 8)), atol=1e-6)
        x = torch.rand(2, 3, 8, 8)
        expected = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        assert torch.allclose(model.normalize(x), expected, atol=1e-6)
    buffers = dict(model.named_buffers())
    assert "normalize.mean" in buffers and "normalize.std" in buffers  # saved with the state dict


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_layers_are_plain_conv_and_batchnorm(name: str) -> None:
    model = build_model(name, 10, 3, [0.5] * 3, [0.2] * 3)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) >= 2 and len(bns) >= 2  # the lenet pair has two conv stages, every other model 3 or more
    assert all(type(m) is nn.Conv2d for m in convs) and all(type(m) is nn.BatchNorm2d for m in bns)
    assert convs[0].in_channels == 3  # the stem comes first in registration order


def test_wrn_depths() -> None:
    def conv3x3(name: str) -> int:
        model = build_model(name, 10, 3, [0.5] * 3, [0.2] * 3)
        return sum(1 for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3))

    # stem + 3 groups x n blocks x 2 convs, with depth = 6n + 4
    assert conv3x3("wrn16_1") == 13 and conv3x3("wrn16_2") == 13 and conv3x3("wrn40_2") == 37


def test_unknown_model_name() -> None:
    with pytest.raises(ValueError, match="unknown model 'vgg'; choose one of: cnn_small, cnn, wrn16_1"):
        build_model("vgg", 10, 3, [0.5] * 3, [0.2] * 3)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"num_classes": 0}, "num_classes must be >= 1, got 0"),
        ({"in_channels": 0, "mean": [], "std": []}, "in_channels must be >= 1, got 0"),
        ({"mean": [0.5]}, "one value per input channel \\(3\\), got 1 and 3"),
        ({"std": [0.2, 0.2]}, "got 3 and 2"),
        ({"std": [0.2, 0.0, 0.2]}, "std values must be > 0"),
    ],
)
def test_build_model_bad_arguments(kwargs: dict, pattern: str) -> None:
    arguments = {"name": "cnn", "num_classes": 10, "in_channels": 3, "mean": [0.5] * 3, "std": [0.2] * 3, **kwargs}
    with pytest.raises(ValueError, match=pattern):
        build_model(**arguments)
