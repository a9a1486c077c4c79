"""Student Self-Retrospection (SR): ABD paper Sec. 4.2, Algorithm 1.

SR solves the bi-level problem (paper Sec. 4.2)::

    min_theta  max_delta  1/n sum_i KL( S(x_i | theta) || S(x_i + delta | theta) )

where ``delta`` is one *universal* perturbation shared by the whole batch. Per student
update (Algorithm 1):

1. :func:`synthesize_delta` -- ``n_delta`` Adam steps of gradient *ascent* on the inner
   objective give an approximate maximiser ``delta*`` (a stand-in for a trigger the
   student may have learned from a poisoned teacher).
2. :func:`sr_hypergradient` -- the gradient of ``psi(theta) = L_out(delta*(theta), theta)``
   by the implicit function theorem, with the inverse Hessian-vector product replaced by
   a truncated fixed-point (Neumann) iteration (Grazzi et al., 2020, "On the Iteration
   Complexity of Hypergradient Computation"; the solver I-BAU and the ABD reference use).
3. :func:`add_sr_gradient` -- adds ``weight * hypergradient`` to the parameters' ``.grad``
   after the KD backward pass and before ``optimizer.step()``.

Defaults follow the reference's runs (illidanlab/ABD ``zskt/solver.py`` SR branch with
``use_hg``, ``zskt/utils/hypergrad.py``; DESIGN.md Sec. 4); each older choice of ours stays
an option:

* **Scale** (``reduction``). ``reference`` (default): every KL is ``F.kl_div(...,
  reduction="mean")``, a mean over batch *and* classes. The outer loss is that mean over
  the **whole** batch with ``delta`` patched into a random ``portion`` of it, so the
  unpatched samples contribute (almost) nothing and the loss is about ``portion / K`` of a
  per-sample KL; the fixed-point map steps on the inner loss of the same scale.
  ``portion``: the outer loss averages the class-summed KL over the patched samples only,
  and the inner losses sum over classes (our earlier default: ~``N K / m`` times the
  reference's outer term and ``K`` times its fixed-point step).
* **Series start** (``fixed_point_start``). ``zero`` (default, hypertorch's
  ``fixed_point``): ``v_0 = 0``, ``v_{k+1} = A^T v_k + g_d`` for K steps, i.e. K terms
  ``sum_{j<K} (A^T)^j g_d``; ``outer``: ``v_0 = g_d`` (K + 1 terms).
* **delta** (``delta_source``). ``teacher`` (default, the sweeps' ``sup_pert_model:
  teacher``): ``delta`` maximises the shift of the teacher's (ensemble's) output, the
  teacher in eval mode; ``student``: the paper's Algorithm 1. The hypergradient's inner
  loss is always the student's. ``delta`` is unbounded (``eps=None``) with the inner
  objectives' ``-delta_l2 ||delta||^2`` term (1e-3), as the reference.
* **BatchNorm** (``bn_mode``). ``train`` (default): the student's BN layers normalise with
  batch statistics and update their running statistics, as the reference's train-mode
  student; ``batch``: batch statistics, running statistics untouched; ``eval``: running
  statistics. Dropout is off in every mode.
* **Initialisation** (a departure). ``delta = 0`` is a stationary point of
  ``KL(S(x) || S(x + delta))``; from it the reference's Adam moves in a direction set by
  floating-point rounding (not seedable). We start from ``N(0, init_std^2 I)`` (default
  ``init_std = 1e-3``, a seeded ``torch.Generator``) as the paper's Algorithm 1 writes;
  ``init_std = 0`` is the reference's zero start.
* **Target detached.** The clean prediction is the KL's target, computed under
  ``torch.no_grad()``; gradients flow only through ``S(x + delta)``, as the reference.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from abd_fl.distill.losses import kd_kl_per_sample


BN_MODES = ("train", "batch", "eval")
DELTA_SOURCES = ("student", "teacher")
REDUCTIONS = ("reference", "portion")
SERIES_STARTS = ("zero", "outer")


@dataclass
class SRConfig:
    """Hyper-parameters of Self-Retrospection (ABD paper Sec. 4.2, Algorithm 1).

    Defaults follow the ABD reference's runs (``n_delta`` 10, Adam lr 0.1, K = 5 fixed-point
    steps from ``v_0 = 0`` with ``gamma`` 0.1, 2% outer portion, batch x class means, delta
    from the teacher, unbounded with a 1e-3 L2 term, train-mode BN).
    """

    n_delta: int = 10
    """Inner Adam steps that synthesise the universal perturbation (``n_delta``)."""
    delta_lr: float = 0.1
    """Adam learning rate of the inner maximisation."""
    fixed_point_steps: int = 5
    """K: fixed-point iterations of the hypergradient (Grazzi et al., 2020); 0 allowed."""
    fixed_point_lr: float = 0.1
    """gamma of the fixed-point map ``Phi(delta) = delta + gamma * grad L_in``."""
    portion: float = 0.02
    """Random share of the batch used for the outer loss (at least one sample)."""
    weight: float = 1.0
    """Scale of the hypergradient added to ``.grad`` (0 disables SR)."""
    eps: float | None = None
    """Optional L_inf bound on delta (clamped after each step); None = unbounded (the reference)."""
    init_std: float = 1e-3
    """Std of the Gaussian start of delta (0 = zeros as the reference: a stationary point; see module doc)."""
    delta_l2: float = 1e-3
    """Weight of the ``-delta_l2 * ||delta||^2`` term in the inner objectives (the reference's 1e-3)."""
    reduction: str = "reference"
    """``reference`` (batch x class means, outer loss over the whole batch) or ``portion`` (see module doc)."""
    fixed_point_start: str = "zero"
    """``zero`` (hypertorch's v_0 = 0: K series terms) or ``outer`` (v_0 = g_d: K + 1 terms)."""
    delta_source: str = "teacher"
    """Model whose output shift ``delta`` maximises: ``student`` (the paper's Algorithm 1) or
    ``teacher`` (the reference's ``sup_pert_model=teacher`` option: the teachers' own most
    disruptive universal perturbation, a stand-in for their trigger). The hypergradient is
    always the student's."""
    bn_mode: str = "train"
    """The student's BatchNorm during SR: ``train`` (batch statistics, running statistics
    updated: the reference's train-mode student), ``batch`` (batch statistics, running
    statistics unchanged) or ``eval`` (running statistics)."""
    max_grad_ratio: float | None = None
    """Optional cap (our addition, not in the paper): the added SR gradient's L2 norm is at
    most this multiple of the norm of the gradient already in ``.grad`` (the KD loss'), so
    SR cannot overpower the distillation that anchors the student. None = no cap."""

    def __post_init__(self) -> None:
        def is_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: object) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not is_int(self.n_delta) or self.n_delta < 1:
            raise ValueError(f"SRConfig.n_delta must be an integer >= 1, got {self.n_delta!r}")
        if not is_num(self.delta_lr) or self.delta_lr <= 0:
            raise ValueError(f"SRConfig.delta_lr must be a finite number > 0, got {self.delta_lr!r}")
        if not is_int(self.fixed_point_steps) or self.fixed_point_steps < 0:
            raise ValueError(
                f"SRConfig.fixed_point_steps must be an integer >= 0, got {self.fixed_point_steps!r}"
            )
        if not is_num(self.fixed_point_lr) or self.fixed_point_lr <= 0:
            raise ValueError(
                f"SRConfig.fixed_point_lr must be a finite number > 0, got {self.fixed_point_lr!r}"
            )
        if not is_num(self.portion) or not 0 < self.portion <= 1:
            raise ValueError(f"SRConfig.portion must be in (0, 1], got {self.portion!r}")
        if not is_num(self.weight) or self.weight < 0:
            raise ValueError(f"SRConfig.weight must be a finite number >= 0, got {self.weight!r}")
        if self.eps is not None and (not is_num(self.eps) or self.eps <= 0):
            raise ValueError(f"SRConfig.eps must be None or a finite number > 0, got {self.eps!r}")
        if not is_num(self.init_std) or self.init_std < 0:
            raise ValueError(f"SRConfig.init_std must be a finite number >= 0, got {self.init_std!r}")
        if self.delta_source not in DELTA_SOURCES:
            raise ValueError(f"SRConfig.delta_source must be one of {', '.join(DELTA_SOURCES)}, got {self.delta_source!r}")
        if self.bn_mode not in BN_MODES:
            raise ValueError(f"SRConfig.bn_mode must be one of {', '.join(BN_MODES)}, got {self.bn_mode!r}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"SRConfig.reduction must be one of {', '.join(REDUCTIONS)}, got {self.reduction!r}")
        if self.fixed_point_start not in SERIES_STARTS:
            raise ValueError(f"SRConfig.fixed_point_start must be one of {', '.join(SERIES_STARTS)}, got {self.fixed_point_start!r}")
        if not is_num(self.delta_l2) or self.delta_l2 < 0:
            raise ValueError(f"SRConfig.delta_l2 must be a finite number >= 0, got {self.delta_l2!r}")
        if self.max_grad_ratio is not None and (not is_num(self.max_grad_ratio) or self.max_grad_ratio <= 0):
            raise ValueError(f"SRConfig.max_grad_ratio must be None or a finite number > 0, got {self.max_grad_ratio!r}")


@contextmanager
def _eval_mode(model: nn.Module, bn_mode: str = "eval") -> Iterator[None]:
    """Put every submodule in eval mode; restore each one's own previous mode on exit.

    With ``bn_mode="batch"`` the BatchNorm layers instead normalise with the statistics of
    the batch they see (train mode) while their running statistics stay untouched
    (momentum 0 for the duration); with ``bn_mode="train"`` they are in plain train mode
    (running statistics updated, as a train-mode model); dropout stays in eval mode.
    """
    modes = [(m, m.training) for m in model.modules()]
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [] if bn_mode == "train" else [
        (m, m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None) for m in norms
    ]
    model.eval()
    if bn_mode in ("batch", "train"):
        for m in norms:
            m.train()
            if bn_mode == "batch":
                m.momentum = 0.0
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
        for m, momentum, tracked in momenta:
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


def _kl_to_target(
    model: nn.Module, x: torch.Tensor, delta: torch.Tensor, target_logits: torch.Tensor, reduction: str = "portion"
) -> torch.Tensor:
    """Mean over samples of KL(softmax(target_logits) || S(x + delta)): class-averaged
    (``F.kl_div(reduction="mean")``) for ``reduction="reference"``, class-summed otherwise."""
    class_reduction = "mean" if reduction == "reference" else "sum"
    return kd_kl_per_sample(model(x + delta), target_logits, class_reduction=class_reduction).mean()


def kl_shift(model: nn.Module, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Scalar ``1/N sum_i KL(S(x_i) || S(x_i + delta))`` (ABD paper Sec. 4.2, Algorithm 1).

    The clean prediction ``S(x)`` is the target distribution and is **detached** (computed
    under ``no_grad``), as in the reference: gradients w.r.t. ``delta`` and the parameters
    flow only through the perturbed branch ``S(x + delta)``. ``delta`` must broadcast
    against ``x`` (e.g. shape (1, C, H, W)). Runs the model in whatever mode it is in;
    the SR functions below call it in eval mode.
    """
    with torch.no_grad():
        target = model(x)
    return _kl_to_target(model, x, delta, target)


def _initial_delta(x: torch.Tensor, cfg: SRConfig, seed: int | None) -> torch.Tensor:
    shape = (1, *x.shape[1:])
    if cfg.init_std == 0:
        return torch.zeros(shape, dtype=x.dtype, device=x.device)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    noise = torch.randn(shape, generator=gen, dtype=x.dtype)  # drawn on CPU: same values on any device
    return (noise * cfg.init_std).to(x.device)


def synthesize_delta(
    model: nn.Module, x: torch.Tensor, cfg: SRConfig, seed: int | None = None, bn_mode: str | None = None
) -> torch.Tensor:
    """Universal perturbation ``delta`` of shape (1, C, H, W) maximising ``kl_shift``.

    Algorithm 1 (ABD paper Sec. 4.2), inner loop: start from ``N(0, init_std^2 I)`` (seeded
    by ``seed``; the global RNG when None; zeros when ``cfg.init_std == 0``), then
    ``cfg.n_delta`` Adam steps (lr ``cfg.delta_lr``) on ``-(kl_shift - delta_l2 ||delta||^2)``,
    clamping to ``[-eps, eps]`` after each step when ``cfg.eps`` is set. The model runs in
    eval mode (restored afterwards) and only ``delta`` is differentiated, so no parameter
    ``.grad`` is touched. ``bn_mode`` (default ``cfg.bn_mode``) sets the model's BN mode; a
    teacher is always used in eval mode. Returns a detached tensor with ``x``'s dtype and device.
    """
    x = x.detach()
    delta = _initial_delta(x, cfg, seed)
    if cfg.eps is not None:
        delta = delta.clamp(-cfg.eps, cfg.eps)
    delta.requires_grad_(True)
    opt = torch.optim.Adam([delta], lr=cfg.delta_lr)
    with torch.enable_grad(), _eval_mode(model, cfg.bn_mode if bn_mode is None else bn_mode):
        with torch.no_grad():
            target = model(x)
        for _ in range(cfg.n_delta):
            objective = _kl_to_target(model, x, delta, target, cfg.reduction)
            if cfg.delta_l2 > 0:
                objective = objective - cfg.delta_l2 * delta.pow(2).sum()
            (grad,) = torch.autograd.grad(-objective, delta)
            delta.grad = grad
            opt.step()
            if cfg.eps is not None:
                with torch.no_grad():
                    delta.clamp_(-cfg.eps, cfg.eps)
    return delta.detach()


def _outer_indices(n: int, portion: float, generator: torch.Generator | None) -> torch.Tensor:
    m = max(1, int(n * portion))
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.randperm(n, generator=generator, device=device)[:m]


def _hypergradient(
    model: nn.Module, x: torch.Tensor, delta: torch.Tensor, cfg: SRConfig, generator: torch.Generator | None
) -> tuple[list[torch.Tensor], float]:
    """The hypergradient (see :func:`sr_hypergradient`) and ``kl_shift(x, delta)`` on the full batch."""
    params = [p for p in model.parameters() if p.requires_grad]
    x = x.detach()
    idx = _outer_indices(x.shape[0], cfg.portion, generator).to(x.device)
    with torch.enable_grad(), _eval_mode(model, cfg.bn_mode):
        d = delta.detach().to(device=x.device, dtype=x.dtype).clone().requires_grad_(True)
        with torch.no_grad():
            target = model(x)

        # Outer loss on the random portion: g_d = dL_out/ddelta, g_t = dL_out/dtheta. The whole
        # batch goes through the model with delta patched onto the portion only, so batch
        # statistics (bn_mode="batch") are those of the batch, as in the reference.
        patch = torch.zeros((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device)
        patch[idx] = 1.0
        if cfg.reduction == "reference":  # F.kl_div(reduction="mean") over the whole batch x classes
            l_out = kd_kl_per_sample(model(x + patch * d), target, class_reduction="mean").mean()
        else:  # the class-summed KL averaged over the patched samples only
            l_out = kd_kl_per_sample(model(x + patch * d), target)[idx].mean()
        g_out = torch.autograd.grad(l_out, [d, *params], allow_unused=True)
        g_d = g_out[0] if g_out[0] is not None else torch.zeros_like(d)
        g_t = [g if g is not None else torch.zeros_like(p) for g, p in zip(g_out[1:], params)]

        # Fixed-point map Phi(delta, theta) = delta + gamma * grad_delta L_in, kept differentiable.
        kl_in = _kl_to_target(model, x, d, target, cfg.reduction)
        l_in = kl_in - cfg.delta_l2 * d.pow(2).sum() if cfg.delta_l2 > 0 else kl_in
        (grad_in,) = torch.autograd.grad(l_in, d, create_graph=True)
        phi = d + cfg.fixed_point_lr * grad_in

        # v_K via vector-Jacobian products with A = dPhi/ddelta: from v_0 = 0 (hypertorch:
        # sum_{j<K} (A^T)^j g_d) or from v_0 = g_d (sum_{j<=K}).
        v = torch.zeros_like(g_d) if cfg.fixed_point_start == "zero" else g_d
        for _ in range(cfg.fixed_point_steps):
            (a_t_v,) = torch.autograd.grad(phi, d, grad_outputs=v, retain_graph=True)
            v = a_t_v + g_d

        # B^T v_K with B = dPhi/dtheta.
        b_t_v = torch.autograd.grad(phi, params, grad_outputs=v, allow_unused=True)
    hyper = [(gt + bv if bv is not None else gt).detach() for gt, bv in zip(g_t, b_t_v)]
    return hyper, float(kl_in.detach())


def sr_hypergradient(
    model: nn.Module,
    x: torch.Tensor,
    delta: torch.Tensor,
    cfg: SRConfig,
    generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """Hypergradient of ``psi(theta) = L_out(delta*(theta), theta)`` (ABD paper Sec. 4.2, Algorithm 1).

    ``delta`` (shape (1, C, H, W)) is taken as the fixed point ``delta*`` of
    ``Phi(delta, theta) = delta + gamma * grad_delta L_in(delta, theta)``; by the implicit
    function theorem, ``grad psi = g_t + B^T (I - A^T)^{-1} g_d``, and the inverse is replaced
    by the fixed-point iteration of Grazzi et al. (2020)::

        v_0 = 0 (or g_d);  v_{k+1} = A^T v_k + g_d  (k = 0..K-1);  hypergrad = g_t + B^T v_K

    i.e. the Neumann series truncated after K terms (``fixed_point_start="zero"``, hypertorch's
    ``fixed_point``) or K + 1 (``"outer"``), ``v_K = sum_{j<K} (A^T)^j g_d``,
    where ``A = dPhi/ddelta``, ``B = dPhi/dtheta``, ``g_d, g_t`` are the partial gradients of
    ``L_out``, the shift KL with ``delta`` patched into a random ``cfg.portion`` of the batch
    (indices drawn with ``torch.randperm(N, generator=generator)``; the global RNG when None;
    scale per ``cfg.reduction``) and ``L_in`` is the shift KL on the full batch (minus
    ``delta_l2 ||delta||^2``). All products are vector-Jacobian products from
    ``torch.autograd.grad`` (double backward); no Jacobian is formed. Clean predictions are
    detached targets; BN per ``cfg.bn_mode`` (each module's mode restored afterwards).

    Returns one detached tensor per ``p in model.parameters() if p.requires_grad``, same
    shapes and order; ``.grad`` is not touched.
    """
    hyper, _ = _hypergradient(model, x, delta, cfg, generator)
    return hyper


def add_sr_gradient(
    model: nn.Module, x: torch.Tensor, cfg: SRConfig, seed: int | None = None, teacher: nn.Module | None = None
) -> dict[str, float]:
    """Algorithm 1's extra term (ABD paper Sec. 4.2): add ``cfg.weight * grad psi`` to ``.grad``.

    Call after the KD loss' ``backward()`` and before ``optimizer.step()``. Synthesises
    ``delta = synthesize_delta(model, x, cfg, seed)``, computes
    ``sr_hypergradient(model, x, delta, cfg, generator)`` (Grazzi et al., 2020 fixed-point
    hypergradient) with ``generator = torch.Generator().manual_seed(seed)`` when ``seed`` is
    given (else the global RNG), and adds it, scaled by ``cfg.weight``, into every trainable
    parameter's ``.grad`` (created when None). With ``cfg.max_grad_ratio`` set, the scale is
    lowered where needed so that the added term's norm is at most that multiple of the
    norm of the gradient already in ``.grad``. Model mode and BN statistics are unchanged.

    With ``cfg.delta_source == "teacher"``, ``delta`` maximises the shift of ``teacher``'s
    output instead (the reference's option); the hypergradient is still the student's.

    Returns logs: ``sr_kl`` (``kl_shift`` on the full batch at ``delta``), ``sr_delta_norm``
    (L2 norm of ``delta``), ``sr_delta_linf`` and ``sr_hypergrad_norm`` (L2 norm of the
    unscaled hypergradient over all parameters) and ``sr_scale`` (the scale applied).
    """
    if cfg.delta_source == "teacher" and teacher is None:
        raise ValueError("SRConfig.delta_source='teacher' needs the teacher model")
    if cfg.delta_source == "teacher":
        delta = synthesize_delta(teacher, x, cfg, seed=seed, bn_mode="eval")  # the reference's teacher.eval()
    else:
        delta = synthesize_delta(model, x, cfg, seed=seed)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    hyper, kl_value = _hypergradient(model, x, delta, cfg, generator)
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        hyper_norm = math.sqrt(sum(float(h.pow(2).sum()) for h in hyper))
        scale = cfg.weight
        if cfg.max_grad_ratio is not None:
            kd_norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in params if p.grad is not None))
            if scale * hyper_norm > cfg.max_grad_ratio * kd_norm:
                scale = cfg.max_grad_ratio * kd_norm / hyper_norm
        for p, h in zip(params, hyper):
            if p.grad is None:
                p.grad = (scale * h).to(p.dtype)
            else:
                p.grad.add_(h.to(p.grad.dtype), alpha=scale)
    return {
        "sr_kl": kl_value,
        "sr_delta_norm": float(delta.norm()),
        "sr_delta_linf": float(delta.abs().max()),
        "sr_hypergrad_norm": hyper_norm,
        "sr_scale": scale,
    }
