"""Attention transfer (ZSKT's student term): maps, stage recording, the loss, the loop option."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from abd_fl.config import ConfigError, validate_config
from abd_fl.distill import DistillConfig, FixedDataSynthesizer, TeacherEnsemble, distill
from abd_fl.distill.attention import StageRecorder, attention_map, attention_transfer_per_sample, recording
from abd_fl.experiment import distill_config
from abd_fl.models import build_model
from abd_fl.models.registry import MODEL_NAMES
from abd_fl.paths import compose_config


def model(name: str = "cnn_small", seed: int = 0, channels: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name, 10, channels, (0.3,) * channels, (0.4,) * channels)


def stages_of(net: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with StageRecorder(net) as rec:
        net(x)
    return rec.outputs


def test_attention_map_is_a_unit_channel_mean_of_squares() -> None:
    f = torch.randn(3, 5, 4, 4)
    a = attention_map(f)
    assert a.shape == (3, 16)
    assert torch.allclose(a.norm(dim=1), torch.ones(3), atol=1e-6)
    manual = f.pow(2).mean(1).flatten(1)
    assert torch.allclose(a, manual / manual.norm(dim=1, keepdim=True), atol=1e-6)
    assert torch.allclose(attention_map(3.0 * f), a, atol=1e-6)  # scale-free
    assert attention_map(f, (2, 2)).shape == (3, 4)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        attention_map(torch.randn(3, 5))


STAGE_WIDTHS = {
    "cnn_small": [16, 32, 32], "cnn": [32, 64, 64], "wrn16_1": [16, 32, 64], "wrn16_2": [32, 64, 128],
    "wrn40_2": [32, 64, 128], "resnet18": [64, 128, 256, 512], "lenet_small": [8, 16], "lenet": [16, 32],
}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_records_its_stages_in_order_and_leaves_no_hook(name: str) -> None:
    net = model(name, channels=3).eval()
    x = torch.rand(2, 3, 16, 16)
    expected = net(x)
    with StageRecorder(net) as rec:
        out = net(x)
    assert torch.equal(out, expected)  # recording does not change the forward pass
    assert len(rec.outputs) == len(net.stage_modules()) >= (2 if name.startswith("lenet") else 3)
    sizes = [o.shape[-1] for o in rec.outputs]
    assert all(o.ndim == 4 and o.shape[0] == 2 for o in rec.outputs)
    assert sizes == sorted(sizes, reverse=True)  # shallow to deep: resolution never grows
    assert [o.shape[1] for o in rec.outputs] == STAGE_WIDTHS[name]  # the stages' own widths
    if not name.startswith("wrn"):  # the digits CNN's and ResNet's stages end in a ReLU (a WRN's groups do not)
        assert all(float(o.detach().min()) >= 0 for o in rec.outputs)
    assert all(not m._forward_hooks for m in net.modules())


def test_the_loss_is_zero_for_the_teacher_itself_and_positive_for_another_model() -> None:
    teacher = model("cnn", seed=1).eval()
    x = torch.rand(8, 1, 8, 8)
    with torch.no_grad():
        t_stages = stages_of(teacher, x)
    same = attention_transfer_per_sample(stages_of(copy.deepcopy(teacher), x), [t_stages])
    assert same.shape == (8,) and float(same.detach().abs().max()) < 1e-10
    student = model("cnn_small", seed=2).eval()
    at = attention_transfer_per_sample(stages_of(student, x), [t_stages])
    assert bool((at > 0).all())
    at.mean().backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in student.parameters())


def test_ensemble_weights_choose_the_teachers_map() -> None:
    t0, t1, student = model("cnn", seed=1).eval(), model("cnn", seed=3).eval(), model("cnn_small", seed=2).eval()
    x = torch.rand(6, 1, 8, 8)
    with torch.no_grad():
        s0, s1, s = stages_of(t0, x), stages_of(t1, x), stages_of(student, x)
    only_first = attention_transfer_per_sample(s, [s0, s1], torch.tensor([1.0, 0.0]))
    assert torch.allclose(only_first, attention_transfer_per_sample(s, [s0]), atol=1e-7)
    mixed = attention_transfer_per_sample(s, [s0, s1])
    assert not torch.allclose(mixed, only_first)
    with pytest.raises(ValueError, match="2 teachers but 3 ensemble weights"):
        attention_transfer_per_sample(s, [s0, s1], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="same number of stages"):
        attention_transfer_per_sample(s, [s0, s1[:2]])


def test_architectures_with_other_stage_counts_and_sizes_pair_their_deepest_stages() -> None:
    student, teacher = model("cnn_small", channels=3).eval(), model("resnet18", channels=3).eval()
    x = torch.rand(4, 3, 8, 8)
    with torch.no_grad():
        t_stages = stages_of(teacher, x)  # 4 stages: 8, 4, 2, 1
    s_stages = stages_of(student, x)  # 3 stages: 8, 4, 2
    at = attention_transfer_per_sample(s_stages, [t_stages])
    assert at.shape == (4,) and bool(torch.isfinite(at).all())
    # the deepest three teacher stages (4, 2, 1) pair with the student's (8, 4, 2), each pooled to the smaller
    manual = sum(
        (attention_map(s, tuple(t.shape[-2:])) - attention_map(t)).pow(2).mean(1) for s, t in zip(s_stages, t_stages[1:])
    )
    assert torch.allclose(at, manual, atol=1e-6)


def test_a_model_without_stages_is_refused_with_one_line() -> None:
    with pytest.raises(ValueError, match="stage_modules"):
        StageRecorder(nn.Linear(3, 2))


def _final_at(student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> float:
    student.eval()
    with torch.no_grad():
        return float(attention_transfer_per_sample(stages_of(student, x), [stages_of(teacher, x)]).mean())


def test_the_loop_option_lowers_the_attention_distance_and_logs_it(one_torch_thread) -> None:
    teacher = model("cnn", seed=1).eval()
    images = torch.rand(256, 1, 8, 8)
    runs = {}
    for beta in (0.0, 250.0):
        student = model("cnn_small", seed=2)
        result = distill(
            [teacher], student, FixedDataSynthesizer(images),
            config=DistillConfig(iterations=30, student_steps=2, batch_size=64, lr=2e-3, log_every=1, attention_beta=beta),
        )
        runs[beta] = (result, _final_at(student, teacher, images))
    (plain, at_plain), (with_at, at_with) = runs[0.0], runs[250.0]
    assert "at_loss" not in plain.history[0]
    logged = [h["at_loss"] for h in with_at.history]
    assert len(logged) == 30 and logged[-1] < 0.5 * logged[0]  # the term decreases
    assert at_with < 0.5 * at_plain  # and the student's maps end closer to the teacher's than without it
    assert math.isfinite(with_at.history[-1]["kd_loss"])


def test_the_loop_option_weights_an_ensemble_of_teachers(one_torch_thread) -> None:
    members = [model("cnn", seed=s).eval() for s in (1, 3, 5)]
    images = torch.rand(64, 1, 8, 8)
    config = DistillConfig(iterations=3, student_steps=2, batch_size=32, log_every=1, attention_beta=10.0)

    def run(teachers) -> tuple[nn.Module, list[dict]]:
        student = model("cnn_small", seed=2)
        result = distill(teachers, student, FixedDataSynthesizer(images), config=config)
        return student, result.history

    weighted, history = run(TeacherEnsemble(members, weights=[2.0, 1.0, 1.0]))
    assert all(math.isfinite(h["at_loss"]) and h["at_loss"] > 0 for h in history)
    first_only, _ = run(TeacherEnsemble(members, weights=[1.0, 0.0, 0.0]))
    alone, _ = run([members[0]])
    for a, b in zip(first_only.state_dict().values(), alone.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)  # a zero weight removes a teacher from KD and AT
    assert not all(
        torch.allclose(a.float(), b.float(), atol=1e-6) for a, b in zip(weighted.state_dict().values(), alone.state_dict().values())
    )


def test_attention_transfer_with_abd_leaves_no_hook_behind(one_torch_thread) -> None:
    from abd_fl.defense import ABDConfig, ABDDefense, SRConfig

    teachers = [model("cnn", seed=s).eval() for s in (1, 3)]
    student = model("cnn_small", seed=2)
    defense = ABDDefense(ABDConfig(num_layers=1, surrogate_batches=2, warmup_fraction=0.25, sr="on", sr_fraction=0.5,
                                   sr_config=SRConfig(n_delta=1, fixed_point_steps=1)))
    result = distill(teachers, student, FixedDataSynthesizer(torch.rand(64, 1, 8, 8)), defense=defense,
                     config=DistillConfig(iterations=4, student_steps=1, batch_size=32, log_every=1, attention_beta=10.0))
    assert result.defense_report["sr_steps"] == 2 and all("at_loss" in h for h in result.history)
    shuffled = [v.shuffled for v in defense._vaccines if v is not None and v.shuffled is not None]
    for net in [student, *teachers, *shuffled]:
        assert all(not m._forward_hooks for m in net.modules())


@pytest.mark.parametrize("bad", [-1.0, float("nan"), True, "x"])
def test_distill_config_refuses_a_bad_beta(bad: object) -> None:
    with pytest.raises(ValueError, match="distill.attention_beta must be a finite number >= 0"):
        DistillConfig(attention_beta=bad)  # type: ignore[arg-type]


def test_the_config_key_reaches_the_loop_and_bad_values_fail_with_one_line() -> None:
    assert distill_config(compose_config([])).attention_beta == 0.0  # off by default: results unchanged
    assert distill_config(compose_config(["distill.attention_beta=250"])).attention_beta == 250.0
    assert compose_config(["experiment=cifar10_paper"])["distill"]["attention_beta"] == 250.0  # the reference ZSKT
    assert compose_config(["experiment=gtsrb_paper"])["distill"]["attention_beta"] == 0.0  # the paper drops it on GTSRB
    with pytest.raises(ConfigError, match=r"^distill.attention_beta must be a finite number >= 0, got -1.0$"):
        validate_config(compose_config(["distill.attention_beta=-1"]))
    with pytest.raises(ConfigError, match=r"^distill.attention_beta must be a finite number >= 0, got inf$"):
        validate_config(compose_config(["distill.attention_beta=inf"]))  # refused before any client trains


def test_recording_activates_several_recorders_and_removes_their_hooks() -> None:
    a, b = model("cnn", seed=1).eval(), model("cnn", seed=3).eval()
    ra, rb = StageRecorder(a), StageRecorder(b)
    x = torch.rand(2, 1, 8, 8)
    with recording([ra, rb]):
        a(x), b(x)
    assert len(ra.outputs) == len(rb.outputs) == 3
    assert all(not m._forward_hooks for net in (a, b) for m in net.modules())
    taken = ra.take()  # handed over once, then forgotten by the recorder
    assert len(taken) == 3 and ra.outputs == [] and ra.take() == []
