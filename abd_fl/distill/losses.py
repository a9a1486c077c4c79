"""Knowledge-distillation losses (Hinton et al., 2015; paper Eq. 2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_kl_per_sample(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Per-sample ``T^2 * KL(softmax(t/T) || softmax(s/T))``, shape (N,).

    The teacher is the target distribution, as in the paper's ``D_KL(T(x) || S(x))``.
    Per-sample values let a defense re-weight samples (paper Sec. 4.1 (2)).
    """
    t = temperature
    log_p_t = F.log_softmax(teacher_logits / t, dim=1)
    log_p_s = F.log_softmax(student_logits / t, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)
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
