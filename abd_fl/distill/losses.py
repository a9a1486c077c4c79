"""Knowledge-distillation losses (Hinton et al., 2015; paper Eq. 2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


KL_REDUCTIONS = ("mean", "sum")
"""How the per-sample KL reduces over classes: ``mean`` (divided by the number of classes K,
so a batch mean equals ``F.kl_div(..., reduction="mean")`` as the ABD reference computes every
KL) or ``sum`` (the textbook per-sample KL)."""


def kd_kl_per_sample(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0, class_reduction: str = "sum"
) -> torch.Tensor:
    """Per-sample ``T^2 * KL(softmax(t/T) || softmax(s/T))``, shape (N,).

    The teacher is the target distribution, as in the paper's ``D_KL(T(x) || S(x))``.
    Per-sample values let a defense re-weight samples (paper Sec. 4.1 (2)).
    ``class_reduction="mean"`` divides by the number of classes (the reference's scale).
    """
    if class_reduction not in KL_REDUCTIONS:
        raise ValueError(f"unknown KL class reduction '{class_reduction}'; choose one of: {', '.join(KL_REDUCTIONS)}")
    t = temperature
    log_p_t = F.log_softmax(teacher_logits / t, dim=1)
    log_p_s = F.log_softmax(student_logits / t, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)
    if class_reduction == "mean":
        kl = kl / teacher_logits.shape[1]
    return kl * (t * t)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean (optionally weighted) KD loss over the batch."""
    per_sample = kd_kl_per_sample(student_logits, teacher_logits, temperature)
    if weights is None:
        return per_sample.mean()
    return (weights.to(per_sample) * per_sample).mean()
