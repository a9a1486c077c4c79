"""Parity with the reference's runs (illidanlab/ABD ``zskt/solver.py``, ``zskt/utils/hypergrad.py``,
``zskt/utils/syn_vaccine.py``, ``zskt/sweeps/*_defense.yml``; DESIGN.md Sec. 4): each test pins
one scale or schedule of the defaults against a computation written here from the reference's
formulas, independently of the module under test."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.functional import jacobian
from torch.optim.optimizer import register_optimizer_step_pre_hook

from abd_fl.defense import ABDConfig, ABDDefense, SRConfig
from abd_fl.defense.retrospection import sr_hypergradient, synthesize_delta
from abd_fl.distill import DistillConfig, FixedDataSynthesizer, ZSKTSynthesizer, distill
from abd_fl.distill.synthesizers.base import Synthesizer
from abd_fl.models import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- SR: the hypergradient at the reference's scale ---------------------------------------


def _tiny_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.Tanh(), nn.Linear(6, 4)).double()


def _functional(model: nn.Module):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    numels = [p.numel() for _, p in model.named_parameters()]
    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()

    def call(theta: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        params = {n: c.view(s) for n, c, s in zip(names, theta.split(numels), shapes)}
        return torch.func.functional_call(model, params, (inputs,))

    return call, theta0


def _reference_pieces(model: nn.Module, x: torch.Tensor, delta: torch.Tensor, idx: torch.Tensor, gamma: float, l2: float):
    """The reference's losses, verbatim in form: every KL is ``F.kl_div(log_softmax(per),
    softmax(clean).detach(), reduction="mean")`` (a mean over batch x classes).

    outer(delta, theta) = KL_mean(S(x) || S(x + patch)), patch = delta on rows ``idx`` only
    inner(delta, theta) = -KL_mean(S(x) || S(x + delta)) + l2 ||delta||^2
    map(delta, theta)   = delta - gamma * d inner / d delta       (hg.GradientDescent)
    Returns A = dmap/ddelta, B = dmap/dtheta, g_delta, g_theta (outer partials) as matrices.
    """
    call, theta0 = _functional(model)
    shape = x.shape[1:]

    def kl_mean(theta: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        clean = call(theta, x).detach()
        return F.kl_div(F.log_softmax(call(theta, inputs), dim=1), F.softmax(clean, dim=1), reduction="mean")

    def outer(d: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        patch = torch.zeros_like(x)
        patch[idx] = d.view(shape)
        return kl_mean(theta, x + patch)

    def fp_map(d: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            d = d if d.requires_grad else d.detach().requires_grad_(True)
            inner = -kl_mean(theta, x + d.view(1, *shape)) + l2 * d.pow(2).sum()
            (g,) = torch.autograd.grad(inner, d, create_graph=True)
        return d - gamma * g

    d0 = delta.detach().reshape(-1).clone()
    a = jacobian(lambda d: fp_map(d, theta0), d0)
    b = jacobian(lambda t: fp_map(d0, t), theta0)
    g_d = jacobian(lambda d: outer(d, theta0), d0)
    g_t = jacobian(lambda t: outer(d0, t), theta0)
    return a, b, g_d, g_t


def test_sr_direct_and_implicit_terms_equal_the_reference_formulas() -> None:
    model = _tiny_mlp()
    x = torch.rand(50, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cfg = SRConfig(delta_source="student", bn_mode="eval")  # reference scale and series; no BN in this model
    assert (cfg.reduction, cfg.fixed_point_start, cfg.fixed_point_steps, cfg.portion) == ("reference", "zero", 5, 0.02)
    delta = synthesize_delta(model, x, cfg, seed=0) * 20  # a sizeable perturbation
    got = torch.cat([g.reshape(-1) for g in sr_hypergradient(model, x, delta, cfg, torch.Generator().manual_seed(7))])

    idx = torch.randperm(50, generator=torch.Generator().manual_seed(7))[:1]  # int(50 * 0.02) = 1 patched row
    a, b, g_d, g_t = _reference_pieces(model, x, delta, idx, cfg.fixed_point_lr, cfg.delta_l2)
    v = torch.zeros_like(g_d)  # hypertorch fixed_point: v_0 = 0, then K times v <- A^T v + g_delta
    for _ in range(cfg.fixed_point_steps):
        v = a.T @ v + g_d
    expected = g_t + b.T @ v
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-8)

    implicit = b.T @ v
    # At the reference's scale the fixed-point step (0.1 on a batch x class mean) is tiny, so the
    # implicit term is a small correction to the direct one -- but it is there, and pinned:
    assert 1e-12 < float(implicit.norm()) < 1e-2 * float(g_t.norm())
    one_more = g_t + b.T @ (a.T @ v + g_d)  # a series from v_0 = g_delta (K + 1 terms) differs
    assert float((one_more - got).norm()) > 0.05 * float(implicit.norm()) > 1e3 * 1e-12
    # our earlier scale (class sums, mean over the patched rows) is ~N*K/m = 200x the reference's direct term
    ours = torch.cat([g.reshape(-1) for g in sr_hypergradient(
        model, x, delta, SRConfig(delta_source="student", bn_mode="eval", reduction="portion", fixed_point_start="zero"),
        torch.Generator().manual_seed(7))])
    assert 50.0 < float(ours.norm() / got.norm()) < 1000.0


def test_delta_from_the_teacher_keeps_the_teacher_in_eval_mode() -> None:
    torch.manual_seed(0)
    teacher = build_model("cnn_small", 10, 1, (0.3,), (0.4,)).eval()
    stats = [b.clone() for b in teacher.buffers()]
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    delta = synthesize_delta(teacher, x, SRConfig(), seed=0, bn_mode="eval")
    assert delta.shape == (1, 1, 8, 8) and float(delta.abs().max()) > 0
    assert not teacher.training and all(torch.equal(a, b) for a, b in zip(stats, teacher.buffers()))


# ---- SV: the surrogate window and gating ---------------------------------------------------


class _MarkedSynthesizer(Synthesizer):
    """Every batch is filled with a code: 1000 * iteration + step (step 0 = the generator step)."""

    def _setup(self) -> None:
        self.it, self.step = -1, 0

    def generator_round(self, iteration: int) -> dict[str, float]:
        self.it, self.step = iteration, 0
        x = torch.full((4, 1, 8, 8), self._code()).requires_grad_(True)
        term = self._add_defense_term(torch.zeros(()), x)  # the defense sees the generator step's batch
        return {"term": float(term.detach())}

    def _code(self) -> float:
        return (1000 * self.it + self.step) / 1e5

    def sample(self, batch_size: int) -> torch.Tensor:
        self.step += 1
        return torch.full((batch_size, 1, 8, 8), self._code())


class _CacheSpy(ABDDefense):
    def _search(self) -> None:
        self.seen = [(round(float(b[0, 0, 0, 0]) * 1e5), c) for b, c in zip(self._cache, self._counts)]
        super()._search()


def _student(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("cnn_small", 10, 1, (0.3,), (0.4,))


def test_the_surrogate_cache_holds_exactly_the_configured_window() -> None:
    defense = _CacheSpy(ABDConfig(search="verify", surrogate_start=2, surrogate_stop=5, num_layers=1, max_tries=1, sr="off"))
    distill([_student(1)], _student(), _MarkedSynthesizer(), defense=defense,
            config=DistillConfig(iterations=12, student_steps=3, batch_size=4), image_shape=(1, 8, 8))
    expected = [(1000 * it + step, 1) for it in range(2, 5) for step in range(4)]  # generator + 3 student batches
    assert defense.seen == expected


def test_a_repeated_batch_is_stored_once_and_counted() -> None:
    defense = _CacheSpy(ABDConfig(search="verify", surrogate_start=1, surrogate_stop=3, num_layers=1, max_tries=1, sr="off"))
    synth = ZSKTSynthesizer(batch_size=8, z_dim=8, ngf=8)
    distill([_student(1)], _student(), synth, defense=defense,
            config=DistillConfig(iterations=8, student_steps=3, batch_size=8), image_shape=(1, 8, 8))
    # per iteration: the generator step's batch once, then one z's images reused for the 3 student steps
    assert [c for _, c in defense.seen] == [1, 3, 1, 3]


def test_with_search_off_the_regulariser_acts_from_step_zero_and_during_sr() -> None:
    defense = ABDDefense(ABDConfig(num_layers=1, sr="on", sr_fraction=0.25,
                                   sr_config=SRConfig(n_delta=1, fixed_point_steps=1)))
    result = distill([_student(1)], _student(), ZSKTSynthesizer(batch_size=16, z_dim=8, ngf=8), defense=defense,
                     config=DistillConfig(iterations=8, student_steps=2, batch_size=16), image_shape=(1, 8, 8))
    report = result.defense_report
    iters = [int(i) for i, _ in report["flag_rate_per_iteration"]]
    assert iters == list(range(8))  # the SV term at every generator step, the last two (SR stage) included
    assert report["vaccines_found"] == 1 and report["teachers"][0]["verified"] is False
    assert report["sr_steps"] == 2 * 2 and report["weights_mode"] == "off"  # ZSKT's student KD is unweighted
    assert report["teachers"][0]["tail_ratio"] is not None  # scored on D_s at iteration 4 (half the run), not gated
    assert sum(c["samples"] for c in report["flag_rate_per_class"]) == 8 * 16


def test_kd_weights_auto_weight_fixed_inputs_only() -> None:
    images = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    defense = ABDDefense(ABDConfig(num_layers=1, sr="off"))
    distill([_student(1)], _student(), FixedDataSynthesizer(images), defense=defense,
            config=DistillConfig(iterations=2, student_steps=1, batch_size=16))
    assert defense.report()["weights_mode"] == "reference"


# ---- ZSKT: one z per 1 + k steps, cosine generator lr, clipping ----------------------------


def test_one_z_serves_one_generator_and_k_student_steps() -> None:
    synth = ZSKTSynthesizer(batch_size=8, z_dim=8, ngf=8)
    seen: list[torch.Tensor] = []
    original = synth.sample

    def spy(n: int) -> torch.Tensor:
        seen.append(original(n))
        return seen[-1]

    synth.sample = spy  # type: ignore[method-assign]
    distill([_student(1)], _student(), synth, config=DistillConfig(iterations=3, student_steps=4, batch_size=8),
            image_shape=(1, 8, 8))
    assert synth.z_draws == 3
    for it in range(3):
        batch = seen[4 * it: 4 * it + 4]
        assert all(torch.equal(batch[0], b) for b in batch[1:])
    assert not torch.equal(seen[0], seen[4])
    fresh = ZSKTSynthesizer(batch_size=8, z_dim=8, ngf=8, z_reuse=False)
    distill([_student(1)], _student(), fresh, config=DistillConfig(iterations=3, student_steps=4, batch_size=8),
            image_shape=(1, 8, 8))
    assert fresh.z_draws == 3 * (1 + 4)


def test_the_generator_lr_follows_its_cosine_and_its_gradient_is_clipped() -> None:
    bound = 1e-9  # far below any real gradient norm on any machine, so clipping must act every step
    synth = ZSKTSynthesizer(batch_size=8, z_dim=8, ngf=8, clip_grad_norm=bound)
    result = distill([_student(1)], _student(), synth,
                     config=DistillConfig(iterations=10, student_steps=1, batch_size=8, log_every=1), image_shape=(1, 8, 8))
    for h in result.history:
        it = h["iteration"]
        assert h["generator_lr"] == pytest.approx(1e-3 * (1 + math.cos(math.pi * it / 10)) / 2, rel=1e-6)
        assert h["generator_grad_norm"] > bound  # the norm before clipping: clipping acted ...
    norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in synth.generator.parameters() if p.grad is not None))
    assert norm <= bound * 1.0001  # ... and the gradient the optimizer stepped on is within the bound


def test_the_student_gradient_is_clipped_except_in_the_sr_stage() -> None:
    norms: list[float] = []
    student = _student()
    ids = {id(p) for p in student.parameters()}

    def hook(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if {id(p) for p in params} != ids:
            return  # the generator's optimizer
        norms.append(math.sqrt(sum(float(p.grad.pow(2).sum()) for p in params if p.grad is not None)))

    handle = register_optimizer_step_pre_hook(hook)
    try:
        synth = ZSKTSynthesizer(batch_size=8, z_dim=8, ngf=8, clip_grad_norm=None)
        defense = ABDDefense(ABDConfig(use_sv=False, sr="on", sr_fraction=0.5, sr_config=SRConfig(n_delta=1, fixed_point_steps=1)))
        distill([_student(1)], student, synth, defense=defense,
                config=DistillConfig(iterations=4, student_steps=2, batch_size=8, clip_grad_norm=1e-9), image_shape=(1, 8, 8))
    finally:
        handle.remove()
    assert len(norms) == 4 * 2  # student steps only (the generator is not clipped here)
    assert all(n <= 1e-9 * 1.0001 for n in norms[:4])  # the first half: KD steps, clipped
    assert all(n > 1e-9 for n in norms[4:])  # the SR stage: not clipped, as the reference


def test_the_sr_stage_anneals_a_fresh_lr_to_zero() -> None:
    defense = ABDDefense(ABDConfig(use_sv=False, sr="on", sr_fraction=0.5, sr_lr=1e-3,
                                   sr_config=SRConfig(n_delta=1, fixed_point_steps=1)))
    result = distill([_student(1)], _student(), ZSKTSynthesizer(batch_size=8, z_dim=8, ngf=8), defense=defense,
                     config=DistillConfig(iterations=4, student_steps=2, batch_size=8, log_every=1), image_shape=(1, 8, 8))
    lrs = [h["student_lr"] for h in result.history[2:]]  # logged after each iteration's steps: 2 and 4 of 4 SR steps
    assert lrs == pytest.approx([1e-3 * (1 + math.cos(math.pi * 2 / 4)) / 2, 0.0], abs=1e-12)


def test_flag_rates_per_teacher_read_the_ensembles_union_apart() -> None:
    """With several vaccinated teachers a sample is flagged when any one's shuffled copy
    disagrees: the report gives each teacher's own rate beside the union, which is at least
    the largest of them and at most their sum."""
    defense = ABDDefense(ABDConfig(num_layers=1, sr="off"))
    teachers = [_student(1), _student(2), _student(3)]
    result = distill(teachers, _student(), ZSKTSynthesizer(batch_size=16, z_dim=8, ngf=8), defense=defense,
                     config=DistillConfig(iterations=6, student_steps=1, batch_size=16), image_shape=(1, 8, 8))
    report = result.defense_report
    per_teacher = report["flag_rate_per_teacher"]
    assert len(per_teacher) == 3 and all(r is not None and 0.0 <= r <= 1.0 for r in per_teacher)
    union = report["flagged_share"]
    assert max(per_teacher) - 1e-9 <= union <= min(1.0, sum(per_teacher)) + 1e-9
    assert ABDDefense(ABDConfig(num_layers=1, use_sv=False, sr="off")).report()["flag_rate_per_teacher"] is None
