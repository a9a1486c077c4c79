"""ABD's Algorithm-2 pipeline through the real distillation loop: both branches (vaccine
found -> SV on, SR off; no vaccine -> SR on), the per-teacher reports, the variants."""

from __future__ import annotations

import pytest
import torch

from abd_fl.defense import ABDConfig, ABDDefense, SRConfig, abd_config_for
from abd_fl.distill import DistillConfig, FixedDataSynthesizer, ZSKTSynthesizer, distill
from abd_fl.models import build_model


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _student(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("cnn_small", 10, 1, (0.3,), (0.4,))


def _mix(setup: dict) -> torch.Tensor:
    return torch.cat([setup["clean_images"], setup["triggered_images"][:25]])  # ~4.8% triggered


def _cfg(**kw) -> ABDConfig:
    # Algorithm 2's verified path with the older surrogate cache (search=verify, surrogate=first)
    base = dict(num_layers=1, surrogate_batches=5, warmup_fraction=0.25, sr_fraction=0.25, search="verify",
                surrogate="first", sr="auto", weights="paper", sr_schedule="constant",
                sr_config=SRConfig(n_delta=2, fixed_point_steps=1, portion=0.1))
    base.update(kw)
    return ABDConfig(**base)


def test_vaccine_found_branch_uses_sv_and_skips_sr(poisoned_digits16: dict) -> None:
    defense = ABDDefense(_cfg())
    teacher = poisoned_digits16["poisoned"]
    result = distill([teacher], _student(), FixedDataSynthesizer(_mix(poisoned_digits16)), defense=defense,
                     config=DistillConfig(iterations=8, student_steps=2, batch_size=128))
    report = result.defense_report
    assert report["vaccines_found"] == 1 and report["teachers"][0]["found"]
    assert report["teachers"][0]["tail_ratio"] > 0.02
    assert report["sr_active"] is False and report["sr_steps"] == 0
    assert report["flagged_share"] is not None and report["flagged_share"] > 0  # SV weights were applied
    # the flagged samples are the triggered ones, mostly: the weights put them down
    x = poisoned_digits16["triggered_images"][:64]
    w = defense.kd_sample_weights(x, teacher(x))
    assert w is not None and float((w < 1).float().mean()) > 0.5
    gen_term = defense.generator_loss_term(x.clone().requires_grad_(True))
    assert gen_term is not None and float(gen_term.detach()) < 0  # -coef * KL on flagged samples


def test_no_vaccine_branch_runs_sr_in_the_late_phase(poisoned_digits16: dict) -> None:
    defense = ABDDefense(_cfg(threshold=1.0, max_tries=2))
    result = distill([poisoned_digits16["clean"]], _student(), FixedDataSynthesizer(_mix(poisoned_digits16)), defense=defense,
                     config=DistillConfig(iterations=8, student_steps=2, batch_size=64))
    report = result.defense_report
    assert report["vaccines_found"] == 0 and report["teachers"][0]["tries"] == 2
    assert report["sr_active"] is True
    assert report["sr_steps"] == 2 * 2  # last 25% of 8 iterations x 2 student steps
    assert report["sr_kl_mean"] is not None and report["sr_kl_mean"] >= 0
    assert result.history[-1]["late_phase"] == 1.0
    x = poisoned_digits16["clean_images"][:8]
    assert defense.generator_loss_term(x) is None and defense.kd_sample_weights(x, torch.zeros(8, 10)) is None


def test_per_teacher_vaccines_in_an_ensemble_and_downweighting(poisoned_digits16: dict) -> None:
    from abd_fl.distill import TeacherEnsemble

    ens = TeacherEnsemble([poisoned_digits16["clean"], poisoned_digits16["poisoned"]])
    defense = ABDDefense(_cfg(downweight_suspicious=True, downweight_factor=0.1))
    result = distill(ens, _student(), FixedDataSynthesizer(_mix(poisoned_digits16)), defense=defense,
                     config=DistillConfig(iterations=4, student_steps=1, batch_size=128))
    teachers = result.defense_report["teachers"]
    assert len(teachers) == 2 and all(t["searched"] for t in teachers)  # one vaccine search per teacher
    assert teachers[1]["found"]
    expected = torch.tensor([0.1 if t["found"] else 1.0 for t in teachers])
    if not all(t["found"] for t in teachers):  # down-weighting applies when the search singles teachers out
        assert torch.allclose(ens.weights, expected / expected.sum())
    else:
        assert torch.allclose(ens.weights, torch.tensor([0.5, 0.5]))


def test_zskt_with_abd_runs_the_generator_hook() -> None:
    teacher = _student(5)
    defense = ABDDefense(_cfg(threshold=0.0, num_layers=1))
    result = distill([teacher], _student(), ZSKTSynthesizer(batch_size=16), defense=defense,
                     config=DistillConfig(iterations=4, student_steps=1, batch_size=16), image_shape=(1, 8, 8))
    assert result.defense_report["teachers"][0]["searched"] and result.defense_s > 0


def test_named_variants_and_validation() -> None:
    assert abd_config_for("none") is None
    sv, sr, abd = abd_config_for("sv"), abd_config_for("sr"), abd_config_for("abd")
    assert sv.use_sv and sv.sr == "off"
    assert not sr.use_sv and sr.sr == "on"
    assert abd.use_sv and abd.sr == "on" and abd.search == "off"  # the reference's CIFAR-10 runs: SV unverified, then SR
    with pytest.raises(ValueError, match="unknown defense 'xyz'"):
        abd_config_for("xyz")
    with pytest.raises(ValueError, match="defense.sr_fraction must be in"):
        ABDConfig(sr_fraction=1.5)
    with pytest.raises(ValueError, match="unknown defense.weights 'soft'"):
        ABDConfig(weights="soft")


def test_sr_only_variant_never_searches(poisoned_digits16: dict) -> None:
    defense = ABDDefense(abd_config_for("sr", sr_fraction=0.5, sr_config={"n_delta": 1, "fixed_point_steps": 1}))
    result = distill([poisoned_digits16["poisoned"]], _student(), FixedDataSynthesizer(poisoned_digits16["clean_images"]),
                     defense=defense, config=DistillConfig(iterations=4, student_steps=1, batch_size=32))
    assert result.defense_report["teachers"] == [{"searched": False}]
    assert result.defense_report["sr_steps"] == 2


class _CountingSynthesizer(FixedDataSynthesizer):
    """Fixed data whose every batch is filled with its own index, so a cached batch says when it was drawn."""

    def __init__(self) -> None:
        super().__init__(torch.zeros(16, 1, 8, 8))
        self.drawn = 0

    def sample(self, batch_size: int) -> torch.Tensor:
        self.drawn += 1
        return torch.full((batch_size, 1, 8, 8), float(self.drawn) / 1000)


class _RecordingABD(ABDDefense):
    def _search(self) -> None:
        self.searched_on = [round(float(b[0, 0, 0, 0]) * 1000) for b in self._cache]
        super()._search()


@pytest.mark.parametrize("mode, expected", [("first", [1, 2, 3]), ("latest", [8, 9, 10])])
def test_the_vaccine_search_uses_the_first_or_the_latest_inputs(mode: str, expected: list[int]) -> None:
    # 10 iterations x 2 student steps; the search is at iteration 5 (warm-up 50%), after 10 batches
    defense = _RecordingABD(_cfg(surrogate=mode, surrogate_batches=3, warmup_fraction=0.5, sr="off"))
    distill([_student(1)], _student(), _CountingSynthesizer(), defense=defense,
            config=DistillConfig(iterations=10, student_steps=2, batch_size=4))
    assert defense.searched_on == expected


def test_an_unknown_surrogate_mode_fails_with_one_line() -> None:
    with pytest.raises(ValueError, match="unknown defense.surrogate 'middle'; choose one of: window, first, latest"):
        ABDConfig(surrogate="middle")


@pytest.mark.parametrize("mode", ["first", "latest"])
def test_a_short_cache_is_topped_up_with_fresh_samples_at_the_search(mode: str) -> None:
    # 2 batches seen before the search at iteration 1, 5 wanted: 3 fresh ones are drawn then
    defense = _RecordingABD(_cfg(surrogate=mode, surrogate_batches=5, warmup_fraction=0.1, sr="off"))
    distill([_student(1)], _student(), _CountingSynthesizer(), defense=defense,
            config=DistillConfig(iterations=10, student_steps=2, batch_size=4))
    assert defense.searched_on == [1, 2, 3, 4, 5]
