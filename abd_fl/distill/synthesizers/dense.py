"""DENSE: data-free one-shot federated learning (Zhang et al., NeurIPS 2022).

Each round a fresh generator (and latent batch) is optimised for ``g_steps`` against the
client ensemble with three terms, then its images join a growing pool from which the
student distils the ensemble's averaged logits:

- BN-statistics loss: the batch statistics of the synthetic images at every BatchNorm
  of every teacher should match that BN's running statistics (DeepInversion);
- CE(ensemble(x), y) towards random target labels y (class balance, "one-hot" loss);
- boundary/adversarial loss: maximise KL between ensemble and student on the samples
  where they still agree (hard samples near the student's decision boundary).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from abd_fl.distill.losses import kd_kl_per_sample
from abd_fl.distill.synthesizers.base import Synthesizer
from abd_fl.distill.synthesizers.common import BNStatisticsLoss, ImagePool
from abd_fl.models.generators import ConvGenerator


class DENSESynthesizer(Synthesizer):
    def __init__(
        self,
        z_dim: int = 256,
        ngf: int = 64,
        lr: float = 1e-3,
        g_steps: int = 30,
        batch_size: int = 128,
        bn_weight: float = 1.0,
        oh_weight: float = 1.0,
        adv_weight: float = 1.0,
        max_pool_size: int = 20000,
        num_classes: int | None = None,
    ) -> None:
        self.z_dim = z_dim
        self.ngf = ngf
        self.lr = lr
        self.g_steps = g_steps
        self.batch_size = batch_size
        self.bn_weight = bn_weight
        self.oh_weight = oh_weight
        self.adv_weight = adv_weight
        self.max_pool_size = max_pool_size
        self.num_classes = num_classes

    def _setup(self) -> None:
        teachers = list(getattr(self.ensemble, "teachers", [self.ensemble]))
        self.bn_loss = BNStatisticsLoss(teachers)
        self.bn_loss.enabled = False  # recording only during generator steps
        self.pool = ImagePool(self.max_pool_size)
        self.rng = torch.Generator().manual_seed(self.seed)

    def _new_generator(self) -> ConvGenerator:
        c, h, _ = self.image_shape
        return self._place(ConvGenerator(self.z_dim, h, c, self.ngf, "sigmoid"))

    def generator_round(self, iteration: int) -> dict[str, float]:
        generator = self._new_generator()
        z = torch.randn(self.batch_size, self.z_dim, generator=self.rng).to(self.device).requires_grad_(True)
        n_classes = self.num_classes
        if n_classes is None:
            with torch.no_grad():
                n_classes = int(self.ensemble(generator(z[:2])).shape[1])
        targets = torch.randint(0, n_classes, (self.batch_size,), generator=self.rng).to(self.device)
        optimizer = torch.optim.Adam([{"params": generator.parameters()}, {"params": [z]}], lr=self.lr, betas=(0.5, 0.999))
        best_loss, best_x = float("inf"), None
        self.student.eval()
        self.bn_loss.enabled = True
        for _ in range(self.g_steps):
            x = generator(z)
            self.bn_loss.reset()
            t_logits = self.ensemble(x)
            loss_bn = self.bn_loss.value()
            loss_oh = F.cross_entropy(t_logits, targets)
            s_logits = self.student(x)
            agree = (s_logits.argmax(1) == t_logits.argmax(1)).float()
            loss_adv = -(kd_kl_per_sample(s_logits, t_logits) * agree).mean()
            loss = self.bn_weight * loss_bn + self.oh_weight * loss_oh + self.adv_weight * loss_adv
            loss = self._add_defense_term(loss, x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if float(loss.detach()) < best_loss:
                best_loss, best_x = float(loss.detach()), x.detach()
        self.bn_loss.enabled = False
        self.bn_loss.reset()
        self.student.zero_grad(set_to_none=True)
        self.student.train()
        assert best_x is not None
        self.pool.add(best_x)
        return {"generator_loss": best_loss, "pool_size": float(len(self.pool))}

    def sample(self, batch_size: int) -> torch.Tensor:
        return self.pool.sample(batch_size, self.rng)

    def close(self) -> None:
        self.bn_loss.remove()
