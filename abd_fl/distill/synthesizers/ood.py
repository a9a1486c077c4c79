"""OOD patches: distillation on augmented crops of ONE real image (Asano & Saeed, 2021,
"Extrapolating from a single image to a thousand classes using distillation").

No generator and no training data: the surrogate inputs are random patches of a single
out-of-distribution photo (scikit-learn's embedded ``china`` or ``flower``, or any image
file via ``image_path``). Each patch is cut with torchvision's v2 transforms, following
the single-image recipe: a random initial crop (``init_crop`` of the shorter side, so that
patches do not concentrate on the centre), a random resized crop (area fraction in
``[min_scale, 1]``), a random rotation/shear (on a sqrt(2)-larger crop, then centre-cropped,
so no fill shows), a horizontal flip, colour jitter (3-channel targets, with probability
``jitter_prob``) and a conversion to the target's channels (grayscale for 1 channel) at the
target size. The ABD paper distils on such patches with CutMix at probability 1 and
Beta(0.25, 0.25) mixing (its appendix A); :meth:`OODPatchSynthesizer.sample` does the same
between two random patches of the pool, with a box per sample.

A pool of ``num_patches`` patches is cut at set-up; every :meth:`generator_round` replaces
the ``batch_size`` oldest with fresh ones, so a long run sees many distinct crops. ABD acts
here through its per-sample KD weights (SV on OOD distillation) and SR; there is no
generator loss for its generator-loss hook.
"""

from __future__ import annotations

import math
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np
import torch

from abd_fl.distill.synthesizers.base import Synthesizer
from abd_fl.distill.synthesizers.common import check_int, check_number

if TYPE_CHECKING:
    from torchvision.transforms import v2

# torchvision and scikit-learn (the embedded photos) are imported when an OOD synthesizer is
# built, so that importing abd_fl.distill stays light (Ray workers import it).


def cutmix(
    x: torch.Tensor, other: torch.Tensor, beta: float, prob: float, rng: np.random.Generator
) -> torch.Tensor:
    """CutMix per sample: with probability ``prob`` a box of area fraction ``1 - lam``
    (``lam ~ Beta(beta, beta)``, box centred uniformly, clipped at the border) of ``x[i]``
    is replaced by the same box of ``other[i]``."""
    n, _, h, w = x.shape
    lam = rng.beta(beta, beta, size=n)
    apply = rng.random(n) < prob
    cut = np.sqrt(1.0 - lam)
    half_h, half_w = np.round(cut * h / 2), np.round(cut * w / 2)
    cy, cx = rng.integers(0, h, size=n), rng.integers(0, w, size=n)
    y0, y1 = np.clip(cy - half_h, 0, h), np.clip(cy + half_h, 0, h)
    x0, x1 = np.clip(cx - half_w, 0, w), np.clip(cx + half_w, 0, w)

    def column(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(a, device=x.device).view(n, 1)

    rows = torch.arange(h, device=x.device).view(1, h)
    cols = torch.arange(w, device=x.device).view(1, w)
    in_rows = (rows >= column(y0)) & (rows < column(y1))  # (n, h)
    in_cols = (cols >= column(x0)) & (cols < column(x1))  # (n, w)
    box = in_rows[:, :, None] & in_cols[:, None, :] & column(apply)[:, :, None]
    return torch.where(box[:, None], other, x)


class OODPatchSynthesizer(Synthesizer):

    fixed_inputs = True
    def __init__(
        self,
        image: str = "china",
        image_path: str | None = None,
        num_patches: int = 2048,
        batch_size: int = 64,
        source_size: int = 256,
        init_crop: float = 0.5,
        min_scale: float = 0.002,
        degrees: float = 30.0,
        shear: float = 30.0,
        flip: bool = True,
        color_jitter: float = 0.4,
        jitter_prob: float = 0.5,
        cutmix_prob: float = 1.0,
        cutmix_beta: float = 0.25,
    ) -> None:
        from torchvision.transforms import v2

        from abd_fl.data.ood import OOD_SOURCE_NAMES, load_ood_image

        if image not in OOD_SOURCE_NAMES:
            raise ValueError(f"distill.synthesizer_params.image must be one of: {', '.join(OOD_SOURCE_NAMES)}, got {image!r}")
        check_int("num_patches", num_patches, 1)
        check_int("batch_size", batch_size, 0)
        check_int("source_size", source_size, 8)
        check_number("init_crop", init_crop, 0.0, 1.0, low_open=True)
        check_number("min_scale", min_scale, 0.0, 1.0, low_open=True)
        check_number("degrees", degrees, 0.0, 180.0)
        check_number("shear", shear, 0.0, 89.0)
        check_number("color_jitter", color_jitter, 0.0, 1.0)
        check_number("jitter_prob", jitter_prob, 0.0, 1.0)
        check_number("cutmix_prob", cutmix_prob, 0.0, 1.0)
        check_number("cutmix_beta", cutmix_beta, 0.0, low_open=True)
        if not isinstance(flip, bool):
            raise ValueError(f"distill.synthesizer_params.flip must be true or false, got {flip!r}")
        try:
            source = load_ood_image(image, image_path)
        except ValueError as err:
            raise ValueError(f"distill.synthesizer_params.image_path: {err}") from None
        short = min(source.shape[1:])
        if short > source_size:  # patches are tiny: cut them from a smaller copy, much faster
            source = v2.functional.resize(source, source_size, antialias=True)
        self.source = source
        self.image_name = Path(image_path).name if image_path else image
        self.num_patches, self.batch_size = num_patches, batch_size
        self.init_crop, self.min_scale, self.degrees, self.shear, self.flip = init_crop, min_scale, degrees, shear, flip
        self.color_jitter, self.jitter_prob = color_jitter, jitter_prob
        self.cutmix_prob, self.cutmix_beta = cutmix_prob, cutmix_beta

    def _setup(self) -> None:
        c, h, w = self.image_shape
        if c not in (1, 3):
            raise ValueError(f"OOD patches need 1 or 3 image channels, got {c}")
        self.transform = self._build_transform(c, h, w)
        self.rng = torch.Generator().manual_seed(self.seed)
        self.np_rng = np.random.default_rng(self.seed)
        self.pool = self.cut_patches(self.num_patches).to(self.device)
        self._next = 0  # the oldest patch, replaced first
        self.patches_cut = self.num_patches

    def _build_transform(self, c: int, h: int, w: int) -> v2.Compose:
        from torchvision.transforms import v2

        steps: list[torch.nn.Module] = []
        short = min(self.source.shape[1:])
        init = int(self.init_crop * short)
        if self.init_crop < 1.0 and init >= 1:
            steps.append(v2.RandomCrop(init))
        affine = self.degrees > 0 or self.shear > 0
        size = (math.ceil(math.sqrt(2) * h), math.ceil(math.sqrt(2) * w)) if affine else (h, w)
        steps.append(v2.RandomResizedCrop(size, scale=(self.min_scale, 1.0), antialias=True))
        if affine:
            steps += [v2.RandomAffine(degrees=self.degrees, shear=self.shear), v2.CenterCrop((h, w))]
        if self.flip:
            steps.append(v2.RandomHorizontalFlip())
        if c == 3 and self.color_jitter > 0 and self.jitter_prob > 0:
            j = self.color_jitter
            steps.append(v2.RandomApply([v2.ColorJitter(j, j, j, min(0.5, j / 4))], p=self.jitter_prob))
        if c == 1:
            steps.append(v2.Grayscale(num_output_channels=1))
        return v2.Compose(steps)

    def cut_patches(self, n: int) -> torch.Tensor:
        """``n`` fresh augmented patches (n, C, H, W) in [0, 1], on the CPU (seeded by this
        synthesizer's generator, so a run is reproducible)."""
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=self.rng))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            patches = torch.stack([self.transform(self.source) for _ in range(n)])
        return patches.clamp_(0.0, 1.0)

    def generator_round(self, iteration: int) -> dict[str, float]:
        """Replace the ``batch_size`` oldest patches of the pool with fresh crops."""
        n = min(self.batch_size, self.num_patches)
        if n > 0:
            idx = (self._next + torch.arange(n)) % self.num_patches
            self.pool[idx.to(self.pool.device)] = self.cut_patches(n).to(self.pool)
            self._next = (self._next + n) % self.num_patches
            self.patches_cut += n
        return {"patches_cut": float(self.patches_cut)}

    def sample(self, batch_size: int) -> torch.Tensor:
        """Random pool patches, each CutMixed with another random patch (``cutmix_prob``)."""
        idx = torch.randint(0, self.num_patches, (batch_size,), generator=self.rng).to(self.pool.device)
        x = self.pool[idx]
        if self.cutmix_prob > 0:
            other = torch.randint(0, self.num_patches, (batch_size,), generator=self.rng).to(self.pool.device)
            x = cutmix(x, self.pool[other], self.cutmix_beta, self.cutmix_prob, self.np_rng)
        return x
