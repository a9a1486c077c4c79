"""Acc / ASR / ASR-floor of every role of a federated data-free-KD round.

Test data is used here only to report; no defense or training code sees it.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from abd_fl.data import ImageData
from abd_fl.distill import TeacherEnsemble
from abd_fl.distill.ensemble import DEFAULT_ENSEMBLE, ENSEMBLE_RULES
from abd_fl.metrics import backdoor_metrics


def _mean(metrics: Sequence[Mapping[str, float]]) -> dict[str, float]:
    keys = ("acc", "asr", "asr_floor")
    return {k: float(sum(m[k] for m in metrics) / len(metrics)) for k in keys}


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

    per_teacher = [m(t) for t in teachers]
    out: dict[str, object] = {"teachers": per_teacher}
    # a teacher whose flag is None (its reply did not say) counts in neither group
    mal = [p for p, flag in zip(per_teacher, malicious) if flag is not None and flag]
    ben = [p for p, flag in zip(per_teacher, malicious) if flag is not None and not flag]
    if mal:
        out["malicious_teacher"] = _mean(mal)
    if ben:
        out["benign_teachers"] = _mean(ben)
    if teachers:
        rules = ENSEMBLE_RULES if every_rule else (ensemble_rule,)
        by_rule = {rule: m(TeacherEnsemble(list(teachers), rule=rule, trim=ensemble_trim)) for rule in rules}
        out["ensemble"] = by_rule[ensemble_rule]  # the distillation's own rule, scored once
        if every_rule:
            out["ensembles"] = by_rule
    if aggregated is not None:
        out["fedavg"] = m(aggregated)
    for role, student in students.items():
        out[role] = m(student)
    return out
