"""Tests of Self-Retrospection (ABD paper Sec. 4.2, Algorithm 1; Grazzi et al. 2020 hypergradient)."""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.functional import jacobian

from abd_fl.defense.retrospection import (
    SRConfig,
    add_sr_gradient,
    kl_shift,
    sr_hypergradient,
    synthesize_delta,
)
from abd_fl.models import build_model


pytestmark = pytest.mark.usefixtures("one_torch_thread")

# The tests below pin our earlier SR variant (still an option): class-summed KLs with the outer
# loss averaged over the patched samples, the series from v_0 = g_d, running BN statistics, delta
# from the student, no L2 term. tests/test_reference_parity.py pins the reference's defaults.
OURS = dict(reduction="portion", fixed_point_start="outer", bn_mode="eval", delta_source="student", delta_l2=0.0)


def _ours(**kw) -> SRConfig:
    return SRConfig(**{**OURS, **kw})


# --------------------------------------------------------------------------------------
# Brute force: explicit Jacobians of the fixed-point map, built independently of the module.
# --------------------------------------------------------------------------------------

Functional = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _functional(model: nn.Module) -> tuple[Functional, torch.Tensor]:
    """``call(theta_flat, inputs)`` evaluating ``model`` at flat parameters, and the current theta."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    numels = [p.numel() for _, p in model.named_parameters()]
    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()

    def call(theta: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        chunks = theta.split(numels)
        params = {n: c.view(s) for n, c, s in zip(names, chunks, shapes)}
        return torch.func.functional_call(model, params, (inputs,))

    return call, theta0


def _kl_ref(
    call: Functional,
    theta: torch.Tensor,
    xs: torch.Tensor,
    delta_flat: torch.Tensor,
    target_theta: torch.Tensor | None = None,
) -> torch.Tensor:
    """mean_i KL(S(x_i) || S(x_i + delta)), clean target detached (optionally frozen at target_theta)."""
    t_theta = theta if target_theta is None else target_theta
    log_p = F.log_softmax(call(t_theta, xs), dim=1).detach()
    log_q = F.log_softmax(call(theta, xs + delta_flat.view(1, *xs.shape[1:])), dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()


def _phi_ref(
    call: Functional,
    x: torch.Tensor,
    gamma: float,
    l2: float,
    target_theta: torch.Tensor | None = None,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Phi(delta, theta) = delta + gamma * grad_delta [KL - l2 ||delta||^2] on the full batch."""

    def phi(delta_flat: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            d = delta_flat if delta_flat.requires_grad else delta_flat.detach().requires_grad_(True)
            l_in = _kl_ref(call, theta, x, d, target_theta) - l2 * d.pow(2).sum()
            (g,) = torch.autograd.grad(l_in, d, create_graph=True)
        return d + gamma * g

    return phi


def _outer_idx(n: int, portion: float, seed: int) -> torch.Tensor:
    m = max(1, int(n * portion))
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:m]


def _brute_force_pieces(
    model: nn.Module, x: torch.Tensor, delta: torch.Tensor, cfg: SRConfig, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A = dPhi/ddelta (d x d), B = dPhi/dtheta (d x p), g_delta (d), g_theta (p) as explicit matrices."""
    call, theta0 = _functional(model)
    d0 = delta.detach().reshape(-1).clone()
    xo = x[_outer_idx(x.shape[0], cfg.portion, seed)]
    phi = _phi_ref(call, x, cfg.fixed_point_lr, cfg.delta_l2)
    a = jacobian(lambda d: phi(d, theta0), d0)
    b = jacobian(lambda t: phi(d0, t), theta0)
    g_d = jacobian(lambda d: _kl_ref(call, theta0, xo, d), d0)
    g_t = jacobian(lambda t: _kl_ref(call, t, xo, d0), theta0)
    return a, b, g_d, g_t


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _tiny_linear(seed: int = 0, scale: float = 1.0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    return model


def _tiny_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _inputs(n: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_kl_shift_detaches_the_clean_target() -> None:
    model, x = _tiny_mlp(), _inputs()
    delta = 0.3 * torch.randn((1, 1, 4, 4), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    got = _flat(list(torch.autograd.grad(kl_shift(model, x, delta), list(model.parameters()))))
    call, theta0 = _functional(model)
    detached = jacobian(lambda t: _kl_ref(call, t, x, delta.reshape(-1)), theta0)

    def full_kl(t: torch.Tensor) -> torch.Tensor:  # both branches differentiated
        log_p = F.log_softmax(call(t, x), dim=1)
        log_q = F.log_softmax(call(t, x + delta), dim=1)
        return (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()

    torch.testing.assert_close(got, detached, atol=1e-12, rtol=1e-10)
    assert (got - jacobian(full_kl, theta0)).abs().max() > 1e-4
    torch.testing.assert_close(kl_shift(model, x, delta), full_kl(theta0), atol=1e-12, rtol=1e-10)


# --------------------------------------------------------------------------------------
# 1. Exactness of the hypergradient
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("builder", [_tiny_linear, _tiny_mlp], ids=["linear", "tanh_mlp"])
@pytest.mark.parametrize("k", [0, 1, 5])
def test_hypergradient_matches_explicit_truncated_neumann(builder: Callable[[], nn.Module], k: int) -> None:
    model = builder()
    x = _inputs()
    cfg = _ours(fixed_point_steps=k, portion=0.3, delta_l2=0.01)  # 2 of 8 samples in the outer loss
    delta = synthesize_delta(model, x, cfg, seed=0)
    got = _flat(sr_hypergradient(model, x, delta, cfg, generator=torch.Generator().manual_seed(7)))

    a, b, g_d, g_t = _brute_force_pieces(model, x, delta, cfg, seed=7)
    v = torch.zeros_like(g_d)
    term = g_d.clone()
    for _ in range(k + 1):  # v_K = sum_{j=0..K} (A^T)^j g_delta
        v = v + term
        term = a.T @ term
    expected = g_t + b.T @ v

    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-8)
    # Not vacuous: the implicit term matters, and dropping one Neumann term would be detected.
    implicit = b.T @ v
    assert implicit.norm() > 1e-3 * g_t.norm()
    v_short = v - torch.linalg.matrix_power(a.T, k) @ g_d
    assert (g_t + b.T @ v_short - got).abs().max() > 1e-6


def test_hypergradient_converges_to_implicit_gradient_on_a_contraction() -> None:
    # Linear model with an L2 term: KL(S(x) || S(x + delta)) is convex in delta and grows
    # linearly, so L_in = KL - 0.1 ||delta||^2 has an interior maximum away from 0 where Phi
    # is a contraction; delta* (found by iterating Phi) is a genuine, non-trivial fixed point.
    model = _tiny_linear(scale=2.0)
    x = _inputs()
    cfg = _ours(fixed_point_steps=200, fixed_point_lr=1.0, portion=0.5, delta_l2=0.1)
    call, theta0 = _functional(model)
    phi = _phi_ref(call, x, cfg.fixed_point_lr, cfg.delta_l2)
    d = synthesize_delta(model, x, cfg, seed=0).reshape(-1)
    for _ in range(300):
        d = phi(d, theta0).detach()
    assert (phi(d, theta0) - d).abs().max() < 1e-13  # converged fixed point
    assert d.norm() > 1.0 and float(_kl_ref(call, theta0, x, d)) > 0.5  # ... and not the trivial delta = 0
    delta = d.view(1, 1, 4, 4)

    a, b, g_d, g_t = _brute_force_pieces(model, x, delta, cfg, seed=3)
    rho = torch.linalg.eigvals(a).abs().max().item()
    assert rho < 0.9, f"spectral radius {rho} is not a contraction"
    exact = g_t + b.T @ torch.linalg.solve(torch.eye(a.shape[0], dtype=a.dtype) - a.T, g_d)

    got = _flat(sr_hypergradient(model, x, delta, cfg, generator=torch.Generator().manual_seed(3)))
    torch.testing.assert_close(got, exact, atol=1e-9, rtol=1e-7)
    short_cfg = dataclasses.replace(cfg, fixed_point_steps=2)
    short = _flat(sr_hypergradient(model, x, delta, short_cfg, torch.Generator().manual_seed(3)))
    assert (short - exact).abs().max() > 1e-5  # truncation error is visible at small K

    # And it is the true derivative of psi(theta) = L_out(delta*(theta), theta), the clean
    # target frozen at theta0 (that is what detaching it means), by central differences.
    xo = x[_outer_idx(x.shape[0], cfg.portion, 3)]

    def psi(theta: torch.Tensor) -> float:
        phi_t = _phi_ref(call, x, cfg.fixed_point_lr, cfg.delta_l2, target_theta=theta0)
        dd = d.clone()
        for _ in range(400):
            dd = phi_t(dd, theta).detach()
        return float(_kl_ref(call, theta, xo, dd, target_theta=theta0))

    u = torch.randn(theta0.shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    h = 1e-5
    fd = (psi(theta0 + h * u) - psi(theta0 - h * u)) / (2 * h)
    assert abs(float(got @ u)) > 1e-2
    assert math.isclose(fd, float(got @ u), rel_tol=1e-6, abs_tol=1e-9)


# --------------------------------------------------------------------------------------
# 2. synthesize_delta
# --------------------------------------------------------------------------------------


def _cnn_small() -> nn.Module:
    torch.manual_seed(0)
    return build_model("cnn_small", 10, 1, (0.3,), (0.4,))


def _digits(n: int = 16, seed: int = 2) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def _bn_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.named_buffers()}


def test_synthesize_delta_increases_kl_is_seeded_and_leaves_model_alone() -> None:
    model = _cnn_small()
    model.train()
    x = _digits()
    buffers = _bn_buffers(model)
    cfg = _ours()
    delta = synthesize_delta(model, x, cfg, seed=5)

    assert delta.shape == (1, 1, 8, 8)
    assert not delta.requires_grad
    init = torch.randn((1, 1, 8, 8), generator=torch.Generator().manual_seed(5)) * cfg.init_std
    with torch.no_grad():
        model.eval()
        kl_init, kl_final = float(kl_shift(model, x, init)), float(kl_shift(model, x, delta))
        model.train()
    assert kl_final > kl_init and kl_final > 100 * kl_init
    assert torch.equal(delta, synthesize_delta(model, x, cfg, seed=5))
    assert not torch.equal(delta, synthesize_delta(model, x, cfg, seed=6))
    # No side effects: mode, BN statistics, parameter gradients.
    assert model.training and all(m.training for m in model.modules())
    for k, v in _bn_buffers(model).items():
        assert torch.equal(v, buffers[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_zero_is_a_stationary_point_and_the_default_init_is_not() -> None:
    # KL and its delta-gradient vanish at delta = 0 (up to float64 rounding): the reason the
    # default start is small seeded Gaussian noise, which has a real ascent direction.
    model, x = _tiny_linear(), _inputs()
    zero = torch.zeros(1, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    kl0 = kl_shift(model, x, zero)
    (g0,) = torch.autograd.grad(kl0, zero)
    assert kl0.item() == 0.0 and g0.abs().max() < 1e-14
    cfg = _ours()
    init = (torch.randn((1, 1, 4, 4), generator=torch.Generator().manual_seed(0), dtype=torch.float64) * cfg.init_std)
    init.requires_grad_(True)
    (g1,) = torch.autograd.grad(kl_shift(model, x, init), init)
    assert g1.abs().max() > 1e-6
    assert kl_shift(model, x, synthesize_delta(model, x, cfg, seed=0)).item() > 0.1
    assert synthesize_delta(model, x, _ours(init_std=0.0), seed=0).shape == (1, 1, 4, 4)


def test_eps_bound_is_respected() -> None:
    model = _cnn_small()
    x = _digits()
    bounded = synthesize_delta(model, x, _ours(eps=0.05), seed=0)
    assert bounded.abs().max() <= 0.05 + 1e-7
    assert torch.isclose(bounded.abs().max(), torch.tensor(0.05))  # the bound is active
    free = synthesize_delta(model, x, _ours(), seed=0)
    assert free.abs().max() > 0.1


# --------------------------------------------------------------------------------------
# 3. add_sr_gradient
# --------------------------------------------------------------------------------------


def test_add_sr_gradient_adds_weighted_hypergradient_and_keeps_mode_and_bn_stats() -> None:
    model = _cnn_small()
    model.train()
    model.net.body[1].eval()  # a submodule deliberately in eval mode: its own mode must be kept
    x = _digits()
    teacher = copy.deepcopy(model).eval()
    with torch.no_grad():
        teacher_logits = teacher(x) * 3.0
    F.kl_div(F.log_softmax(model(x), 1), F.softmax(teacher_logits, 1), reduction="batchmean").backward()
    modes = [m.training for m in model.modules()]
    buffers = _bn_buffers(model)
    grads_before = [p.grad.clone() for p in model.parameters()]
    cfg = _ours(weight=0.5, portion=0.25)

    logs = add_sr_gradient(model, x, cfg, seed=3)

    assert [m.training for m in model.modules()] == modes
    for k, v in _bn_buffers(model).items():
        assert torch.equal(v, buffers[k]), k
    delta = synthesize_delta(model, x, cfg, seed=3)
    hyper = sr_hypergradient(model, x, delta, cfg, generator=torch.Generator().manual_seed(3))
    assert float(_flat(hyper).norm()) > 1e-4
    for p, before, h in zip(model.parameters(), grads_before, hyper):
        torch.testing.assert_close(p.grad, before + 0.5 * h, atol=1e-7, rtol=1e-6)
    assert set(logs) >= {"sr_kl", "sr_delta_norm"}
    assert logs["sr_kl"] > 0 and math.isclose(logs["sr_delta_norm"], float(delta.norm()), rel_tol=1e-6)
    with torch.no_grad():
        model.eval()
        assert math.isclose(logs["sr_kl"], float(kl_shift(model, x, delta)), rel_tol=1e-4)


def test_add_sr_gradient_creates_grads_and_skips_frozen_parameters() -> None:
    model = _tiny_mlp()
    model[1].bias.requires_grad_(False)
    x = _inputs()
    cfg = _ours(weight=2.0, portion=0.5)
    add_sr_gradient(model, x, cfg, seed=1)
    hyper = sr_hypergradient(model, x, synthesize_delta(model, x, cfg, seed=1), cfg, torch.Generator().manual_seed(1))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(hyper) == len(trainable) == 3
    assert model[1].bias.grad is None
    for p, h in zip(trainable, hyper):
        assert p.grad is not None and p.grad.shape == p.shape
        torch.testing.assert_close(p.grad, 2.0 * h, atol=1e-12, rtol=1e-10)


def test_max_grad_ratio_caps_the_added_gradient_relative_to_the_existing_one() -> None:
    model = _tiny_mlp()
    x = _inputs()
    base = _ours(weight=1.0, portion=0.5)
    hyper = sr_hypergradient(model, x, synthesize_delta(model, x, base, seed=4), base, torch.Generator().manual_seed(4))
    h_norm = float(_flat(hyper).norm())
    kd = [torch.full_like(p, 1e-3) for p in model.parameters()]  # a small "KD" gradient already in .grad
    kd_norm = float(_flat(kd).norm())
    assert h_norm > 0.5 * kd_norm  # so a cap of 0.5 binds

    for p, g in zip(model.parameters(), kd):
        p.grad = g.clone()
    logs = add_sr_gradient(model, x, dataclasses.replace(base, max_grad_ratio=0.5), seed=4)
    added = [p.grad - g for p, g in zip(model.parameters(), kd)]
    assert math.isclose(float(_flat(added).norm()), 0.5 * kd_norm, rel_tol=1e-4)
    assert math.isclose(logs["sr_scale"], 0.5 * kd_norm / h_norm, rel_tol=1e-6)
    for a, h in zip(added, hyper):  # same direction, smaller step
        torch.testing.assert_close(a, logs["sr_scale"] * h, atol=1e-9, rtol=1e-5)

    for p, g in zip(model.parameters(), kd):  # a cap that does not bind changes nothing
        p.grad = g.clone()
    loose = add_sr_gradient(model, x, dataclasses.replace(base, max_grad_ratio=1e6), seed=4)
    assert loose["sr_scale"] == 1.0


# --------------------------------------------------------------------------------------
# 4. Effect on a backdoored tiny model
# --------------------------------------------------------------------------------------


def test_sr_steps_reduce_sensitivity_of_a_backdoored_model() -> None:
    h = w = 6
    gen = torch.Generator().manual_seed(0)
    protos = (torch.rand(4, 1, h, w, generator=gen) > 0.5).float()
    patch = torch.zeros(1, 1, h, w)
    patch[..., -2:, -2:] = 1.0

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, 4, (n,), generator=gen)
        xs = 0.6 * protos[y] + 0.4 * torch.rand(n, 1, h, w, generator=gen)
        xs[..., -2:, -2:] = 0.0  # clean images have a dark corner
        return xs, y

    x_train, y_train = sample(256)
    x_train[:26] = torch.maximum(x_train[:26], patch)  # 10% poisoned with the corner patch -> class 0
    y_train[:26] = 0
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(h * w, 4))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        F.cross_entropy(model(x_train), y_train).backward()
        opt.step()

    x, y = sample(64)
    cfg = _ours(portion=0.25)

    def measure() -> tuple[float, float, float]:
        """(KL at synthesised deltas, KL of the real trigger, clean accuracy)."""
        deltas = [synthesize_delta(model, x, cfg, seed=s) for s in (1001, 1002)]
        with torch.no_grad():
            model.eval()
            kl_syn = sum(float(kl_shift(model, x, d)) for d in deltas) / len(deltas)
            kl_trigger = float(kl_shift(model, x, patch))
            acc = float((model(x).argmax(1) == y).float().mean())
        return kl_syn, kl_trigger, acc

    kl_syn0, kl_trig0, acc0 = measure()
    asr0 = float((model(torch.maximum(x[y != 0], patch)).argmax(1) == 0).float().mean())
    assert acc0 > 0.95 and asr0 > 0.95  # a working backdoored model

    sgd = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(30):
        sgd.zero_grad()
        add_sr_gradient(model, x, cfg, seed=step)  # the SR hypergradient only
        sgd.step()

    kl_syn1, kl_trig1, acc1 = measure()
    assert kl_syn1 < 0.75 * kl_syn0, (kl_syn0, kl_syn1)
    assert kl_trig1 < kl_trig0, (kl_trig0, kl_trig1)
    assert acc1 > 0.9  # less sensitive without collapsing on clean inputs


# --------------------------------------------------------------------------------------
# 5. Config validation
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"portion": 0.0}, "portion"),
        ({"portion": 1.5}, "portion"),
        ({"n_delta": 0}, "n_delta"),
        ({"fixed_point_steps": -1}, "fixed_point_steps"),
        ({"delta_lr": -0.1}, "delta_lr"),
        ({"fixed_point_lr": 0.0}, "fixed_point_lr"),
        ({"weight": -1.0}, "weight"),
        ({"eps": 0.0}, "eps"),
        ({"init_std": -1e-3}, "init_std"),
        ({"delta_l2": float("nan")}, "delta_l2"),
        ({"max_grad_ratio": 0.0}, "max_grad_ratio"),
    ],
)
def test_config_validation(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(ValueError) as info:
        SRConfig(**kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert f"SRConfig.{field}" in message and "\n" not in message
    assert repr(next(iter(kwargs.values()))) in message


def test_config_defaults_are_the_reference_ones() -> None:
    cfg = SRConfig()
    got = (cfg.n_delta, cfg.delta_lr, cfg.fixed_point_steps, cfg.fixed_point_lr, cfg.portion)
    assert got == (10, 0.1, 5, 0.1, 0.02)
    assert cfg.weight == 1.0 and cfg.eps is None and cfg.init_std == 1e-3 and cfg.delta_l2 == 1e-3
    assert (cfg.reduction, cfg.fixed_point_start, cfg.bn_mode, cfg.delta_source) == ("reference", "zero", "train", "teacher")
