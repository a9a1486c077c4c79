"""The synthesizer interface: where the surrogate inputs of data-free KD come from."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, TypeVar

import torch
from torch import nn

ModuleT = TypeVar("ModuleT", bound=nn.Module)
GeneratorLossHook = Callable[[torch.Tensor], "torch.Tensor | None"]


class Synthesizer(ABC):
    """Produces surrogate inputs for distillation.

    The loop calls :meth:`setup` once, then per iteration :meth:`generator_round`
    (update the generator(s) / grow the pool) followed by several :meth:`sample` calls
    (the inputs of student steps). ``extra_generator_loss`` is the defense's hook: a
    synthesizer that trains a generator adds its value to the generator's loss.
    """

    fixed_inputs: bool = False
    """True for synthesizers that sample a fixed set of inputs (real/OOD data, no generator):
    the ABD reference weights the KD loss by the vaccine's mask only on such data."""

    def setup(
        self,
        ensemble: nn.Module,
        student: nn.Module,
        image_shape: tuple[int, int, int],
        device: torch.device,
        extra_generator_loss: GeneratorLossHook | None = None,
        seed: int = 0,
        total_iterations: int | None = None,
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> None:
        self.ensemble = ensemble
        self.student = student
        self.image_shape = image_shape
        self.device = device
        self.extra_generator_loss = extra_generator_loss
        self.seed = seed
        self.total_iterations = total_iterations
        """Iterations of the run (for learning-rate schedules); None when unknown."""
        self.memory_format = memory_format
        """The layout of the generators' 4-D weights (``distill.memory_format``): see :meth:`_place`."""
        self._setup()

    def _place(self, module: ModuleT) -> ModuleT:
        """``module`` on the device, its 4-D weights in the run's memory format (a generator's
        convolutions then produce images in that layout, as the teachers and student expect)."""
        return module.to(self.device, memory_format=self.memory_format)

    def _setup(self) -> None:
        """Build generators, optimizers, pools (after the common fields are set)."""

    @abstractmethod
    def generator_round(self, iteration: int) -> dict[str, float]:
        """One synthesis step; returns scalar logs (e.g. the generator loss)."""

    @abstractmethod
    def sample(self, batch_size: int) -> torch.Tensor:
        """A batch of surrogate inputs (N, C, H, W), detached, on the device. A synthesizer
        may return the very same tensor to several calls (ZSKT does within a round), so
        callers treat it as read-only; the loop then computes the teachers' logits once."""

    def _add_defense_term(self, loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.extra_generator_loss is None:
            return loss
        term = self.extra_generator_loss(x)
        return loss if term is None else loss + term
