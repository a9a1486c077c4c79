"""ZSKT: zero-shot knowledge transfer by an adversarial generator (Micaelli & Storkey, 2019).

The generator maximises the teacher-student disagreement ``KL(T(x) || S(x))``; the
student then takes ``student_steps`` KD steps (1 : k schedule, set in the loop). This is
the "bad synthetic input supply" risk of the ABD paper (Sec. 3): maximising the
disagreement can rediscover the trigger.

Defaults follow the reference's ZSKT runs (illidanlab/ABD ``zskt/solver.py``,
``zskt/utils/loaders.py``, ``zskt/main.py``; DESIGN.md Sec. 4):

* ``z_reuse=True``: one z batch serves the generator step *and* the student steps that
  follow it (the reference's ``LearnableLoader`` with ``n_repeat_batch = 1 + k``); the
  student's images are regenerated from that z after the generator's update.
* ``z_dim=100``; generator Adam ``lr`` 1e-3 with ``cosine`` annealing over the run;
  the generator's gradient norm clipped to ``clip_grad_norm`` (5).
* ``kl_reduction="mean"``: the generator's disagreement is ``F.kl_div(...,
  reduction="mean")``, i.e. averaged over batch *and* classes (the reference); ``"sum"``
  sums over classes (a per-sample KL, our earlier default). Only the scale against the
  defense's term and the clipping threshold differ.
* ``student_bn="eval"`` (a departure): the student's BN uses and keeps its running
  statistics during the generator step. ``"train"`` is the reference's (batch statistics,
  updated by the generator's batch); on the 8x8 digits it collapsed the student to one
  class (central BadNets grid, seed 0: Acc 10.2% vs 80.4% with ``eval``, README).
"""

from __future__ import annotations

import torch

from abd_fl.distill.losses import KL_REDUCTIONS, kd_kl_per_sample
from abd_fl.distill.synthesizers.base import Synthesizer
from abd_fl.models.generators import ConvGenerator

STUDENT_BN_MODES = ("train", "eval")


class ZSKTSynthesizer(Synthesizer):
    def __init__(
        self,
        z_dim: int = 100,
        ngf: int = 64,
        lr: float = 1e-3,
        batch_size: int = 128,
        output_activation: str = "sigmoid",
        temperature: float = 1.0,
        z_reuse: bool = True,
        cosine: bool = True,
        clip_grad_norm: float | None = 5.0,
        kl_reduction: str = "mean",
        student_bn: str = "eval",
    ) -> None:
        if student_bn not in STUDENT_BN_MODES:
            raise ValueError(f"unknown zskt student_bn '{student_bn}'; choose one of: {', '.join(STUDENT_BN_MODES)}")
        if kl_reduction not in KL_REDUCTIONS:
            raise ValueError(f"unknown zskt kl_reduction '{kl_reduction}'; choose one of: {', '.join(KL_REDUCTIONS)}")
        if clip_grad_norm is not None and not (isinstance(clip_grad_norm, (int, float)) and clip_grad_norm > 0):
            raise ValueError(f"zskt clip_grad_norm must be null or a number > 0, got {clip_grad_norm!r}")
        self.z_dim = z_dim
        self.ngf = ngf
        self.lr = lr
        self.batch_size = batch_size
        self.output_activation = output_activation
        self.temperature = temperature
        self.z_reuse = bool(z_reuse)
        self.cosine = bool(cosine)
        self.clip_grad_norm = None if clip_grad_norm is None else float(clip_grad_norm)
        self.kl_reduction = kl_reduction
        self.student_bn = student_bn
        self.z_draws = 0
        """How many z batches were drawn so far (one per 1 + k steps with ``z_reuse``)."""

    def _setup(self) -> None:
        c, h, _ = self.image_shape
        torch.manual_seed(self.seed)
        self.generator = self._place(ConvGenerator(self.z_dim, h, c, self.ngf, self.output_activation))
        self.optimizer = torch.optim.Adam(self.generator.parameters(), lr=self.lr)
        total = self.total_iterations
        self.scheduler = (
            torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, max(1, total))
            if self.cosine and total is not None else None
        )
        self._round_z: torch.Tensor | None = None
        self._round_images: torch.Tensor | None = None
        self.z_draws = 0

    def _z(self, n: int) -> torch.Tensor:
        self.z_draws += 1
        return torch.randn(n, self.z_dim, device=self.device)

    @property
    def generator_lr(self) -> float:
        """The generator's current learning rate (cosine-annealed over the run by default)."""
        return float(self.optimizer.param_groups[0]["lr"])

    def generator_round(self, iteration: int) -> dict[str, float]:
        self.generator.train()
        was_training = self.student.training
        self.student.train(self.student_bn == "train")
        z = self._z(self.batch_size)
        self._round_z = z if self.z_reuse else None
        self._round_images = None  # the updated generator's images of z, made once on the first sample()
        x = self.generator(z)
        disagreement = kd_kl_per_sample(self.student(x), self.ensemble(x), self.temperature, self.kl_reduction).mean()
        loss = self._add_defense_term(-disagreement, x)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = (
            float(torch.nn.utils.clip_grad_norm_(self.generator.parameters(), self.clip_grad_norm))
            if self.clip_grad_norm is not None else float("nan")
        )
        lr = self.generator_lr
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.student.zero_grad(set_to_none=True)
        self.student.train(was_training)
        return {"generator_loss": float(loss.detach()), "generator_lr": lr, "generator_grad_norm": grad_norm}

    @torch.no_grad()
    def sample(self, batch_size: int) -> torch.Tensor:
        """A batch from the generator (in train mode: batch statistics, as while training).

        With ``z_reuse`` and ``batch_size`` equal to the round's, the images come from the
        z of the last generator step (the reference's repeated batch); otherwise fresh z.
        The generator does not change between a round's student steps and a train-mode
        forward of the same z gives the same images, so they are computed once per round
        and the same tensor is returned to every student step of that round (read-only:
        callers must not modify it in place). The reference regenerates them per step; only
        the generator's unused BN running statistics differ.
        """
        self.generator.train()
        if self._round_z is not None and self._round_z.shape[0] == batch_size:
            if self._round_images is None:
                self._round_images = self.generator(self._round_z).detach()
            return self._round_images
        return self.generator(self._z(batch_size)).detach()
