"""Targeted trigger synthesis on surrogate samples: our variant of SR's backdoor synthesis.

ABD's Self-Retrospection (Sec. 4.2, Algorithm 1) synthesises a *universal* perturbation
``delta`` that maximises the student's output shift and unlearns it. On the 8x8 digits that
untargeted ``delta`` moves samples *away* from the target class (docs/results.md, issue 3 probes),
so the unlearning removes accuracy, not the backdoor. This module synthesises the
perturbation the backdoor actually is: for a class ``c``, a mask ``m`` and pattern ``p``
(both in [0, 1], one per image shape, shared by every sample) such that
``x' = (1 - m) * x + m * p`` makes the model predict ``c`` on surrogate samples it does
not already label ``c``, with an L1 cost on ``m`` (the form of Neural Cleanse, Wang et al.,
S&P 2019, here on synthetic samples: data-free).

* :func:`invert_trigger` -- the mask/pattern for one class: Adam on
  ``CE(model(x'), c) + lambda_t * |m|_1`` with ``lambda_t`` annealed geometrically from
  ``l1_start`` to ``l1_end``, from four starts (one per image quadrant) at once; keeps the
  smallest mask (L1) that still flips at least ``min_flip`` of the samples.
* :func:`prune_mask` -- binarises the mask and greedily drops pixels while the flip rate
  stays >= ``keep`` x the binarised mask's: the inversion's masks carry extra pixels
  (digit strokes) that purifying would erase from clean images.
* :func:`scan_classes` -- :func:`invert_trigger` + :func:`prune_mask` for every class.
* :func:`suspect_class` -- the data-free decision: the class that a ``budget``-pixel mask
  flips most, *if* it flips at least ``min_flip`` of the samples and ``min_ratio`` x the
  median class's rate (a backdoor target is reached through a handful of pixels, a natural
  class is not); else None (no backdoor found, nothing is switched on).
* :func:`purify` -- ``x`` with the mask's pixels in-painted from their neighbours (or a
  fill value): what the teachers see once a trigger is found (:mod:`abd_fl.defense.abd`).
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
    flip_at_budget: float = math.nan
    """Flip rate of the ``budget``-pixel mask on the pruning path (see :func:`prune_mask`)."""

    def summary(self) -> dict[str, float | int]:
        def num(v: float) -> float | None:
            return None if math.isnan(v) else round(v, 4)

        return {"class": self.target, "l1": round(self.l1, 3), "flip": round(self.flip, 4), "pixels": self.pixels,
                "pruned_flip": num(self.pruned_flip), "flip_at_budget": num(self.flip_at_budget)}


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


def _quadrant_starts(h: int, w: int) -> torch.Tensor:
    """Initial mask logits, one start per image quadrant: +1 inside the quadrant, -3 outside."""
    starts = torch.full((4, 1, h, w), -3.0)
    for k, (i, j) in enumerate([(0, 0), (0, w // 2), (h // 2, 0), (h // 2, w // 2)]):
        starts[k, :, i:i + (h + 1) // 2, j:j + (w + 1) // 2] = 1.0
    return starts


def invert_trigger(
    model: nn.Module,
    samples: torch.Tensor,
    target: int,
    steps: int = 150,
    batch_size: int = 64,
    lr: float = 0.1,
    l1_start: float = 0.01,
    l1_end: float = 0.5,
    min_flip: float = 0.9,
    check_every: int = 10,
    seed: int = 0,
) -> InvertedTrigger:
    """Synthesise the mask and pattern that turn ``samples`` into class ``target`` (see module doc).

    The search is local (a start far from the trigger ends in a natural-class patch: measured,
    docs/results.md), so it runs from four starts at once, one mask per image quadrant (logit +1 inside,
    -3 outside; patterns seeded noise), each on the same batches. ``model`` is used as it is
    (call it in eval mode); only the mask and pattern logits are optimised (Adam, ``lr``), on
    batches of ``batch_size`` drawn with a seeded generator from the samples ``model`` does not
    label ``target``. Every ``check_every`` steps each start's mask is scored on all of them;
    the smallest mask (L1) flipping at least ``min_flip`` is returned, else the best-flipping
    one seen. Returns detached tensors on ``samples``' device.
    """
    gen = torch.Generator().manual_seed(seed)
    source = _non_target(model, samples, target)
    c, h, w = samples.shape[1:]
    mask_logit = _quadrant_starts(h, w).to(samples.device).requires_grad_(True)
    pattern_logit = (torch.randn((4, c, h, w), generator=gen) * 0.5).to(samples.device).requires_grad_(True)
    if len(source) == 0:
        mask = torch.sigmoid(mask_logit[:1]).detach()
        return InvertedTrigger(target, mask, torch.sigmoid(pattern_logit[:1]).detach(), float(mask.sum()), 0.0)
    best: InvertedTrigger | None = None
    best_flip: InvertedTrigger | None = None
    opt = torch.optim.Adam([mask_logit, pattern_logit], lr=lr)
    starts = mask_logit.shape[0]
    labels = torch.full((starts * batch_size,), target, dtype=torch.long, device=samples.device)
    with torch.enable_grad():
        for step in range(steps):
            lam = l1_start * (l1_end / l1_start) ** (step / max(1, steps - 1))
            idx = torch.randint(len(source), (batch_size,), generator=gen).to(samples.device)
            mask, pattern = torch.sigmoid(mask_logit), torch.sigmoid(pattern_logit)  # (S, 1|C, H, W)
            x = _apply(source[idx].unsqueeze(0), mask.unsqueeze(1), pattern.unsqueeze(1)).flatten(0, 1)
            ce = F.cross_entropy(model(x), labels, reduction="sum") / batch_size  # the sum of the starts' mean CEs
            loss = ce + lam * mask.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if (step + 1) % check_every == 0 or step == steps - 1:
                with torch.no_grad():
                    masks, patterns = torch.sigmoid(mask_logit), torch.sigmoid(pattern_logit)
                for k in range(starts):
                    m, p = masks[k:k + 1].clone(), patterns[k:k + 1].clone()
                    cand = InvertedTrigger(target, m, p, float(m.sum()), _flip(model, source, target, m, p))
                    if cand.flip >= min_flip and (best is None or cand.l1 < best.l1):
                        best = cand
                    if best_flip is None or cand.flip > best_flip.flip:
                        best_flip = cand
    return best if best is not None else best_flip  # type: ignore[return-value]


def _removal_rates(
    model: nn.Module, source: torch.Tensor, target: int, mask: torch.Tensor, pattern: torch.Tensor,
    batch_size: int = 1024,
) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """Each pixel of ``mask`` and the flip rate of ``mask`` without it, batched over pixels."""
    pixels = [tuple(rc) for rc in mask[0, 0].nonzero().tolist()]
    rates = torch.empty(len(pixels))
    per = max(1, batch_size // max(1, len(source)))  # trial masks per forward batch
    for i in range(0, len(pixels), per):
        chunk = pixels[i:i + per]
        trials = mask.repeat(len(chunk), 1, 1, 1)
        for k, (r, c) in enumerate(chunk):
            trials[k, 0, r, c] = 0
        x = _apply(source.unsqueeze(0), trials.unsqueeze(1), pattern.unsqueeze(0)).flatten(0, 1)
        hits = (model(x).argmax(1) == target).float().view(len(chunk), len(source))
        rates[i:i + len(chunk)] = hits.mean(1).cpu()
    return pixels, rates  # type: ignore[return-value]


@torch.no_grad()
def prune_mask(
    model: nn.Module, samples: torch.Tensor, trigger: InvertedTrigger, keep: float = 0.8, threshold: float = 0.5,
    budget: int = 4, exact_max: int = 64, coarse_samples: int = 256, seed: int = 0,
) -> InvertedTrigger:
    """Binarise ``trigger.mask`` at ``threshold`` and drop pixels greedily (each round the
    pixel whose removal keeps the highest flip rate), down to one pixel or until the mask is
    within ``budget`` pixels and its rate below ``keep`` x the binarised mask's. Returns the trigger
    with the smallest mask on that path whose flip rate is at least ``keep`` x the
    binarised mask's (``pixels``, ``pruned_flip``), and the flip rate of the path's
    ``budget``-pixel mask (``flip_at_budget``; the whole mask's when it has fewer pixels).

    The greedy path costs (pixels)^2 flip rates, which is nothing at 8x8 (at most 64 pixels)
    and hours at 28x28 (hundreds). A mask of more than ``exact_max`` pixels is first halved,
    round by round, down to ``exact_max`` pixels: each round scores every pixel's removal on
    ``coarse_samples`` seeded samples (one batched pass) and drops the half whose removal
    keeps the highest rates; then the exact greedy path runs as above. Masks of at most
    ``exact_max`` pixels take the exact path only.
    """
    source = _non_target(model, samples, trigger.target)
    mask = (trigger.mask > threshold).to(trigger.mask.dtype)
    full = _flip(model, source, trigger.target, mask, trigger.pattern)
    chosen, chosen_rate = mask.clone(), full
    at_budget = full
    if int(mask.sum()) > exact_max and len(source) > 0:
        gen = torch.Generator().manual_seed(seed)
        sub = source[torch.randperm(len(source), generator=gen)[:coarse_samples].to(source.device)]
        while int(mask.sum()) > exact_max:
            pixels, rates = _removal_rates(model, sub, trigger.target, mask, trigger.pattern)
            drop = min(len(pixels) // 2, len(pixels) - exact_max)
            for i in torch.argsort(rates, descending=True, stable=True)[:drop].tolist():
                mask[0, 0, pixels[i][0], pixels[i][1]] = 0
            rate = _flip(model, source, trigger.target, mask, trigger.pattern)
            if rate >= keep * full:
                chosen, chosen_rate = mask.clone(), rate
            if int(mask.sum()) <= budget:
                at_budget = rate
    while int(mask.sum()) > 1:
        # one trial mask per forward pass, over every sample: the same passes as one _flip each
        pixels, rates = _removal_rates(model, source, trigger.target, mask, trigger.pattern, batch_size=1)
        i = int(torch.argmax(rates))  # the first of equal rates, in nonzero() order
        rate = float(rates[i])
        mask[0, 0, pixels[i][0], pixels[i][1]] = 0
        if rate >= keep * full:
            chosen, chosen_rate = mask.clone(), rate
        if int(mask.sum()) == budget:
            at_budget = rate
        if rate < keep * full and int(mask.sum()) <= budget:
            break
    return InvertedTrigger(trigger.target, chosen, trigger.pattern, trigger.l1, trigger.flip,
                           pixels=int(chosen.sum()), pruned_flip=chosen_rate, flip_at_budget=at_budget)


def scan_classes(
    model: nn.Module, samples: torch.Tensor, classes: Sequence[int], keep: float = 0.8, budget: int = 4, seed: int = 0,
    **invert_kwargs,
) -> list[InvertedTrigger]:
    """:func:`invert_trigger` then :func:`prune_mask` for every class in ``classes``."""
    out = []
    for c in classes:
        trig = invert_trigger(model, samples, int(c), seed=seed * 1009 + int(c), **invert_kwargs)
        out.append(prune_mask(model, samples, trig, keep=keep, budget=budget, seed=seed * 1009 + int(c)))
    return out


def suspect_class(
    triggers: Sequence[InvertedTrigger], min_flip: float = 0.6, min_ratio: float = 2.0
) -> tuple[InvertedTrigger | None, float]:
    """The data-free backdoor decision over a class scan (see module doc).

    Each class is judged by ``flip_at_budget``, the share of samples its best few-pixel
    mask flips (a backdoor target is reached through a handful of pixels, a natural class
    is not). Returns ``(trigger, ratio)`` with ``ratio`` the highest rate over the median of
    the other classes'; the trigger is returned when its rate is at least ``min_flip`` and
    ``ratio >= min_ratio``, else None (no backdoor found).
    """
    if not triggers:
        return None, math.nan
    rates = [0.0 if math.isnan(t.flip_at_budget) else t.flip_at_budget for t in triggers]
    best = max(range(len(triggers)), key=lambda i: rates[i])
    others = [r for i, r in enumerate(rates) if i != best]
    median = statistics.median(others) if others else 0.0
    ratio = rates[best] / median if median > 0 else math.inf
    found = rates[best] >= min_flip and ratio >= min_ratio
    return (triggers[best] if found else None), ratio


def purify(x: torch.Tensor, mask: torch.Tensor, fill: torch.Tensor | float | str = "inpaint") -> torch.Tensor:
    """``x`` with the trigger's pixels (``mask`` 1) replaced: ``"inpaint"`` by the mean of
    each pixel's unmasked 3x3 neighbours (0 where it has none), so a stray mask pixel on a
    stroke keeps the stroke while a corner patch becomes background; or by ``fill`` (a
    scalar or a tensor broadcasting to one image)."""
    mask = mask.to(x)
    if isinstance(fill, str):
        if fill != "inpaint":
            raise ValueError(f"unknown purify fill '{fill}'; choose inpaint, a number or a tensor")
        keep = 1 - mask
        kernel = torch.ones(x.shape[1], 1, 3, 3, dtype=x.dtype, device=x.device)
        total = F.conv2d(x * keep, kernel, padding=1, groups=x.shape[1])
        count = F.conv2d(keep.expand(-1, x.shape[1], -1, -1), kernel, padding=1, groups=x.shape[1])
        value = torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))
        return keep * x + mask * value
    fill = fill.to(x) if isinstance(fill, torch.Tensor) else torch.full_like(x[:1], float(fill))
    return (1 - mask) * x + mask * fill


@torch.no_grad()
def trigger_flip_rate(model: nn.Module, samples: torch.Tensor, trigger: InvertedTrigger) -> float:
    """Share of ``model``'s non-target samples that ``trigger`` (its pruned binary mask and
    pattern) flips to the target: how much of the backdoor ``model`` carries."""
    source = _non_target(model, samples, trigger.target)
    return _flip(model, source, trigger.target, trigger.mask, trigger.pattern)
