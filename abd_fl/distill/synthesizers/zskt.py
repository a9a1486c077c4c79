"""ZSKT: zero-shot knowledge transfer by an adversarial generator (Micaelli & Storkey, 2019).

The generator maximises the teacher-student disagreement ``KL(T(x) || S(x))``; the
student then takes ``student_steps`` KD steps on fresh samples (1 : k schedule, set in
the loop). This is the "bad synthetic input supply" risk of the ABD paper (Sec. 3):
maximising the disagreement can rediscover the trigger.
"""

from __future__ import annotations

import torch

from abd_fl.distill.losses import kd_kl_per_sample
from abd_fl.distill.synthesizers.base import Synthesizer
from abd_fl.models.generators import ConvGenerator


class ZSKTSynthesizer(Synthesizer):
    def __init__(
        self,
        z_dim: int = 64,
        ngf: int = 64,
        lr: float = 1e-3,
        batch_size: int = 128,
        output_activation: str = "sigmoid",
        temperature: float = 1.0,
    ) -> None:
        self.z_dim = z_dim
        self.ngf = ngf
        self.lr = lr
        self.batch_size = batch_size
        self.output_activation = output_activation
        self.temperature = temperature

    def _setup(self) -> None:
        c, h, _ = self.image_shape
        torch.manual_seed(self.seed)
        self.generator = ConvGenerator(self.z_dim, h, c, self.ngf, self.output_activation).to(self.device)
        self.optimizer = torch.optim.Adam(self.generator.parameters(), lr=self.lr)

    def _z(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.z_dim, device=self.device)

    def generator_round(self, iteration: int) -> dict[str, float]:
        self.generator.train()
        was_training = self.student.training
        self.student.eval()  # the generator step must not move the student's BN statistics
        x = self.generator(self._z(self.batch_size))
        disagreement = kd_kl_per_sample(self.student(x), self.ensemble(x), self.temperature).mean()
        loss = self._add_defense_term(-disagreement, x)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.student.zero_grad(set_to_none=True)
        self.student.train(was_training)
        return {"generator_loss": float(loss.detach())}

    @torch.no_grad()
    def sample(self, batch_size: int) -> torch.Tensor:
        self.generator.train()  # ZSKT samples with batch statistics, as while training
        return self.generator(self._z(batch_size)).detach()
