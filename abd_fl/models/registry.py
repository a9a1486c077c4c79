"""Model names and :func:`build_model`, which puts input normalisation in front of each network."""

from __future__ import annotations

from typing import Callable, Sequence

from torch import nn

from .cnn import DigitsCNN
from .lenet import LeNet
from .normalize import ClassifierWithNormalization, Normalize
from .resnet import ResNet18
from .wrn import WideResNet

_BUILDERS: dict[str, Callable[[int, int], nn.Module]] = {
    "cnn_small": lambda k, c: DigitsCNN(k, c, widths=(16, 32, 32)),
    "cnn": lambda k, c: DigitsCNN(k, c, widths=(32, 64, 64)),
    "wrn16_1": lambda k, c: WideResNet(16, 1, k, c),
    "wrn16_2": lambda k, c: WideResNet(16, 2, k, c),
    "wrn40_2": lambda k, c: WideResNet(40, 2, k, c),
    "resnet18": lambda k, c: ResNet18(k, c),
    "lenet_small": lambda k, c: LeNet(k, c, widths=(8, 16), hidden=64),
    "lenet": lambda k, c: LeNet(k, c, widths=(16, 32), hidden=128),
}

MODEL_NAMES = tuple(_BUILDERS)


def build_model(
    name: str, num_classes: int, in_channels: int, mean: Sequence[float], std: Sequence[float]
) -> ClassifierWithNormalization:
    """Build architecture ``name`` for pixel-space input in [0, 1], normalised by ``mean``/``std``.

    The result's ``forward`` returns logits; ``features(x)`` gives the penultimate features,
    ``classifier`` (alias ``head``) the final Linear and ``feature_dim`` its input width, with
    ``forward(x) == head(features(x))`` exactly. A new architecture must offer ``features(x)``,
    ``classifier`` and ``feature_dim`` (tests/test_fedgen.py checks every registered name), and
    ``stage_modules()``: the modules whose outputs are its stage activations, shallow to deep
    (attention transfer; tests/test_attention.py checks every registered name).
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model '{name}'; choose one of: {', '.join(MODEL_NAMES)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(
            f"mean and std need one value per input channel ({in_channels}), got {len(mean)} and {len(std)}"
        )
    return ClassifierWithNormalization(Normalize(mean, std), _BUILDERS[name](int(num_classes), int(in_channels)))
