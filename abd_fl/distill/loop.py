"""The data-free distillation loop (paper Eq. 2), with hook points for a defense.

``distill(teachers, student, synthesizer, defense=None, config)`` trains ``student`` in
place to match the teachers' averaged logits on surrogate inputs. Per iteration: one
synthesis step (``synthesizer.generator_round``), then ``student_steps`` KD steps on
fresh surrogate batches. The defense (see :mod:`abd_fl.distill.hooks`) acts at three
points: the generator loss, per-sample KD weights, and an extra student gradient in the
late phase (with a fresh optimizer at a small learning rate, as ABD's SR does).

With ``attention_beta > 0`` the student's per-sample loss is ``KD + beta * AT``, AT being
attention transfer on the stage outputs (ZSKT's student term, :mod:`abd_fl.distill.attention`);
a defense's per-sample weights then scale that whole per-sample loss.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from abd_fl.device import check_memory_format, resolve_memory_format
from abd_fl.distill.attention import StageRecorder, attention_transfer_per_sample, recording
from abd_fl.distill.ensemble import DEFAULT_ENSEMBLE, TeacherEnsemble, check_ensemble
from abd_fl.distill.hooks import DistillContext, DistillDefense
from abd_fl.distill.losses import KL_REDUCTIONS, kd_kl_per_sample
from abd_fl.distill.synthesizers.base import Synthesizer


@dataclass
class DistillConfig:
    """Budgets and optimiser settings of one distillation run."""

    iterations: int = 500
    student_steps: int = 10
    batch_size: int = 128
    lr: float = 2e-3
    temperature: float = 1.0
    cosine: bool = True
    seed: int = 0
    log_every: int = 50
    attention_beta: float = 0.0
    """Weight of attention transfer in the student's loss (0 = off; ZSKT uses 250)."""
    clip_grad_norm: float | None = None
    """Clip the student's gradient norm to this before each step (None = off; the reference
    ZSKT clips to 5, as ``configs/distill/zskt.yaml``). Not applied in the late phase, where
    the reference's SR steps do not clip."""
    kl_reduction: str = "sum"
    """KD's KL over classes: ``sum`` (per-sample KL) or ``mean`` (the reference ZSKT's
    ``F.kl_div(reduction="mean")``: a batch x class mean, as ``configs/distill/zskt.yaml``).
    Sets KD's scale against attention transfer and SR."""
    ensemble: str = DEFAULT_ENSEMBLE
    """How several teachers are combined (:data:`~abd_fl.distill.ensemble.ENSEMBLE_RULES`):
    ``mean_probs`` (the default) | ``mean_logits`` (FedDF / DENSE) | ``standardized_logits`` |
    ``median_probs`` | ``trimmed_probs``. One teacher gives the same targets under every rule."""
    ensemble_trim: float = 0.2
    """``trimmed_probs``: the share of teachers dropped at each end per class, in [0, 0.5)."""
    ensemble_vectorize: str = "off"
    """Run same-architecture teachers as one ``vmap``-ed call: ``off`` | ``on`` | ``auto`` (on CUDA only)."""
    memory_format: str = "auto"
    """Layout of the teachers', student's and generator's 4-D weights during the run
    (:data:`~abd_fl.device.MEMORY_FORMATS`): ``channels_last`` | ``contiguous`` | ``auto``
    (channels_last on CPU). Restored to contiguous when the run ends."""

    def __post_init__(self) -> None:
        for name in ("iterations", "student_steps", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name == "iterations" else 1):
                raise ValueError(f"distill.{name} must be an integer >= {0 if name == 'iterations' else 1}, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"distill.lr must be > 0, got {self.lr}")
        if not self.temperature > 0:
            raise ValueError(f"distill.temperature must be > 0, got {self.temperature}")
        if self.kl_reduction not in KL_REDUCTIONS:
            raise ValueError(f"unknown distill.kl_reduction '{self.kl_reduction}'; choose one of: {', '.join(KL_REDUCTIONS)}")
        clip = self.clip_grad_norm
        if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not math.isfinite(clip) or clip <= 0):
            raise ValueError(f"distill.clip_grad_norm must be null or a finite number > 0, got {clip!r}")
        check_ensemble(self.ensemble, self.ensemble_trim, self.ensemble_vectorize)
        check_memory_format(self.memory_format)
        beta = self.attention_beta
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta < 0:
            raise ValueError(f"distill.attention_beta must be a finite number >= 0, got {beta!r}")


@dataclass
class DistillResult:
    """What one run of :func:`distill` produced besides the trained student."""

    wall_s: float
    defense_s: float
    history: list[dict[str, float]] = field(default_factory=list)
    defense_report: dict[str, Any] = field(default_factory=dict)


def _late_start(defense: DistillDefense | None, iterations: int) -> int:
    if defense is None or defense.late_phase_fraction <= 0:
        return iterations
    return iterations - max(1, math.ceil(defense.late_phase_fraction * iterations))


def _fixed_targets(ensemble: TeacherEnsemble, synthesizer: Synthesizer, cfg: DistillConfig) -> torch.Tensor | None:
    """The teachers' combined logits of every image of a fixed-input synthesizer that offers
    ``images`` and ``sample_indices`` (:class:`FixedDataSynthesizer`), computed once, when the
    run would otherwise compute them more often (more sampled images than stored ones); else None.
    The teachers are frozen in eval mode, so a lookup gives what a forward would, to float
    precision. Only for runs without a defense (which may purify the teachers' inputs or act on
    them) and without attention transfer (which needs the teachers' stage outputs per step)."""
    images = getattr(synthesizer, "images", None)
    if not callable(getattr(synthesizer, "sample_indices", None)) or not isinstance(images, torch.Tensor):
        return None
    if len(images) >= cfg.iterations * cfg.student_steps * cfg.batch_size:
        return None
    with torch.no_grad():
        return torch.cat([ensemble(images[i : i + cfg.batch_size]) for i in range(0, len(images), cfg.batch_size)])


def distill(
    teachers: Sequence[nn.Module] | TeacherEnsemble,
    student: nn.Module,
    synthesizer: Synthesizer,
    defense: DistillDefense | None = None,
    config: DistillConfig | None = None,
    device: torch.device | str = "cpu",
    image_shape: tuple[int, int, int] | None = None,
    progress: Callable[[int, dict[str, float]], None] | None = None,
) -> DistillResult:
    """Distil ``teachers`` into ``student`` on inputs from ``synthesizer`` (in place).

    ``image_shape`` (C, H, W) is required for generator-based synthesizers. ``progress``
    is called as ``progress(iteration, logs)`` after every iteration.
    """
    cfg = config or DistillConfig()
    device = torch.device(device)
    ensemble = (
        teachers if isinstance(teachers, TeacherEnsemble)
        else TeacherEnsemble(teachers, rule=cfg.ensemble, trim=cfg.ensemble_trim, vectorize=cfg.ensemble_vectorize)
    )
    memory_format = resolve_memory_format(cfg.memory_format, device)
    ensemble.to(device, memory_format=memory_format)
    student.to(device, memory_format=memory_format).train()
    if image_shape is None:
        image_shape = tuple(getattr(synthesizer, "images").shape[1:])  # fixed-data synthesizers
    torch.manual_seed(cfg.seed)
    defense_time = 0.0

    def timed_generator_term(x: torch.Tensor) -> torch.Tensor | None:
        nonlocal defense_time
        t0 = time.perf_counter()
        term = defense.generator_loss_term(x) if defense is not None else None
        defense_time += time.perf_counter() - t0
        return term

    # the optional hook: what the teachers see of every input (identity unless the defense purifies)
    teacher_input = getattr(defense, "teacher_input", None)
    hook = ensemble.register_forward_pre_hook(
        lambda _module, args: (teacher_input(args[0]), *args[1:])
    ) if callable(teacher_input) else None
    try:
        synthesizer.setup(
            ensemble, student, image_shape, device, timed_generator_term, seed=cfg.seed, total_iterations=cfg.iterations,
            memory_format=memory_format,
        )
        start = time.perf_counter()
        if defense is not None:
            t0 = time.perf_counter()
            defense.on_distill_start(
                DistillContext(
                    teachers=list(ensemble.teachers),
                    ensemble=ensemble,
                    student=student,
                    device=device,
                    total_iterations=cfg.iterations,
                    sample_surrogate=lambda: synthesizer.sample(cfg.batch_size),
                    fixed_inputs=bool(getattr(synthesizer, "fixed_inputs", False)),
                    student_steps=cfg.student_steps,
                )
            )
            defense_time += time.perf_counter() - t0

        total_steps = max(1, cfg.iterations * cfg.student_steps)
        optimizer = torch.optim.Adam(student.parameters(), lr=cfg.lr)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total_steps) if cfg.cosine else None
        late_started = False
        history: list[dict[str, float]] = []
        use_at = cfg.attention_beta > 0
        student_rec = StageRecorder(student) if use_at else None
        teacher_recs = [StageRecorder(t) for t in ensemble.teachers] if use_at else []
        # fixed inputs (the clean-KD reference): every image's targets once, then looked up
        fixed_targets = _fixed_targets(ensemble, synthesizer, cfg) if defense is None and not use_at else None
        for it in range(cfg.iterations):
            if defense is not None:
                t0 = time.perf_counter()
                defense.on_iteration(it)
                defense_time += time.perf_counter() - t0
            in_late_phase = defense is not None and it >= _late_start(defense, cfg.iterations)
            if in_late_phase and not late_started:
                late_started = True
                if defense.late_phase_lr is not None:  # a fresh student optimizer at a small lr (ABD's SR)
                    optimizer = torch.optim.Adam(student.parameters(), lr=defense.late_phase_lr)
                    late_steps = (cfg.iterations - it) * cfg.student_steps
                    scheduler = (
                        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, late_steps))
                        if getattr(defense, "late_phase_schedule", "constant") == "cosine" else None
                    )
            logs = synthesizer.generator_round(it)
            kd_total, at_total = 0.0, 0.0
            x_prev: torch.Tensor | None = None
            for _ in range(cfg.student_steps):
                if fixed_targets is not None:
                    idx = synthesizer.sample_indices(cfg.batch_size)  # type: ignore[attr-defined]
                    x, t_logits = synthesizer.images[idx], fixed_targets[idx]  # type: ignore[attr-defined]
                else:
                    x = synthesizer.sample(cfg.batch_size)
                    # a synthesizer that repeats a round's batch (ZSKT) gets the teachers' logits once; with
                    # attention transfer the teachers' stage outputs are recorded per step, so they run every step
                    if x is not x_prev or use_at:
                        with torch.no_grad(), recording(teacher_recs):
                            t_logits = ensemble(x)
                        x_prev = x
                with student_rec if student_rec is not None else nullcontext():
                    s_logits = student(x)
                per_sample = kd_kl_per_sample(s_logits, t_logits, cfg.temperature, cfg.kl_reduction)
                weights = None
                if defense is not None:
                    t0 = time.perf_counter()
                    weights = defense.kd_sample_weights(x, t_logits)
                    defense_time += time.perf_counter() - t0
                loss = per_sample.mean() if weights is None else (weights.to(per_sample) * per_sample).mean()
                kd_value = float(loss.detach())
                if student_rec is not None:  # + beta * AT, scaled by the same per-sample weights
                    at = attention_transfer_per_sample(
                        student_rec.take(), [r.take() for r in teacher_recs], ensemble.weights
                    )
                    at_total += float(at.detach().mean())
                    at = at if weights is None else weights.to(at) * at
                    loss = loss + cfg.attention_beta * at.mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if in_late_phase:
                    t0 = time.perf_counter()
                    defense.add_student_gradient(student, x)
                    defense_time += time.perf_counter() - t0
                elif cfg.clip_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.clip_grad_norm)
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                kd_total += kd_value
            logs = {**logs, "kd_loss": kd_total / cfg.student_steps, "late_phase": float(in_late_phase),
                    "student_lr": float(optimizer.param_groups[0]["lr"])}
            if use_at:
                logs["at_loss"] = at_total / cfg.student_steps
            if cfg.log_every and (it % cfg.log_every == 0 or it == cfg.iterations - 1):
                history.append({"iteration": float(it), **logs})
            if progress is not None:
                progress(it, logs)
        close = getattr(synthesizer, "close", None)
        if callable(close):
            close()
        student.eval()
        return DistillResult(
            wall_s=time.perf_counter() - start,
            defense_s=defense_time,
            history=history,
            defense_report=defense.report() if defense is not None else {},
        )
    finally:
        if hook is not None:
            hook.remove()
        if memory_format != torch.contiguous_format:  # callers see the usual layout (same values)
            ensemble.to(memory_format=torch.contiguous_format)
            student.to(memory_format=torch.contiguous_format)
