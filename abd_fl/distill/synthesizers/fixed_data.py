"""Distillation on a fixed set of inputs: the clean-KD reference (20% of the real training
images, the paper's "Clean KD") and, later, OOD/unlabeled data (FedDF, OOD patches)."""

from __future__ import annotations

import torch

from abd_fl.distill.synthesizers.base import Synthesizer


class FixedDataSynthesizer(Synthesizer):
    """Samples mini-batches (with replacement across batches) from fixed images in [0, 1]."""

    fixed_inputs = True

    def __init__(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[0] == 0:
            raise ValueError(f"fixed distillation data must be a non-empty (N, C, H, W) tensor, got {tuple(images.shape)}")
        self.images = images

    def _setup(self) -> None:
        self.images = self.images.to(self.device)
        self.rng = torch.Generator().manual_seed(self.seed)

    def generator_round(self, iteration: int) -> dict[str, float]:
        return {}

    def sample_indices(self, batch_size: int) -> torch.Tensor:
        """The rows of ``images`` that :meth:`sample` would return next (the same draw): lets
        the loop look up the teachers' targets of these images instead of recomputing them."""
        return torch.randint(0, self.images.shape[0], (batch_size,), generator=self.rng).to(self.images.device)

    def sample(self, batch_size: int) -> torch.Tensor:
        return self.images[self.sample_indices(batch_size)]
