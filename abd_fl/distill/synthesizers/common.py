"""Pieces shared by the pool-based synthesizers (DENSE, CMI).

- :class:`BNStatisticsLoss`: forward hooks on every BatchNorm of the teachers. They give
  the DeepInversion BN-statistics loss and, optionally, per-sample features (the channel
  means of every BN input, the features CMI contrasts).
- :class:`ImagePool`: the growing, capped pool of synthesised images the student samples.
"""

from __future__ import annotations

import torch
from torch import nn


class BNStatisticsLoss:
    """Forward hooks on every ``BatchNorm2d`` of the given models (DeepInversion loss).

    After a forward pass, :meth:`value` is the sum over BN layers of
    ``||mean_batch - running_mean||_2 + ||var_batch - running_var||_2``; with
    ``collect_features``, :meth:`features` is the concatenation over BN layers of the
    per-sample channel means of each BN's input, shape (N, sum of channels).

    The hooks record only while :attr:`enabled` is true (synthesizers switch them on for
    their generator steps only, so KD and defense forwards cost nothing and a deep copy of
    a teacher made meanwhile, e.g. a shuffled vaccine model, carries disabled hooks);
    :attr:`stats` switches the statistics term off for a pass that only needs features.
    """

    def __init__(self, models: list[nn.Module], collect_features: bool = False) -> None:
        self.enabled = True
        self.stats = True
        self.collect_features = collect_features
        self._terms: list[torch.Tensor] = []
        self._features: list[torch.Tensor] = []
        self._handles = [
            module.register_forward_hook(self._hook)
            for model in models
            for module in model.modules()
            if isinstance(module, nn.BatchNorm2d) and module.running_mean is not None
        ]
        if not self._handles:
            raise ValueError("the BN-statistics loss needs teachers with BatchNorm2d layers; none found")

    def _hook(self, module: nn.BatchNorm2d, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        if not self.enabled:
            return
        x = inputs[0]
        if self.collect_features:
            self._features.append(x.mean(dim=(2, 3)))
        if self.stats:
            mean = x.mean(dim=(0, 2, 3))
            var = x.permute(1, 0, 2, 3).reshape(x.shape[1], -1).var(dim=1, unbiased=False)
            self._terms.append(
                torch.norm(mean - module.running_mean, 2) + torch.norm(var - module.running_var, 2)
            )

    def reset(self) -> None:
        self._terms = []
        self._features = []

    def value(self) -> torch.Tensor:
        return torch.stack(self._terms).sum() if self._terms else torch.zeros(())

    def features(self) -> torch.Tensor:
        """Per-sample BN-input channel means of the last forward pass(es), (N, D)."""
        if not self._features:
            raise RuntimeError("no features recorded: enable collect_features and run a forward pass first")
        return torch.cat(self._features, dim=1)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class ImagePool:
    """Synthesised images, at most ``max_size``: the oldest are dropped first."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._batches: list[torch.Tensor] = []
        self.size = 0

    def add(self, x: torch.Tensor) -> None:
        self._batches.append(x.detach())
        self.size += x.shape[0]
        while self.size > self.max_size:
            excess, oldest = self.size - self.max_size, self._batches[0]
            if oldest.shape[0] <= excess:
                self._batches.pop(0)
                self.size -= oldest.shape[0]
            else:
                self._batches[0] = oldest[excess:]
                self.size -= excess

    def __len__(self) -> int:
        return self.size

    def sample(self, batch_size: int, rng: torch.Generator) -> torch.Tensor:
        if not self._batches:
            raise RuntimeError("the image pool is empty: call generator_round() before sample()")
        if len(self._batches) > 1:
            self._batches = [torch.cat(self._batches)]
        pool = self._batches[0]
        idx = torch.randint(0, pool.shape[0], (batch_size,), generator=rng).to(pool.device)
        return pool[idx]


def check_int(name: str, value: object, low: int, prefix: str = "distill.synthesizer_params.") -> None:
    """One-line error unless ``value`` is an integer >= ``low`` (the key ``prefix + name`` is named)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{prefix}{name} must be an integer >= {low}, got {value!r}")


def check_number(name: str, value: object, low: float, high: float | None = None, low_open: bool = False) -> None:
    """One-line error unless ``value`` is a number in [low, high] ((low, high] if ``low_open``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (value > low if low_open else value >= low) and (high is None or value <= high)
    if not ok:
        lo = "(" if low_open else "["
        hi = "inf)" if high is None else f"{high}]"
        raise ValueError(f"distill.synthesizer_params.{name} must be a number in {lo}{low}, {hi}, got {value!r}")
