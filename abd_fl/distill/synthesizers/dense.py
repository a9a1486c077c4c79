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
from torch import nn

from abd_fl.distill.losses import kd_kl_per_sample
from abd_fl.distill.synthesizers.base import Synthesizer
from abd_fl.models.generators import ConvGenerator


class BNStatisticsLoss:
    """Forward hooks on every ``BatchNorm2d`` of the given models (DeepInversion loss).

    After a forward pass, :meth:`value` is the sum over BN layers of
    ``||mean_batch - running_mean||_2 + ||var_batch - running_var||_2``.
    """

    def __init__(self, models: list[nn.Module]) -> None:
        self._terms: list[torch.Tensor] = []
        self._handles = [
            module.register_forward_hook(self._hook)
            for model in models
            for module in model.modules()
            if isinstance(module, nn.BatchNorm2d) and module.running_mean is not None
        ]
        if not self._handles:
            raise ValueError("the BN-statistics loss needs teachers with BatchNorm2d layers; none found")

    def _hook(self, module: nn.BatchNorm2d, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        x = inputs[0]
        mean = x.mean(dim=(0, 2, 3))
        var = x.permute(1, 0, 2, 3).reshape(x.shape[1], -1).var(dim=1, unbiased=False)
        self._terms.append(
            torch.norm(mean - module.running_mean, 2) + torch.norm(var - module.running_var, 2)
        )

    def reset(self) -> None:
        self._terms = []

    def value(self) -> torch.Tensor:
        return torch.stack(self._terms).sum() if self._terms else torch.zeros(())

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


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
        self.pool: list[torch.Tensor] = []
        self.pool_size = 0
        self.rng = torch.Generator().manual_seed(self.seed)

    def _new_generator(self) -> ConvGenerator:
        c, h, _ = self.image_shape
        return ConvGenerator(self.z_dim, h, c, self.ngf, "sigmoid").to(self.device)

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
        self.bn_loss.reset()
        self.student.zero_grad(set_to_none=True)
        self.student.train()
        assert best_x is not None
        self._add_to_pool(best_x)
        return {"generator_loss": best_loss, "pool_size": float(self.pool_size)}

    def _add_to_pool(self, x: torch.Tensor) -> None:
        self.pool.append(x)
        self.pool_size += x.shape[0]
        while self.pool_size > self.max_pool_size and len(self.pool) > 1:
            self.pool_size -= self.pool.pop(0).shape[0]

    def sample(self, batch_size: int) -> torch.Tensor:
        if not self.pool:
            raise RuntimeError("DENSE pool is empty: call generator_round() before sample()")
        pool = torch.cat(self.pool) if len(self.pool) > 1 else self.pool[0]
        if len(self.pool) > 1:
            self.pool = [pool]
        idx = torch.randint(0, pool.shape[0], (batch_size,), generator=self.rng).to(pool.device)
        return pool[idx]

    def close(self) -> None:
        self.bn_loss.remove()
