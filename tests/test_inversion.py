"""Targeted retrospection (``abd_fl.defense.inversion``) and ``defense=abd_ti``: the trigger is
found where it was planted, the data-free decision, purified teacher inputs through the real
loop, the class-balance term, and nothing switched on without a backdoor."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from abd_fl.defense import ABDConfig, ABDDefense
from abd_fl.defense.inversion import (
    InvertedTrigger,
    invert_trigger,
    prune_mask,
    purify,
    scan_classes,
    suspect_class,
    trigger_flip_rate,
)
from abd_fl.distill import DistillConfig, FixedDataSynthesizer, distill
from abd_fl.distill.ensemble import TeacherEnsemble
from abd_fl.distill.hooks import DistillContext, NullDefense
from abd_fl.models import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PATCH = (slice(5, 7), slice(5, 7))  # a 2x2 patch one pixel from the bottom-right corner of 8x8


class Planted(nn.Module):
    """A fixed random linear classifier over 8x8 pixels with a planted backdoor: any bright
    pixel of the 2x2 patch at ``PATCH`` adds a large logit to ``target`` (``backdoor=False``:
    none). A natural class takes ~4-8 changed pixels, the backdoor one."""

    def __init__(self, target: int = 0, backdoor: bool = True, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(10, 64, generator=g) * 0.15, requires_grad=False)
        self.target, self.backdoor = target, backdoor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = (x.flatten(1) - 0.5) @ self.weight.t()
        if self.backdoor:
            patch = x[:, :, PATCH[0], PATCH[1]].amax((1, 2, 3))
            bonus = 40 * torch.sigmoid(40 * (patch - 0.95))
            logits = logits + bonus[:, None] * nn.functional.one_hot(torch.tensor(self.target), 10).to(x)
        return logits


def _samples(n: int = 512, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def _patch_mask() -> torch.Tensor:
    m = torch.zeros(1, 1, 8, 8)
    m[0, 0, PATCH[0], PATCH[1]] = 1
    return m


def test_the_inverted_and_pruned_trigger_lies_in_the_planted_patch() -> None:
    model, x = Planted(target=3), _samples()
    trig = invert_trigger(model, x, 3, steps=150, seed=0)
    assert trig.flip >= 0.9
    pruned = prune_mask(model, x, trig, budget=1)
    assert pruned.mask.shape == (1, 1, 8, 8) and set(pruned.mask.unique().tolist()) <= {0.0, 1.0}
    assert pruned.pixels == 1 and bool((pruned.mask <= _patch_mask()).all())  # one patch pixel is the trigger
    assert pruned.pruned_flip >= 0.8 * 0.9 and pruned.flip_at_budget == pytest.approx(pruned.pruned_flip)
    assert trigger_flip_rate(model, x, pruned) == pytest.approx(pruned.pruned_flip)
    assert trigger_flip_rate(Planted(target=3, backdoor=False), x, pruned) < 0.2  # a model without the backdoor


def test_the_scan_suspects_the_planted_class_and_nothing_without_a_backdoor() -> None:
    x = _samples()
    scans = scan_classes(Planted(target=3), x, range(10), steps=150, budget=2)
    found, ratio = suspect_class(scans)
    assert found is not None and found.target == 3 and ratio >= 2.0 and found.flip_at_budget >= 0.9
    clean_scans = scan_classes(Planted(backdoor=False), x, range(10), steps=150, budget=2)
    none, clean_ratio = suspect_class(clean_scans)
    assert none is None and max(t.flip_at_budget for t in clean_scans) < 0.6


def _trig(target: int, rate: float) -> InvertedTrigger:
    return InvertedTrigger(target, torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), 0.0, 0.9, 4, 0.9, rate)


def test_the_decision_rule_compares_the_best_few_pixel_flip_rate_with_the_median_class() -> None:
    rates = [0.3, 0.35, 0.4, 0.25, 0.3, 0.2, 0.5, 0.3, 0.3, 0.3]
    found, ratio = suspect_class([_trig(c, 0.85 if c == 4 else r) for c, r in enumerate(rates)])
    assert found is not None and found.target == 4 and ratio == pytest.approx(0.85 / 0.3)
    none, ratio = suspect_class([_trig(c, r) for c, r in enumerate(rates)])  # the best natural class: 0.5 < 0.6
    assert none is None and ratio == pytest.approx(0.5 / 0.3)
    # a high rate that every class reaches is no backdoor
    assert suspect_class([_trig(c, 0.8 if c else 0.9) for c in range(10)])[0] is None
    assert suspect_class([_trig(0, 0.7)] + [_trig(c, 0.0) for c in range(1, 10)])[0].target == 0  # median 0: ratio inf
    assert suspect_class([])[0] is None


def test_inpainting_fills_a_corner_patch_with_background_and_keeps_a_stroke() -> None:
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, :, 3] = 1.0  # a vertical stroke
    x[0, 0, 5:7, 5:7] = 1.0  # the trigger
    mask = _patch_mask()
    mask[0, 0, 4, 3] = 1  # a stray mask pixel on the stroke
    out = purify(x, mask)
    assert torch.equal(out[0, 0, 5:7, 5:7], torch.zeros(2, 2))  # its unmasked neighbours are background
    assert float(out[0, 0, 4, 3]) == pytest.approx(2 / 8)  # the stroke pixel keeps part of its neighbours' ink
    assert torch.equal(out[mask.expand_as(x) == 0], x[mask.expand_as(x) == 0])
    with pytest.raises(ValueError, match="unknown purify fill"):
        purify(x, mask, "blur")


def test_purify_replaces_only_the_mask_pixels() -> None:
    x = _samples(4)
    out = purify(x, _patch_mask(), 0.0)
    assert torch.equal(out[:, :, PATCH[0], PATCH[1]], torch.zeros(4, 1, 2, 2))
    keep = _patch_mask() == 0
    assert torch.equal(out[keep.expand_as(x)], x[keep.expand_as(x)])
    fill = torch.full((1, 1, 8, 8), 0.25)
    assert torch.allclose(purify(x, _patch_mask(), fill)[:, :, 5, 5], torch.full((4, 1), 0.25))


def _ti_config(**kw) -> ABDConfig:
    base = dict(use_sv=False, sr="off", inversion="on", inversion_at=[0.5], inversion_follow=0.25, inversion_batches=4,
                inversion_steps=150,
                inversion_batch_size=128, inversion_budget=1 / 64, class_balance=0.0, purify_fill="zero")
    base.update(kw)
    return ABDConfig(**base)


def test_a_found_trigger_purifies_what_the_teachers_see_in_the_loop() -> None:
    """A backdoored 'student' (the planted model, which the defense scans) and a teacher that
    records its inputs: after the inversion iteration the teacher sees the patch blanked,
    before it the raw samples; the student keeps seeing raw samples."""
    seen: list[torch.Tensor] = []

    class Recorder(Planted):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x.detach().clone())
            return super().forward(x)

    planted = Planted(target=3)
    student_inputs: list[torch.Tensor] = []

    class FrozenStudent(nn.Module):  # the planted backdoor, plus one trainable scalar so the loop can step
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.training:  # the loop's KD steps (the inversion scans the student in eval mode)
                student_inputs.append(x.detach())
            return planted(x) * self.scale

    defense = ABDDefense(_ti_config())
    images = _samples(512)
    images[::2, :, PATCH[0], PATCH[1]] = 1.0  # half the samples carry the trigger: the teacher's view shows the purification
    ensemble = TeacherEnsemble([Recorder(target=3)])
    result = distill(ensemble, FrozenStudent(), FixedDataSynthesizer(images), defense=defense,
                     config=DistillConfig(iterations=4, student_steps=1, batch_size=128, log_every=1))
    report = result.defense_report["inversion"]
    assert report["suspects"] == [3, 3] and report["purify_pixels"] >= 1
    inv, follow = report["scans"]
    assert inv["suspect"] == 3 and inv["iteration"] == 2 and inv["samples"] == 2 * 128  # the batches of iterations 0-1
    assert not inv["follow_up"] and inv["ratio"] >= 2.0
    # the student keeps its backdoor, so the follow-up at iteration 3 rescans class 3 alone and finds it again
    assert follow["follow_up"] and follow["iteration"] == 3 and [c["class"] for c in follow["classes"]] == [3]
    assert set(map(tuple, inv["mask"] + follow["mask"])) <= {(5, 5), (5, 6), (6, 5), (6, 6)}
    assert result.defense_report["teachers"][0]["trigger_flip"] > 0.5
    (r, k), = inv["mask"][:1]
    assert float(seen[0][:, :, r, k].max()) == 1.0 and float(seen[-1][:, :, r, k].max()) == 0.0  # raw first, purified last
    assert len(student_inputs) == 4 and all(float(s[:, :, r, k].max()) == 1.0 for s in student_inputs)  # raw x
    # the hook is gone after the run: the same ensemble sees the raw input again
    assert not ensemble._forward_pre_hooks
    ensemble(images[:1])
    assert float(seen[-1][0, 0, r, k]) == 1.0
    with pytest.raises(RuntimeError, match="serves one distill"):  # a defense is not reused across runs
        distill(ensemble, FrozenStudent(), FixedDataSynthesizer(images), defense=defense,
                config=DistillConfig(iterations=1, student_steps=1, batch_size=8))
    assert not ensemble._forward_pre_hooks  # ... and the hook is removed when a run fails


def test_without_a_backdoor_nothing_is_switched_on() -> None:
    defense = ABDDefense(_ti_config(inversion_at=[0.25, 0.5]))
    clean = Planted(backdoor=False)
    defense.on_distill_start(DistillContext(teachers=[clean], ensemble=clean, student=clean, device=torch.device("cpu"),
                                            total_iterations=4, sample_surrogate=lambda: _samples(128)))
    for it in range(4):
        defense.on_iteration(it)
        x = _samples(128, seed=10 + it)
        defense.kd_sample_weights(x, clean(x))
    report = defense.report()
    scans = report["inversion"]["scans"]
    assert [s["suspect"] for s in scans] == [None, None] and len(scans[0]["classes"]) == 10  # two full scans, nothing
    assert report["inversion"]["purify_pixels"] is None and report["teachers"][0]["trigger_flip"] == 0.0
    x = _samples(8)
    assert defense.teacher_input(x) is x


def test_the_class_balance_term_is_minus_coef_times_the_entropy_of_the_mean_prediction() -> None:
    teacher = build_model("cnn_small", 10, 1, (0.3,), (0.4,)).eval()
    defense = ABDDefense(ABDConfig(use_sv=False, sr="off", class_balance=0.3))
    defense.on_distill_start(DistillContext(teachers=[teacher], ensemble=teacher, student=teacher,
                                            device=torch.device("cpu"), total_iterations=10,
                                            sample_surrogate=lambda: _samples(16)))
    x = _samples(32).requires_grad_(True)
    term = defense.generator_loss_term(x)
    p = torch.softmax(teacher(x), 1).mean(0)
    assert float(term.detach()) == pytest.approx(-0.3 * float(-(p * p.log()).sum()), rel=1e-5)
    term.backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0  # it trains the generator through the teacher
    assert ABDDefense(ABDConfig(use_sv=False, sr="off")).generator_loss_term(x) is None  # off by default


def test_inversion_at_accepts_a_hydra_list_and_the_ablation_arms_drop_our_additions() -> None:
    from omegaconf import OmegaConf

    from abd_fl.defense import abd_config_for

    assert ABDConfig(inversion_at=OmegaConf.create([0.6, 0.3])).inversion_at == [0.3, 0.6]
    ti = dict(use_sv=False, sr="off", class_balance=0.1, inversion="on")
    sv, sr = abd_config_for("sv", **ti), abd_config_for("sr", **ti)
    assert (sv.use_sv, sv.sr, sv.inversion, sv.class_balance) == (True, "off", "off", 0.0)
    assert (sr.use_sv, sr.sr, sr.inversion, sr.class_balance) == (False, "on", "off", 0.0)
    assert abd_config_for("abd_ti", **ti).inversion == "on"


def test_the_null_defense_leaves_teacher_inputs_alone() -> None:
    x = _samples(2)
    assert NullDefense().teacher_input(x) is x


@pytest.mark.parametrize("key,value", [("class_balance", -0.1), ("class_balance", float("nan")), ("inversion", "maybe"),
                                       ("inversion_at", [0.3, 1.5]), ("inversion_at", []), ("inversion_steps", 0),
                                       ("purify_fill", "noise"), ("inversion_min_ratio", -1), ("inversion_budget", 0),
                                       ("inversion_keep", 1.5), ("use_sv", "false"),
                                       ("inversion_follow", 0)])
def test_bad_settings_fail_with_one_line(key: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"defense.{key}") as err:
        ABDConfig(**{key: value})
    assert "\n" not in str(err.value)


def _greedy_reference(model: nn.Module, samples: torch.Tensor, trig: InvertedTrigger, keep: float, budget: int):
    """The exact greedy path of ``prune_mask``, written out pixel by pixel (one flip rate per trial)."""
    target = trig.target
    source = samples[model(samples).argmax(1) != target]

    def rate(m: torch.Tensor) -> float:
        return float((model((1 - m) * source + m * trig.pattern).argmax(1) == target).float().mean())

    mask = (trig.mask > 0.5).float()
    full = rate(mask)
    chosen, at_budget = mask.clone(), full
    while int(mask.sum()) > 1:
        trials = []
        for r, c in mask[0, 0].nonzero().tolist():
            t = mask.clone()
            t[0, 0, r, c] = 0
            trials.append((rate(t), (r, c)))
        best = max(trials, key=lambda t: t[0])  # the first of equal rates
        mask[0, 0, best[1][0], best[1][1]] = 0
        if best[0] >= keep * full:
            chosen = mask.clone()
        if int(mask.sum()) == budget:
            at_budget = best[0]
        if best[0] < keep * full and int(mask.sum()) <= budget:
            break
    return chosen, at_budget


@pytest.mark.parametrize("budget", [1, 4])
def test_pruning_a_small_mask_follows_the_exact_greedy_path(budget: int) -> None:
    model, x = Planted(target=3), _samples()
    gen = torch.Generator().manual_seed(5)
    mask = (torch.rand(1, 1, 8, 8, generator=gen) > 0.6).float()  # ~25 pixels, some in the patch
    mask[0, 0, 5, 5] = 1
    trig = InvertedTrigger(3, mask, torch.ones(1, 1, 8, 8), float(mask.sum()), 1.0)
    with torch.no_grad():
        want_mask, want_at_budget = _greedy_reference(model, x, trig, keep=0.8, budget=budget)
        got = prune_mask(model, x, trig, keep=0.8, budget=budget)
    assert torch.equal(got.mask, want_mask) and got.flip_at_budget == pytest.approx(want_at_budget)


class Planted28(nn.Module):
    """``Planted`` at 28x28: a 3x3 patch at rows/columns 20-22 flips to ``target``; counts its calls."""

    def __init__(self, target: int = 7) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(10, 784, generator=g) * 0.05, requires_grad=False)
        self.target, self.calls = target, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        logits = (x.flatten(1) - 0.5) @ self.weight.t()
        patch = x[:, :, 20:23, 20:23].amax((1, 2, 3))
        bonus = 40 * torch.sigmoid(40 * (patch - 0.95))
        return logits + bonus[:, None] * nn.functional.one_hot(torch.tensor(self.target), 10).to(x)


def test_pruning_a_large_28x28_mask_halves_it_first_and_still_lands_in_the_patch() -> None:
    model = Planted28()
    x = torch.rand(400, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(1, 1, 28, 28)
    mask[0, 0, 8:24, 8:24] = 1  # 256 pixels: the patch and 247 stroke-like extras
    trig = InvertedTrigger(7, mask, torch.ones(1, 1, 28, 28), 256.0, 1.0)
    pruned = prune_mask(model, x, trig, budget=4)
    patch = torch.zeros_like(mask)
    patch[0, 0, 20:23, 20:23] = 1
    assert 1 <= pruned.pixels <= 4 and bool((pruned.mask <= patch).all())
    assert pruned.pruned_flip >= 0.8 * 0.99 and pruned.flip_at_budget >= 0.8
    # the exact greedy path from 256 pixels would take ~256^2/2 = 32,768 passes; halving to 64 first
    # costs one batched pass per 4 trial masks there, then the exact path from 64 pixels
    assert model.calls < 64 * 65 // 2 + 200
