"""The teacher ensemble of federated data-free KD: how the client models' outputs are combined.

``mean_logits`` (FedDF / DENSE, the default) averages raw logits, so a teacher that sends
large logits (a scaled, model-replacing attacker) outweighs the others: two of six clients
at scale 5 take every model the server makes (issue 15). The other rules bound each
teacher's say:

* ``mean_probs`` -- the mean of the teachers' softmax probabilities: a teacher's vote is a
  distribution, at most 1/n of the mass whatever its logits' size.
* ``standardized_logits`` -- each teacher's logits standardised per sample over the classes
  (zero mean, unit standard deviation) before the mean: the logits' scale is removed, their
  ranking and relative margins kept.
* ``median_probs`` -- the coordinate-wise median of the probabilities over teachers
  (renormalised): a minority cannot move it past the majority's values.
* ``trimmed_probs`` -- per class, the mean of the probabilities after dropping the
  ``trim`` share of the highest and of the lowest teachers (renormalised).

The probability rules return the log of the combined distribution, which serves as logits
downstream (``softmax(log p) = p``; at a KD temperature ``T`` it is ``p`` sharpened or
smoothed by ``1/T``). Per-teacher ``weights`` (e.g. ABD down-weighting a suspicious client)
weigh the two means and the standardised mean; the median and trimmed rules use every teacher
of positive weight, each counted once.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

ENSEMBLE_RULES = ("mean_logits", "mean_probs", "standardized_logits", "median_probs", "trimmed_probs")
"""The ways :class:`TeacherEnsemble` combines its teachers (``distill.ensemble``)."""

_EPS = 1e-8


def check_ensemble(rule: str, trim: float) -> None:
    """Raise a one-line ``ValueError`` on an unknown rule or a trim outside [0, 0.5)."""
    if rule not in ENSEMBLE_RULES:
        raise ValueError(f"unknown distill.ensemble '{rule}'; choose one of: {', '.join(ENSEMBLE_RULES)}")
    if isinstance(trim, bool) or not isinstance(trim, (int, float)) or not 0 <= trim < 0.5:
        raise ValueError(f"distill.ensemble_trim must be a number in [0, 0.5), got {trim!r}")


class TeacherEnsemble(nn.Module):
    """Frozen teachers combined by ``rule`` (see the module doc; default: averaged logits).

    ``weights`` are normalised to sum to one; ``None`` gives the plain mean. ``trim`` is the
    share of teachers dropped at each end per class by ``trimmed_probs`` (in [0, 0.5)). The
    module is always in eval mode and its parameters never require gradients, but gradients
    do flow to the *inputs* (generators are trained through it).
    """

    def __init__(
        self,
        teachers: Sequence[nn.Module],
        weights: Sequence[float] | None = None,
        rule: str = "mean_logits",
        trim: float = 0.2,
    ) -> None:
        super().__init__()
        if len(teachers) == 0:
            raise ValueError("a teacher ensemble needs at least one teacher, got 0")
        check_ensemble(rule, trim)
        self.rule, self.trim = rule, float(trim)
        self.teachers = nn.ModuleList(teachers)
        for teacher in self.teachers:
            teacher.eval()
            teacher.requires_grad_(False)
        self.set_weights(weights)

    def set_weights(self, weights: Sequence[float] | None) -> None:
        """Set the per-teacher weights (e.g. down-weighting suspicious clients)."""
        n = len(self.teachers)
        if weights is None:
            w = torch.full((n,), 1.0 / n)
        else:
            w = torch.as_tensor(list(weights), dtype=torch.float32)
            if w.shape != (n,) or bool((w < 0).any()) or float(w.sum()) <= 0:
                raise ValueError(
                    f"ensemble weights must be {n} non-negative numbers with a positive sum, got {list(weights)}"
                )
            w = w / w.sum()
        self.register_buffer("weights", w, persistent=False)

    def train(self, mode: bool = True) -> "TeacherEnsemble":  # teachers stay frozen
        return super().train(False)

    def member_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every teacher on ``x``."""
        return [teacher(x) for teacher in self.teachers]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return combine_logits(torch.stack(self.member_logits(x), dim=0), self.weights, self.rule, self.trim)


def combine_logits(logits: torch.Tensor, weights: torch.Tensor, rule: str = "mean_logits", trim: float = 0.2) -> torch.Tensor:
    """Combine stacked teacher logits ``(T, B, K)`` with normalised ``weights`` ``(T,)`` by ``rule``
    (the module doc); returns ``(B, K)`` logits."""
    w = weights.to(logits).view(-1, 1, 1)
    if rule == "mean_logits":
        return (w * logits).sum(dim=0)
    if rule == "standardized_logits":
        centred = logits - logits.mean(dim=2, keepdim=True)
        z = centred / (centred.pow(2).mean(dim=2, keepdim=True).sqrt() + _EPS)
        return (w * z).sum(dim=0)
    probs = logits.softmax(dim=2)
    if rule == "mean_probs":
        combined = (w * probs).sum(dim=0)
    else:
        active = probs[weights > 0]  # every teacher of positive weight, once
        if rule == "median_probs":
            combined = active.median(dim=0).values if len(active) % 2 else active.quantile(0.5, dim=0)
        elif rule == "trimmed_probs":
            n = len(active)
            cut = math.floor(trim * n)
            combined = active.sort(dim=0).values[cut:n - cut].mean(dim=0)
        else:
            raise ValueError(f"unknown distill.ensemble '{rule}'; choose one of: {', '.join(ENSEMBLE_RULES)}")
    combined = combined / combined.sum(dim=1, keepdim=True).clamp_min(_EPS)
    return combined.clamp_min(_EPS).log()
