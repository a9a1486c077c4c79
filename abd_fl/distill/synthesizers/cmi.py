"""CMI: Contrastive Model Inversion (Fang et al., IJCAI 2021).

Every round a generator and a fresh latent batch are optimised for ``g_steps`` against
the teacher ensemble; the best batch of the round joins a growing image pool from which the
student distils (as DENSE), and its teacher features join a memory bank. As in the CMI
reference, the generator is re-initialised every round (``reset_generator``); with few
generator steps per round (small CPU budgets) keeping it across rounds learns more (on
8x8 digits, 40 rounds of 10 steps: student Acc 68% kept vs. 50% reset, one probe). The
generator's loss is

    bn_weight * BN-statistics loss        (DeepInversion: batch mean/var at every teacher
                                           BatchNorm vs. its running statistics)
  + oh_weight * CE(T(x), y)               (random target labels y)
  + adv_weight * adversarial loss         (maximise KL(T || S) where S and T still agree)
  + cr_weight * contrastive loss          (instance discrimination, below)
  + the defense's generator-loss term.

Contrastive loss: two differentiable views of the synthesised batch, a "global" view
(random shift with zero fill, flip) and a "local" one (random resized crop, flip; ``flip``
off for inputs that are not mirror-invariant, such as digits). The
teacher features of a view are the per-sample channel means of every teacher BatchNorm's
input (the same hooks as the BN-statistics loss), projected by a small MLP head onto the
unit sphere. InfoNCE at temperature ``cr_temperature``: each local-view embedding must
pick out the global-view embedding of the same image among those of the batch and of up
to ``n_neg`` past samples from the memory bank (whose features are projected by the
current head). Images that the teachers already embed like earlier samples are penalised,
which pushes the pool towards diversity. The global view feeds the BN, CE and adversarial
terms; the defense term sees the un-augmented batch.

Teachers are the client ensemble: BN statistics and features are taken from every
teacher (features concatenated), the CE and adversarial terms use the averaged logits.
Inputs are pixel-space [0, 1] (sigmoid generator; models normalise internally).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from abd_fl.distill.losses import kd_kl_per_sample
from abd_fl.distill.synthesizers.base import Synthesizer
from abd_fl.distill.synthesizers.common import BNStatisticsLoss, ImagePool, check_int, check_number
from abd_fl.models.generators import ConvGenerator


class ProjectionHead(nn.Module):
    """Linear-ReLU-Linear, output L2-normalised."""

    def __init__(self, dim_in: int, hidden: int, dim_out: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim_in, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=1)


class FeatureBank:
    """A ring buffer of the (local, global) teacher features of past synthesised samples."""

    def __init__(self, max_size: int, dim: int, device: torch.device) -> None:
        self.max_size = max_size
        self.dim = dim
        self.data = torch.empty(max_size, 2, dim, device=device)
        self.size = 0
        self._ptr = 0

    def __len__(self) -> int:
        return self.size

    def add(self, local: torch.Tensor, global_: torch.Tensor) -> None:
        pairs = torch.stack([local.detach(), global_.detach()], dim=1)[-self.max_size :]
        n = pairs.shape[0]
        idx = (self._ptr + torch.arange(n)) % self.max_size
        self.data[idx.to(self.data.device)] = pairs.to(self.data)
        self._ptr = (self._ptr + n) % self.max_size
        self.size = min(self.size + n, self.max_size)

    def sample(self, k: int, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Up to ``k`` stored (local, global) feature rows, drawn without replacement."""
        idx = torch.randperm(self.size, generator=rng)[: min(k, self.size)].to(self.data.device)
        rows = self.data[idx]
        return rows[:, 0], rows[:, 1]


def random_views(
    x: torch.Tensor, rng: torch.Generator, min_scale: float, max_shift: float, flip: bool
) -> torch.Tensor:
    """Per-sample differentiable crop/shift/flip of ``x`` (N, C, H, W) by an affine grid.

    ``min_scale`` < 1: random resized crop (area fraction in [min_scale, 1], aspect ratio
    in [3/4, 4/3], the crop inside the image) resized back to H x W. ``max_shift`` > 0: a
    shift by up to that fraction of the image size, zero-filled (a random crop of the
    zero-padded image). ``flip``: horizontal flip with probability 1/2.
    """
    n = x.shape[0]
    u = torch.rand(n, 5, generator=rng)
    area = min_scale + (1.0 - min_scale) * u[:, 0]
    log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[:, 1]
    if min_scale >= 1.0:
        log_ratio = torch.zeros(n)  # no crop: keep the full image
    sx = (area.sqrt() * (0.5 * log_ratio).exp()).clamp(max=1.0)
    sy = (area.sqrt() * (-0.5 * log_ratio).exp()).clamp(max=1.0)
    tx = (1.0 - sx + 2 * max_shift) * (2 * u[:, 2] - 1)
    ty = (1.0 - sy + 2 * max_shift) * (2 * u[:, 3] - 1)
    fx = torch.where(u[:, 4] < 0.5, -1.0, 1.0) if flip else torch.ones(n)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = sx * fx, tx
    theta[:, 1, 1], theta[:, 1, 2] = sy, ty
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class CMISynthesizer(Synthesizer):
    def __init__(
        self,
        z_dim: int = 256,
        ngf: int = 64,
        lr: float = 1e-3,
        g_steps: int = 10,
        batch_size: int = 64,
        bn_weight: float = 1.0,
        oh_weight: float = 0.5,
        adv_weight: float = 0.5,
        cr_weight: float = 0.8,
        cr_temperature: float = 0.1,
        head_dim: int = 128,
        head_hidden: int = 256,
        bank_size: int = 4096,
        n_neg: int = 256,
        local_min_scale: float = 0.25,
        global_shift: float = 0.125,
        flip: bool = True,
        max_pool_size: int = 20000,
        num_classes: int | None = None,
        reset_generator: bool = True,
    ) -> None:
        for name, value, low in (
            ("z_dim", z_dim, 1), ("ngf", ngf, 1), ("g_steps", g_steps, 1), ("batch_size", batch_size, 2),
            ("head_dim", head_dim, 1), ("head_hidden", head_hidden, 1), ("bank_size", bank_size, 1),
            ("n_neg", n_neg, 0), ("max_pool_size", max_pool_size, 1),
        ):
            check_int(name, value, low)
        for name, value in (("bn_weight", bn_weight), ("oh_weight", oh_weight), ("adv_weight", adv_weight), ("cr_weight", cr_weight)):
            check_number(name, value, 0.0)
        check_number("lr", lr, 0.0, low_open=True)
        check_number("cr_temperature", cr_temperature, 0.0, low_open=True)
        check_number("local_min_scale", local_min_scale, 0.0, 1.0, low_open=True)
        check_number("global_shift", global_shift, 0.0, 0.5)
        for name, value in (("flip", flip), ("reset_generator", reset_generator)):
            if not isinstance(value, bool):
                raise ValueError(f"distill.synthesizer_params.{name} must be true or false, got {value!r}")
        if num_classes is not None:
            check_int("num_classes", num_classes, 2)
        self.z_dim, self.ngf, self.lr, self.g_steps, self.batch_size = z_dim, ngf, lr, g_steps, batch_size
        self.bn_weight, self.oh_weight, self.adv_weight = bn_weight, oh_weight, adv_weight
        self.cr_weight, self.cr_temperature = cr_weight, cr_temperature
        self.head_dim, self.head_hidden, self.bank_size, self.n_neg = head_dim, head_hidden, bank_size, n_neg
        self.local_min_scale, self.global_shift, self.flip = local_min_scale, global_shift, flip
        self.max_pool_size = max_pool_size
        self.num_classes = num_classes
        self.reset_generator = reset_generator
        self.last_trace: list[dict[str, float]] = []
        """Per-step loss terms of the latest round (bn, oh, adv, cr, total)."""

    # ---- set-up -------------------------------------------------------------------------
    def _setup(self) -> None:
        teachers = list(getattr(self.ensemble, "teachers", [self.ensemble]))
        self.hooks = BNStatisticsLoss(teachers, collect_features=True)
        self.rng = torch.Generator().manual_seed(self.seed)
        self.pool = ImagePool(self.max_pool_size)
        self.hooks.enabled = False  # the hooks record only inside _teacher_pass
        with torch.no_grad():  # probe: number of classes and the feature width
            probe = torch.full((2, *self.image_shape), 0.5, device=self.device)
            logits, _, features = self._teacher_pass(probe, stats=False)
        feature_dim = int(features.shape[1])
        self.n_classes = int(self.num_classes or logits.shape[1])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.head = ProjectionHead(feature_dim, self.head_hidden, self.head_dim).to(self.device)
        self.head_optimizer = torch.optim.Adam(self.head.parameters(), lr=self.lr)
        self.bank = FeatureBank(self.bank_size, feature_dim, self.device)
        self.generator = self._new_generator()

    def _new_generator(self) -> ConvGenerator:
        c, h, _ = self.image_shape
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=self.rng))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self._place(ConvGenerator(self.z_dim, h, c, self.ngf, "sigmoid"))

    # ---- the generator's loss -------------------------------------------------------------
    def _teacher_pass(self, x: torch.Tensor, stats: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Ensemble logits, BN-statistics loss (0 unless ``stats``) and features of ``x``."""
        self.hooks.reset()
        self.hooks.enabled, self.hooks.stats = True, stats
        try:
            logits = self.ensemble(x)
            bn, features = self.hooks.value().to(x), self.hooks.features()
        finally:
            self.hooks.enabled = False
            self.hooks.reset()
        return logits, bn, features

    def contrastive_loss(self, local: torch.Tensor, global_: torch.Tensor) -> torch.Tensor:
        """InfoNCE of local-view vs. global-view embeddings, with memory-bank negatives.

        Row i's positive is column i; the other columns (the batch and the bank samples)
        are negatives. The loss of the current batch and that of the bank rows are averaged
        separately and summed, so the generator's gradient does not shrink with the bank.
        """
        bank_local, bank_global = self.bank.sample(self.n_neg, self.rng)
        anchors = self.head(torch.cat([local, bank_local.to(local)]))
        keys = self.head(torch.cat([global_, bank_global.to(global_)])).detach()
        logits = anchors @ keys.T / self.cr_temperature
        per_row = F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device), reduction="none")
        n = local.shape[0]
        return per_row[:n].mean() + (per_row[n:].mean() if per_row.shape[0] > n else 0.0)

    def losses(self, x: torch.Tensor, targets: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Loss terms on synthetic batch ``x`` (with graph), and its local/global features."""
        global_view = random_views(x, self.rng, 1.0, self.global_shift, self.flip)
        local_view = random_views(x, self.rng, self.local_min_scale, 0.0, self.flip)
        t_logits, loss_bn, global_feat = self._teacher_pass(global_view, stats=True)
        _, _, local_feat = self._teacher_pass(local_view, stats=False)
        s_logits = self.student(global_view)
        agree = (s_logits.argmax(1) == t_logits.argmax(1)).float()
        terms = {
            "bn": loss_bn,
            "oh": F.cross_entropy(t_logits, targets),
            "adv": -(kd_kl_per_sample(s_logits, t_logits) * agree).mean(),
            "cr": self.contrastive_loss(local_feat, global_feat),
        }
        return terms, local_feat, global_feat

    # ---- one round ---------------------------------------------------------------------------
    def generator_round(self, iteration: int) -> dict[str, float]:
        if self.reset_generator:
            self.generator = self._new_generator()
        generator = self.generator
        z = torch.randn(self.batch_size, self.z_dim, generator=self.rng).to(self.device).requires_grad_(True)
        targets = torch.randint(0, self.n_classes, (self.batch_size,), generator=self.rng).to(self.device)
        optimizer = torch.optim.Adam([{"params": generator.parameters()}, {"params": [z]}], lr=self.lr, betas=(0.5, 0.999))
        weights = {"bn": self.bn_weight, "oh": self.oh_weight, "adv": self.adv_weight, "cr": self.cr_weight}
        was_training = self.student.training
        self.student.eval()  # the generator step must not move the student's BN statistics
        best: tuple[float, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, float]] | None = None
        self.last_trace = []
        try:
            for _ in range(self.g_steps):
                x = generator(z)
                terms, local_feat, global_feat = self.losses(x, targets)
                loss = sum(weights[k] * v for k, v in terms.items())
                loss = self._add_defense_term(loss, x)
                values = {k: float(v.detach()) for k, v in terms.items()}
                values["total"] = float(loss.detach())
                self.last_trace.append(values)
                if best is None or values["total"] < best[0]:
                    best = (values["total"], x.detach(), local_feat.detach(), global_feat.detach(), values)
                optimizer.zero_grad(set_to_none=True)
                self.head_optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                self.head_optimizer.step()
        finally:
            self.student.zero_grad(set_to_none=True)
            self.student.train(was_training)
        assert best is not None
        total, best_x, best_local, best_global, values = best
        self.pool.add(best_x)
        self.bank.add(best_local, best_global)
        logs = {"generator_loss": total, **{f"loss_{k}": v for k, v in values.items() if k != "total"}}
        return {**logs, "pool_size": float(len(self.pool)), "bank_size": float(len(self.bank))}

    def sample(self, batch_size: int) -> torch.Tensor:
        """Images from the pool; before the first round, from the (untrained) generator."""
        if len(self.pool) == 0:
            with torch.no_grad():
                z = torch.randn(batch_size, self.z_dim, generator=self.rng).to(self.device)
                return self.generator(z).detach()
        return self.pool.sample(batch_size, self.rng)

    def close(self) -> None:
        self.hooks.remove()
