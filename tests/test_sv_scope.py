"""The Shuffling Vaccine's scope over a teacher ensemble (``defense.params.sv_scope``).

``each`` (default): every vaccinated teacher has its own term and mask, and a sample counts as
flagged when any teacher flags it. ``ensemble`` (ours): one vaccine for the combined teachers,
so a sample is flagged only when the ensemble's prediction survives the shuffles.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from abd_fl.defense import ABDConfig, ABDDefense
from abd_fl.defense.vaccine import vaccine_regularizer
from abd_fl.distill import DistillConfig, ZSKTSynthesizer, distill
from abd_fl.distill.ensemble import TeacherEnsemble
from abd_fl.distill.hooks import DistillContext
from abd_fl.models import build_model


class _Fixed(nn.Module):
    """A 'teacher' whose logits per sample are fixed (the conv only gives the vaccine a layer to shuffle)."""

    def __init__(self, logits: list[list[float]]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.logits = torch.tensor(logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[: x.shape[0]] + 0.0 * x.sum()


def _defense(scope: str, teachers: list[nn.Module], rule: str = "mean_probs") -> ABDDefense:
    defense = ABDDefense(ABDConfig(num_layers=1, sr="off", sv_scope=scope))
    ensemble = TeacherEnsemble(teachers, rule=rule)
    defense.on_distill_start(DistillContext(
        teachers=teachers, ensemble=ensemble, student=build_model("cnn_small", 10, 1, (0.3,), (0.4,)),
        device=torch.device("cpu"), total_iterations=10, sample_surrogate=lambda: torch.zeros(2, 1, 8, 8),
    ))
    return defense


def _planted(scope: str, rule: str = "mean_probs") -> ABDDefense:
    """Teacher A: weakly class 0, and its shuffled copy keeps it (A flags every sample).
    Teacher B: confidently class 1, its shuffled copy says class 2 (B flags nothing)."""
    a, b = _Fixed([[1.0, 0.0, 0.0]] * 2), _Fixed([[0.0, 5.0, 0.0]] * 2)
    defense = _defense(scope, [a, b], rule)
    defense._vaccines[0].shuffled = _Fixed([[1.0, 0.0, 0.0]] * 2)
    defense._vaccines[1].shuffled = _Fixed([[0.0, 0.0, 5.0]] * 2)
    return defense


def test_each_flags_the_union_and_ensemble_only_what_the_ensemble_keeps() -> None:
    x = torch.zeros(2, 1, 8, 8)
    each, ens = _planted("each"), _planted("ensemble")
    each._sv_term(x)
    term = ens._sv_term(x)
    assert each.report()["flagged_share"] == pytest.approx(1.0)  # A flags both samples
    # the ensemble (mean of probabilities) says class 1, its shuffled copy class 2: nothing survives
    assert ens.report()["flagged_share"] == pytest.approx(0.0)
    assert float(term) == 0.0
    # each teacher's own rate is reported under both scopes
    assert each.report()["flag_rate_per_teacher"] == pytest.approx([1.0, 0.0])
    assert ens.report()["flag_rate_per_teacher"] == pytest.approx([1.0, 0.0])


@pytest.mark.parametrize("rule, flagged", [("mean_logits", 1.0), ("mean_probs", 0.0)])
def test_the_ensemble_scope_combines_by_the_ensembles_rule(rule: str, flagged: float) -> None:
    """A says class 0 with logit 20, B and C class 1 with logit 6; the shuffled A keeps class 0,
    the shuffled B and C say class 2. Averaged logits follow A (class 0 before and after the
    shuffle: flagged); averaged probabilities follow B and C (class 1, then class 2: not)."""
    a, b, c = _Fixed([[20.0, 0.0, 0.0]] * 2), _Fixed([[0.0, 6.0, 0.0]] * 2), _Fixed([[0.0, 6.0, 0.0]] * 2)
    ens = _defense("ensemble", [a, b, c], rule)
    ens._vaccines[0].shuffled = _Fixed([[20.0, 0.0, 0.0]] * 2)
    ens._vaccines[1].shuffled = _Fixed([[0.0, 0.0, 6.0]] * 2)
    ens._vaccines[2].shuffled = _Fixed([[0.0, 0.0, 6.0]] * 2)
    term = ens._sv_term(torch.zeros(2, 1, 8, 8))
    assert ens.report()["flagged_share"] == pytest.approx(flagged)
    if rule == "mean_logits":  # the term is Sec. 4.1 (1) on the averaged logits
        t, s = torch.tensor([[20.0, 12.0, 0.0]] * 2) / 3, torch.tensor([[20.0, 0.0, 12.0]] * 2) / 3
        assert float(term) == pytest.approx(float(vaccine_regularizer(t, s)), rel=1e-5)
        assert float(term) < 0


def test_one_teacher_gives_the_same_term_and_flags_under_both_scopes() -> None:
    torch.manual_seed(0)
    teacher = build_model("cnn", 10, 1, (0.3,), (0.4,))
    x = torch.rand(32, 1, 8, 8)
    each, ens = _defense("each", [teacher]), _defense("ensemble", [teacher])
    term_each, term_ens = each._sv_term(x), ens._sv_term(x)
    assert float(term_ens) == pytest.approx(float(term_each), rel=1e-5, abs=1e-7)
    assert ens.report()["flagged_share"] == each.report()["flagged_share"]


def test_the_ensemble_scope_runs_through_the_distillation_loop() -> None:
    torch.manual_seed(0)
    teachers = [build_model("cnn_small", 10, 1, (0.3,), (0.4,)) for _ in range(3)]
    defense = ABDDefense(ABDConfig(num_layers=1, sr="off", sv_scope="ensemble"))
    result = distill(teachers, build_model("cnn_small", 10, 1, (0.3,), (0.4,)), ZSKTSynthesizer(batch_size=16, z_dim=8, ngf=8),
                     defense=defense, config=DistillConfig(iterations=4, student_steps=1, batch_size=16),
                     image_shape=(1, 8, 8))
    report = result.defense_report
    assert report["config"]["sv_scope"] == "ensemble"
    assert 0.0 <= report["flagged_share"] <= 1.0
    assert len(report["flag_rate_per_teacher"]) == 3


def test_an_unknown_scope_fails_with_one_line() -> None:
    with pytest.raises(ValueError, match=r"^unknown defense.sv_scope 'all'; choose one of: each, ensemble$"):
        ABDConfig(sv_scope="all")
