"""KD loss, teacher ensemble, synthesizers and the distillation loop's defense hooks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from abd_fl.distill import (
    DENSESynthesizer,
    DistillConfig,
    FixedDataSynthesizer,
    NullDefense,
    TeacherEnsemble,
    ZSKTSynthesizer,
    build_synthesizer,
    distill,
    kd_kl_per_sample,
    kd_loss,
)
from abd_fl.distill.synthesizers.dense import BNStatisticsLoss
from abd_fl.models import build_model

SHAPE = (1, 8, 8)


def tiny_model(seed: int = 0, name: str = "cnn_small") -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name, 10, 1, (0.3,), (0.4,))


def test_kd_loss_is_zero_for_equal_logits_and_positive_otherwise() -> None:
    t = torch.randn(6, 10)
    assert torch.allclose(kd_kl_per_sample(t, t), torch.zeros(6), atol=1e-6)
    s = torch.randn(6, 10)
    per = kd_kl_per_sample(s, t, temperature=2.0)
    assert per.shape == (6,) and bool((per > 0).all())
    manual = 4.0 * (torch.softmax(t / 2, 1) * (torch.log_softmax(t / 2, 1) - torch.log_softmax(s / 2, 1))).sum(1)
    assert torch.allclose(per, manual, atol=1e-5)
    w = torch.tensor([1.0, 0, 0, 0, 0, 0])
    assert math.isclose(float(kd_loss(s, t, 2.0, w)), float(per[0]) / 6, rel_tol=1e-5)


def test_ensemble_averages_logits_with_weights_and_stays_frozen() -> None:
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    ens = TeacherEnsemble([a, b], rule="mean_logits")
    x = torch.randn(5, 4)
    assert torch.allclose(ens(x), (a(x) + b(x)) / 2, atol=1e-6)
    ens.set_weights([3.0, 1.0])
    assert torch.allclose(ens(x), 0.75 * a(x) + 0.25 * b(x), atol=1e-6)
    ens.train()
    assert not ens.training and not any(p.requires_grad for p in ens.parameters())
    with pytest.raises(ValueError, match="ensemble weights"):
        ens.set_weights([1.0])
    with pytest.raises(ValueError, match="at least one teacher"):
        TeacherEnsemble([])


@pytest.mark.parametrize("name", ["zskt", "dense"])
def test_synthesizers_produce_images_of_the_right_shape(name: str) -> None:
    params = {"batch_size": 16} if name == "zskt" else {"batch_size": 16, "g_steps": 2}
    synth = build_synthesizer(name, **params)
    synth.setup(TeacherEnsemble([tiny_model(1)]), tiny_model(2), SHAPE, torch.device("cpu"))
    logs = synth.generator_round(0)
    x = synth.sample(12)
    assert x.shape == (12, *SHAPE) and not x.requires_grad
    assert math.isfinite(logs["generator_loss"])


def test_unknown_synthesizer_and_bad_params_fail_clearly() -> None:
    with pytest.raises(ValueError, match="unknown synthesizer 'gan'; choose one of: zskt, dense"):
        build_synthesizer("gan")
    with pytest.raises(ValueError, match="bad parameters for synthesizer 'zskt'"):
        build_synthesizer("zskt", nonsense=1)


def test_bn_statistics_loss_decreases_when_optimising_inputs() -> None:
    teacher = tiny_model(3)
    teacher.eval()
    loss_fn = BNStatisticsLoss([teacher])
    x = torch.rand(32, *SHAPE, requires_grad=True)
    opt = torch.optim.Adam([x], lr=0.1)
    values = []
    for _ in range(60):
        loss_fn.reset()
        teacher(x)
        loss = loss_fn.value()
        values.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    loss_fn.remove()
    assert values[-1] < 0.8 * values[0]


def test_bn_statistics_loss_needs_batchnorm() -> None:
    with pytest.raises(ValueError, match="BatchNorm2d"):
        BNStatisticsLoss([nn.Linear(3, 3)])


def test_dense_pool_grows_and_is_capped() -> None:
    synth = DENSESynthesizer(batch_size=8, g_steps=1, max_pool_size=20)
    synth.setup(TeacherEnsemble([tiny_model(1)]), tiny_model(2), SHAPE, torch.device("cpu"))
    sizes = [synth.generator_round(i)["pool_size"] for i in range(4)]
    assert sizes[:2] == [8.0, 16.0] and max(sizes) <= 24 and sizes[-1] <= 20 + 8


def test_distillation_on_real_inputs_reduces_the_kd_loss() -> None:
    teacher, student = tiny_model(4, "cnn"), tiny_model(5)
    data = torch.rand(64, *SHAPE)
    with torch.no_grad():
        before = float(kd_kl_per_sample(student.eval()(data), teacher.eval()(data)).mean())
    distill([teacher], student, FixedDataSynthesizer(data), config=DistillConfig(iterations=20, student_steps=5, batch_size=32))
    with torch.no_grad():
        after = float(kd_kl_per_sample(student(data), teacher(data)).mean())
    assert after < 0.5 * before


class RecordingDefense(NullDefense):
    """Records every hook call; flags the first half of each batch with weight 0."""

    def __init__(self) -> None:
        self.late_phase_fraction = 0.25
        self.late_phase_lr = 1e-4
        self.calls: dict[str, int] = {"start": 0, "gen": 0, "weights": 0, "late": 0}
        self.ctx = None

    def on_distill_start(self, ctx) -> None:
        self.calls["start"] += 1
        self.ctx = ctx
        assert ctx.sample_surrogate().shape[1:] == SHAPE

    def generator_loss_term(self, x):
        self.calls["gen"] += 1
        return 0.0 * x.sum()

    def kd_sample_weights(self, x, teacher_logits):
        self.calls["weights"] += 1
        w = torch.ones(x.shape[0])
        w[: x.shape[0] // 2] = 0
        return w

    def add_student_gradient(self, student, x) -> None:
        self.calls["late"] += 1
        for p in student.parameters():
            if p.grad is not None:
                p.grad.add_(0.0)

    def report(self):
        return {"calls": dict(self.calls)}


def test_loop_calls_every_defense_hook_at_the_right_time() -> None:
    defense = RecordingDefense()
    cfg = DistillConfig(iterations=8, student_steps=3, batch_size=16)
    result = distill(
        [tiny_model(1)], tiny_model(2), ZSKTSynthesizer(batch_size=16), defense=defense, config=cfg, image_shape=SHAPE
    )
    assert defense.calls["start"] == 1
    assert defense.calls["gen"] == 8  # one generator step per iteration
    assert defense.calls["weights"] == 8 * 3
    assert defense.calls["late"] == 2 * 3  # last 25% of 8 iterations, every student step
    assert result.defense_report == {"calls": defense.calls}
    assert result.history[-1]["late_phase"] == 1.0
    assert result.defense_s >= 0 and result.wall_s > 0


def test_loop_without_defense_and_config_validation() -> None:
    with pytest.raises(ValueError, match="distill.lr must be > 0"):
        DistillConfig(lr=0)
    with pytest.raises(ValueError, match="distill.student_steps"):
        DistillConfig(student_steps=0)
    student = tiny_model(2)
    result = distill([tiny_model(1)], student, DENSESynthesizer(batch_size=8, g_steps=1), config=DistillConfig(iterations=2, student_steps=1, batch_size=8), image_shape=SHAPE)
    assert result.defense_report == {} and not student.training
