"""The hook interface through which a defense plugs into data-free distillation.

The distillation loop (:mod:`abd_fl.distill.loop`) defines this interface and never
imports a defense; ABD (:mod:`abd_fl.defense`) implements it, and whoever builds a run
passes it in. Three hook points, one per place the ABD paper acts (Sec. 4):

1. ``generator_loss_term(x)`` -- a term added to the generator's loss while synthesising
   (Shuffling Vaccine, "suppressing backdoor generation", Sec. 4.1 (1)).
2. ``kd_sample_weights(x, teacher_logits)`` -- per-sample weights on the KD loss
   (Shuffling Vaccine, "suppressing suspicious distillation", Sec. 4.1 (2)).
3. ``add_student_gradient(student, x)`` -- an extra contribution to the student's
   gradient in the late phase of training, after the KD backward pass and before the
   optimizer step (Self-Retrospection, Algorithm 1). The loop starts a fresh student
   optimizer at ``late_phase_lr`` when the late phase begins. ``late_phase_fraction`` is
   read every iteration, so a defense may switch the late phase on or off as it learns
   (Algorithm 2 decides on SR only after the vaccine search).

One optional hook, looked up with ``getattr`` (a defense without it is still a
:class:`DistillDefense`): ``teacher_input(x) -> x'``, what every call of the teacher
ensemble sees of its input (the synthesizer's generator step and the KD targets alike; the
student still sees ``x``; a module that calls a member teacher directly does not pass
through it). The loop installs it as a forward pre-hook on the ensemble for the run and
removes it afterwards; ABD's targeted retrospection uses it to purify a found trigger's pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import torch
from torch import nn


@dataclass
class DistillContext:
    """What a defense may look at when distillation starts (no training or test data)."""

    teachers: Sequence[nn.Module]
    ensemble: nn.Module
    student: nn.Module
    device: torch.device
    total_iterations: int
    sample_surrogate: Callable[[], torch.Tensor]
    """Draws one batch of surrogate inputs from the synthesizer (for vaccine search)."""
    fixed_inputs: bool = False
    """True when the synthesizer samples a fixed set of inputs (OOD / real data), not a generator."""
    student_steps: int = 1
    """Student steps per iteration (the loop's 1 : k schedule)."""


@runtime_checkable
class DistillDefense(Protocol):
    """A plug-in defense for :func:`abd_fl.distill.loop.distill`."""

    late_phase_fraction: float
    """Fraction of the final iterations in which ``add_student_gradient`` runs (0 = never)."""
    late_phase_lr: float | None
    """Learning rate of the fresh student optimizer of the late phase (None = keep the optimizer)."""
    late_phase_schedule: str
    """``cosine`` (the fresh optimizer's lr anneals to 0 over the late phase, as the ABD
    reference's SR stage) or ``constant``."""

    def on_distill_start(self, ctx: DistillContext) -> None:
        """Called once before the first iteration."""

    def on_iteration(self, iteration: int) -> None:
        """Called at the start of every iteration (e.g. to search for a vaccine after a warm-up)."""

    def generator_loss_term(self, x: torch.Tensor) -> torch.Tensor | None:
        """A scalar added to the generator's loss on synthetic batch ``x`` (None = nothing)."""

    def kd_sample_weights(self, x: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor | None:
        """Per-sample weights (N,) for the KD loss on ``x`` (None = uniform)."""

    def add_student_gradient(self, student: nn.Module, x: torch.Tensor) -> None:
        """Accumulate an extra gradient into ``student``'s ``.grad`` (late phase only)."""

    def report(self) -> dict[str, Any]:
        """JSON-serialisable facts about this run of the defense (vaccine outcome, scores)."""


class NullDefense:
    """A defense that does nothing; subclass it to implement only some hooks."""

    late_phase_fraction: float = 0.0
    late_phase_lr: float | None = None
    late_phase_schedule: str = "constant"

    def on_distill_start(self, ctx: DistillContext) -> None:
        return None

    def on_iteration(self, iteration: int) -> None:
        return None

    def generator_loss_term(self, x: torch.Tensor) -> torch.Tensor | None:
        return None

    def kd_sample_weights(self, x: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor | None:
        return None

    def add_student_gradient(self, student: nn.Module, x: torch.Tensor) -> None:
        return None

    def teacher_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def report(self) -> dict[str, Any]:
        return {}
