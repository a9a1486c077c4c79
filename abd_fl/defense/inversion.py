"""Targeted trigger synthesis on surrogate samples: our variant of SR's backdoor synthesis.

ABD's Self-Retrospection (Sec. 4.2, Algorithm 1) synthesises a *universal* perturbation
``delta`` that maximises the student's output shift and unlearns it. On the 8x8 digits that
untargeted ``delta`` moves samples *away* from the target class (README, issue 3 probes),
so the unlearning removes accuracy, not the backdoor. This module synthesises the
perturbation the backdoor actually is: for a class ``c``, a mask ``m`` and pattern ``p``
(both in [0, 1], one per image shape, shared by every sample) such that
``x' = (1 - m) * x + m * p`` makes the model predict ``c`` on surrogate samples it does
not already label ``c``, with an L1 cost on ``m`` (the form of Neural Cleanse, Wang et al.,
S&P 2019, here on synthetic samples: data-free).

* :func:`invert_trigger` -- the mask/pattern for one class: Adam on
  ``CE(model(x'), c) + lambda_t * |m|_1`` with ``lambda_t`` annealed geometrically from
  ``l1_start`` to ``l1_end``; keeps the smallest mask (L1) that still flips at least
  ``min_flip`` of the samples.
* :func:`prune_mask` -- binarises the mask and greedily drops pixels while the flip rate
  stays >= ``keep`` x the binarised mask's: the inversion's masks carry extra pixels
  (digit strokes) that purifying would erase from clean images.
* :func:`scan_classes` -- :func:`invert_trigger` + :func:`prune_mask` for every class.
* :func:`suspect_class` -- the data-free decision: the class whose pruned mask is
  smallest, *if* it is at most ``max_ratio`` x the median class's pruned mask (a backdoor
  target is reached with far fewer pixels than any natural class) and flips at least
  ``min_flip``; else None (no backdoor found, nothing is switched on).
* :func:`purify` -- ``x`` with the mask's pixels replaced by a fill value: what the
  teachers see once a trigger is found (:mod:`abd_fl.defense.abd`).
* :func:`trigger_flip_rate` -- the share of a model's non-``c`` surrogate samples that the
  trigger flips to ``c``: a per-teacher suspicion score (FL detection AUC).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "InvertedTrigger",
    "invert_trigger",
    "prune_mask",
    "purify",
    "scan_classes",
    "suspect_class",
    "trigger_flip_rate",
]


@dataclass
class InvertedTrigger:
    """One class's synthesised trigger: ``mask`` (1, 1, H, W) and ``pattern`` (1, C, H, W) in [0, 1]."""

    target: int
    mask: torch.Tensor
    pattern: torch.Tensor
    l1: float
    """L1 norm of the (soft) mask the inversion ended with."""
    flip: float
    """Share of the non-target surrogate samples the soft mask flips to ``target``."""
    pixels: int = 0
    """Pixels of the pruned binary mask (0 before :func:`prune_mask`)."""
    pruned_flip: float = math.nan
    """Flip rate of the pruned binary mask."""

    def summary(self) -> dict[str, float | int]:
        return {"class": self.target, "l1": round(self.l1, 3), "flip": round(self.flip, 4), "pixels": self.pixels,
                "pruned_flip": None if math.isnan(self.pruned_flip) else round(self.pruned_flip, 4)}


def _apply(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    return (1 - mask) * x + mask * pattern


@torch.no_grad()
def _non_target(model: nn.Module, samples: torch.Tensor, target: int, batch_size: int = 1024) -> torch.Tensor:
    keep = torch.cat([model(samples[i:i + batch_size]).argmax(1) != target for i in range(0, len(samples), batch_size)])
    return samples[keep]


@torch.no_grad()
def _flip(model: nn.Module, samples: torch.Tensor, target: int, mask: torch.Tensor, pattern: torch.Tensor) -> float:
    if len(samples) == 0:
        return 0.0
    return float((model(_apply(samples, mask, pattern)).argmax(1) == target).float().mean())


def invert_trigger(
    model: nn.Module,
    samples: torch.Tensor,
    target: int,
    steps: int = 300,
    batch_size: int = 128,
    lr: float = 0.1,
    l1_start: float = 0.01,
    l1_end: float = 0.5,
    min_flip: float = 0.9,
    check_every: int = 20,
    seed: int = 0,
) -> InvertedTrigger:
    """Synthesise the mask and pattern that turn ``samples`` into class ``target`` (see module doc).

    ``model`` is used as it is (call it in eval mode); only the mask and pattern logits are
    optimised (Adam, ``lr``), on batches of ``batch_size`` drawn with a seeded generator
    from the samples ``model`` does not label ``target``. Every ``check_every`` steps the
    current mask is scored on all of them; the smallest mask flipping at least ``min_flip``
    is kept (the last one when none does). Returns detached tensors on ``samples``' device.
    """
    gen = torch.Generator().manual_seed(seed)
    source = _non_target(model, samples, target)
    c, h, w = samples.shape[1:]
    mask_logit = (torch.randn((1, 1, h, w), generator=gen) * 0.5 - 2.0).to(samples.device).requires_grad_(True)
    pattern_logit = (torch.randn((1, c, h, w), generator=gen) * 0.5).to(samples.device).requires_grad_(True)
    best: InvertedTrigger | None = None
    last: InvertedTrigger | None = None
    if len(source) == 0:
        mask = torch.sigmoid(mask_logit).detach()
        return InvertedTrigger(target, mask, torch.sigmoid(pattern_logit).detach(), float(mask.sum()), 0.0)
    opt = torch.optim.Adam([mask_logit, pattern_logit], lr=lr)
    labels = torch.full((batch_size,), target, dtype=torch.long, device=samples.device)
    with torch.enable_grad():
        for step in range(steps):
            lam = l1_start * (l1_end / l1_start) ** (step / max(1, steps - 1))
            idx = torch.randint(len(source), (batch_size,), generator=gen).to(samples.device)
            mask, pattern = torch.sigmoid(mask_logit), torch.sigmoid(pattern_logit)
            loss = F.cross_entropy(model(_apply(source[idx], mask, pattern)), labels) + lam * mask.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if (step + 1) % check_every == 0 or step == steps - 1:
                mask, pattern = torch.sigmoid(mask_logit).detach(), torch.sigmoid(pattern_logit).detach()
                last = InvertedTrigger(target, mask, pattern, float(mask.sum()), _flip(model, source, target, mask, pattern))
                if last.flip >= min_flip and (best is None or last.l1 < best.l1):
                    best = last
    return best if best is not None else last  # type: ignore[return-value]


@torch.no_grad()
def prune_mask(
    model: nn.Module, samples: torch.Tensor, trigger: InvertedTrigger, keep: float = 0.8, threshold: float = 0.5
) -> InvertedTrigger:
    """Binarise ``trigger.mask`` at ``threshold`` and drop pixels greedily (each round the
    pixel whose removal keeps the highest flip rate) while the flip rate stays at least
    ``keep`` x the binarised mask's. Returns the trigger with the binary mask, its pixel
    count and flip rate (``pruned_flip``)."""
    source = _non_target(model, samples, trigger.target)
    mask = (trigger.mask > threshold).to(trigger.mask.dtype)
    full = _flip(model, source, trigger.target, mask, trigger.pattern)
    while True:
        best: tuple[tuple[int, int], float] | None = None
        for r, k in mask[0, 0].nonzero().tolist():
            trial = mask.clone()
            trial[0, 0, r, k] = 0
            rate = _flip(model, source, trigger.target, trial, trigger.pattern)
            if rate >= keep * full and (best is None or rate > best[1]):
                best = ((r, k), rate)
        if best is None:
            break
        mask[0, 0, best[0][0], best[0][1]] = 0
    return InvertedTrigger(trigger.target, mask, trigger.pattern, trigger.l1, trigger.flip,
                           pixels=int(mask.sum()), pruned_flip=_flip(model, source, trigger.target, mask, trigger.pattern))


def scan_classes(
    model: nn.Module, samples: torch.Tensor, classes: Sequence[int], keep: float = 0.8, seed: int = 0, **invert_kwargs
) -> list[InvertedTrigger]:
    """:func:`invert_trigger` then :func:`prune_mask` for every class in ``classes``."""
    out = []
    for c in classes:
        trig = invert_trigger(model, samples, int(c), seed=seed * 1009 + int(c), **invert_kwargs)
        out.append(prune_mask(model, samples, trig, keep=keep))
    return out


def suspect_class(
    triggers: Sequence[InvertedTrigger], max_ratio: float = 0.5, min_flip: float = 0.5
) -> tuple[InvertedTrigger | None, float]:
    """The data-free backdoor decision over a class scan (see module doc).

    Returns ``(trigger, ratio)``: ``ratio`` is the smallest pruned mask's pixel count over
    the median pixel count of the other classes (classes whose pruned mask flips less than
    ``min_flip`` count as unreachable); the trigger is returned when ``ratio <= max_ratio``
    and its pruned mask flips at least ``min_flip``, else None.
    """
    sizes = [t.pixels if t.pruned_flip >= min_flip and t.pixels > 0 else math.inf for t in triggers]
    if not triggers or all(math.isinf(s) for s in sizes):
        return None, math.inf
    best = min(range(len(triggers)), key=lambda i: sizes[i])
    others = [s for i, s in enumerate(sizes) if i != best]
    finite = [s for s in others if not math.isinf(s)]
    median = statistics.median(others) if finite else math.inf
    ratio = sizes[best] / median if median > 0 else math.inf
    return (triggers[best] if ratio <= max_ratio else None), ratio


def purify(x: torch.Tensor, mask: torch.Tensor, fill: torch.Tensor | float = 0.0) -> torch.Tensor:
    """``x`` with the trigger's pixels (``mask`` 1) replaced by ``fill`` (a scalar or a
    tensor broadcasting to one image)."""
    mask = mask.to(x)
    fill = fill.to(x) if isinstance(fill, torch.Tensor) else torch.full_like(x[:1], float(fill))
    return (1 - mask) * x + mask * fill


@torch.no_grad()
def trigger_flip_rate(model: nn.Module, samples: torch.Tensor, trigger: InvertedTrigger) -> float:
    """Share of ``model``'s non-target samples that ``trigger`` (its pruned binary mask and
    pattern) flips to the target: how much of the backdoor ``model`` carries."""
    source = _non_target(model, samples, trigger.target)
    return _flip(model, source, trigger.target, trigger.mask, trigger.pattern)
