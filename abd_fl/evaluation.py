"""Acc / ASR / ASR-floor of every role of a federated data-free-KD round.

Test data is used here only to report; no defense or training code sees it.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from abd_fl.data import ImageData
from abd_fl.distill import TeacherEnsemble
from abd_fl.distill.ensemble import DEFAULT_ENSEMBLE, ENSEMBLE_RULES, combine_logits
from abd_fl.device import resolve_device
from abd_fl.metrics import backdoor_metrics, score_predictions


def _mean(metrics: Sequence[Mapping[str, float]]) -> dict[str, float]:
    keys = ("acc", "asr", "asr_floor")
    return {k: float(sum(m[k] for m in metrics) / len(metrics)) for k in keys}


@torch.no_grad()
def _teacher_logits(ensemble: TeacherEnsemble, images: torch.Tensor, device: torch.device, batch_size: int = 1024) -> torch.Tensor:
    """Every teacher's logits on ``images``, stacked ``(T, N, K)`` on the CPU, in batches."""
    ensemble.to(device)
    parts = [ensemble.stacked_logits(images[i : i + batch_size].to(device)).cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(parts, dim=1)


def evaluate_round(
    teachers: Sequence[nn.Module],
    malicious: Sequence[bool | None],
    aggregated: nn.Module | None,
    students: Mapping[str, nn.Module],
    clean_test: ImageData,
    poisoned_test: ImageData,
    target_label: int,
    device: torch.device | str = "cpu",
    ensemble_rule: str = DEFAULT_ENSEMBLE,
    ensemble_trim: float = 0.2,
    every_rule: bool = False,
) -> dict[str, object]:
    """Metrics of each teacher, the malicious/benign means, the ensemble (the teachers combined
    by ``ensemble_rule``, as the distillation combines them), the aggregated model (key
    ``fedavg``) and every student (keyed by its role name). With ``every_rule`` also the
    ensemble under each rule of ``ENSEMBLE_RULES`` (key ``ensembles``, by rule name)."""

    def m(model: nn.Module) -> dict[str, float]:
        return backdoor_metrics(model, clean_test, poisoned_test, target_label, device)

    out: dict[str, object] = {}
    if teachers:
        # every teacher runs once on each test set; its own scores and every rule's ensemble
        # come from those logits (the ensemble combines them as the distillation does)
        if len(clean_test) == 0:
            raise ValueError("clean_test is empty (0 samples); cannot compute clean accuracy")
        ensemble = TeacherEnsemble(list(teachers), rule=ensemble_rule, trim=ensemble_trim)
        dev = resolve_device(device) if isinstance(device, str) else torch.device(device)
        clean = _teacher_logits(ensemble, clean_test.images, dev)
        triggered = _teacher_logits(ensemble, poisoned_test.images, dev) if len(poisoned_test) else None

        def scored(clean_logits: torch.Tensor, triggered_logits: torch.Tensor | None) -> dict[str, float]:
            backdoor = None if triggered_logits is None else triggered_logits.argmax(dim=1)
            return score_predictions(clean_logits.argmax(dim=1), clean_test.labels, backdoor, target_label)

        per_teacher = [scored(clean[i], None if triggered is None else triggered[i]) for i in range(len(teachers))]
        rules = ENSEMBLE_RULES if every_rule else (ensemble_rule,)
        weights = ensemble.weights.cpu()  # the logits were brought to the CPU
        by_rule = {}
        for rule in rules:
            combined = combine_logits(clean, weights, rule, ensemble_trim)
            combined_triggered = None if triggered is None else combine_logits(triggered, weights, rule, ensemble_trim)
            by_rule[rule] = scored(combined, combined_triggered)
    else:
        per_teacher, by_rule = [], {}
    out["teachers"] = per_teacher
    # a teacher whose flag is None (its reply did not say) counts in neither group
    mal = [p for p, flag in zip(per_teacher, malicious) if flag is not None and flag]
    ben = [p for p, flag in zip(per_teacher, malicious) if flag is not None and not flag]
    if mal:
        out["malicious_teacher"] = _mean(mal)
    if ben:
        out["benign_teachers"] = _mean(ben)
    if by_rule:
        out["ensemble"] = by_rule[ensemble_rule]
        if every_rule:
            out["ensembles"] = by_rule
    if aggregated is not None:
        out["fedavg"] = m(aggregated)
    for role, student in students.items():
        out[role] = m(student)
    return out
