"""The teacher ensemble of federated data-free KD: averaged logits of the client models."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class TeacherEnsemble(nn.Module):
    """Frozen teachers whose (optionally weighted) logits are averaged (FedDF / DENSE).

    ``weights`` are normalised to sum to one; ``None`` gives the plain mean. The module
    is always in eval mode and its parameters never require gradients, but gradients do
    flow to the *inputs* (generators are trained through it).
    """

    def __init__(self, teachers: Sequence[nn.Module], weights: Sequence[float] | None = None) -> None:
        super().__init__()
        if len(teachers) == 0:
            raise ValueError("a teacher ensemble needs at least one teacher, got 0")
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
        logits = torch.stack(self.member_logits(x), dim=0)
        return (self.weights.to(logits).view(-1, 1, 1) * logits).sum(dim=0)
