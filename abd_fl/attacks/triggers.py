"""Backdoor triggers applied in pixel space ``[0, 1]`` (before model normalisation).

Each trigger is one small subclass of :class:`Trigger`; subclasses that set ``name`` are
registered automatically in :data:`TRIGGERS` by ``__init_subclass__``, so adding an attack
is a single class. The ten triggers below are the ones evaluated by ABD
("Revisiting Data-Free Knowledge Distillation with Poisoned Teachers", Hong et al.,
ICML 2023, Sec. 5, Fig. 5 / Table 1): BadNets grid / square (Gu et al., 2019), Blend
(Chen et al., 2017), Sig (Barni et al., 2019), Trojan 3x3 / 8x8 / WM (Liu et al., 2018),
l0_inv / l2_inv (Li et al., 2020) and CL (Turner et al., 2019).

The reference implementation loads most patterns from image files; here every pattern is
generated in code from its definition with a fixed seed and scaled to the image size
(8x8 digits up to 32x32), as each class's docstring documents. Sizes are given for a
32x32 image and scaled by ``S / 32`` with ``S = min(H, W)``.

Training-time poisoning goes through :meth:`Trigger.prepare_poison` (default: :meth:`apply`);
only CL overrides it (adversarial perturbation against a surrogate classifier, then the
trigger). :meth:`Trigger.apply` is always the pure, deterministic test-time trigger.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np
import torch
from torch.nn import functional as F

from abd_fl.data.base import ImageData

__all__ = [
    "Trigger",
    "TRIGGERS",
    "build_trigger",
    "trigger_names",
    "BadNetsGrid",
    "BadNetsSquare",
    "Blend",
    "Sig",
    "Trojan3x3",
    "Trojan8x8",
    "TrojanWM",
    "L0Invisible",
    "L2Invisible",
    "CleanLabel",
]

#: name -> trigger class; filled by :meth:`Trigger.__init_subclass__`.
TRIGGERS: dict[str, type["Trigger"]] = {}


def trigger_names() -> tuple[str, ...]:
    """Sorted names of all registered triggers (computed on call, so late subclasses count)."""
    return tuple(sorted(TRIGGERS))


class Trigger(ABC):
    """A backdoor trigger for images of shape ``image_shape = (C, H, W)`` in pixel space.

    Subclasses set ``name`` (registry key), implement :meth:`_setup` with their keyword
    parameters, :meth:`apply` and :meth:`changed_mask`. ``clean_label = True`` marks attacks
    that poison only target-class training images and keep their labels.
    """

    name: ClassVar[str]
    clean_label: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if name is None:  # abstract helper base without its own name: not registered
            return
        if not isinstance(name, str) or not name:
            raise ValueError(f"trigger name must be a non-empty string, got {name!r}")
        old = TRIGGERS.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"trigger name '{name}' is already registered by {old.__qualname__}")
        TRIGGERS[name] = cls

    def __init__(self, image_shape: tuple[int, int, int], seed: int = 0, **params: Any) -> None:
        shape = tuple(int(s) for s in image_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"image_shape must be (C, H, W) with positive sizes, got {tuple(image_shape)}")
        self.image_shape: tuple[int, int, int] = shape  # type: ignore[assignment]
        self.seed = int(seed)
        allowed = [
            p.name
            for p in inspect.signature(self._setup).parameters.values()
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        for key in params:
            if key not in allowed:
                choices = ", ".join(allowed) if allowed else "(none)"
                raise ValueError(f"unknown parameter '{key}' for trigger '{self.name}'; choose from: {choices}")
        self.params: dict[str, Any] = dict(params)
        self._setup(**params)

    def _setup(self) -> None:
        """Build the trigger's pattern from its keyword parameters (override in subclasses)."""

    def _check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(
                f"images must have shape (N, {', '.join(map(str, self.image_shape))}), got {tuple(images.shape)}"
            )

    @abstractmethod
    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """Return a new tensor with the trigger stamped on ``images`` (N, C, H, W), clamped to [0, 1]."""

    @abstractmethod
    def changed_mask(self) -> torch.Tensor | None:
        """Boolean (C, H, W) mask of the pixels the trigger may change; ``None`` if it may change all."""

    def prepare_poison(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        num_classes: int | None = None,
        seed: int = 0,
        pool: ImageData | None = None,
    ) -> torch.Tensor:
        """Training-time poisoned versions of ``images`` (N, C, H, W) whose true labels are ``labels``.

        ``pool`` is the attacker's whole (clean) training set, for attacks that need it (CL
        trains a surrogate classifier on it); ``seed`` seeds any randomness. The default is
        the test-time trigger :meth:`apply`; the result is clamped to [0, 1].
        """
        return self.apply(images)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}(image_shape={self.image_shape}, seed={self.seed}{', ' if args else ''}{args})"


def build_trigger(name: str, image_shape: tuple[int, int, int], seed: int = 0, **params: Any) -> Trigger:
    """Instantiate the registered trigger ``name``; one-line ``ValueError`` for unknown names."""
    cls = TRIGGERS.get(name)
    if cls is None:
        raise ValueError(f"unknown trigger '{name}'; choose one of: {', '.join(trigger_names())}")
    return cls(image_shape, seed=seed, **params)


class _PatchTrigger(Trigger):
    """A trigger that overwrites the pixels under a fixed mask with a fixed pattern."""

    _pattern: torch.Tensor  # (C, H, W) float32
    _mask: torch.Tensor  # (C, H, W) bool

    def _place_bottom_right(self, patch: torch.Tensor) -> None:
        """Put ``patch`` 1 pixel away from the bottom and right borders: a 2-D (k_h, k_w) patch
        goes on every channel, a 3-D (C, k_h, k_w) patch gives each channel its own values."""
        c, h, w = self.image_shape
        k_h, k_w = patch.shape[-2:]
        if k_h + 1 > h or k_w + 1 > w:
            raise ValueError(
                f"trigger '{self.name}' needs an image of at least {k_h + 1}x{k_w + 1} pixels, got {h}x{w}"
            )
        top, left = h - 1 - k_h, w - 1 - k_w
        pattern = torch.zeros(self.image_shape, dtype=torch.float32)
        mask = torch.zeros(self.image_shape, dtype=torch.bool)
        pattern[:, top : top + k_h, left : left + k_w] = patch.to(torch.float32)
        mask[:, top : top + k_h, left : left + k_w] = True
        self._pattern, self._mask = pattern, mask

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        self._check_images(images)
        mask = self._mask.to(images.device)
        pattern = self._pattern.to(device=images.device, dtype=images.dtype)
        return torch.where(mask, pattern, images).clamp(0.0, 1.0)

    def changed_mask(self) -> torch.Tensor:
        return self._mask.clone()

    def pattern(self) -> torch.Tensor:
        """The (C, H, W) values written under :meth:`changed_mask` (zeros elsewhere)."""
        return self._pattern.clone()


class BadNetsGrid(_PatchTrigger):
    """BadNets checkerboard trigger (Gu et al., 2019, "BadNets"; grid variant used by ABD).

    A 3x3 checkerboard ``1 0 1 / 0 1 0 / 1 0 1`` (1 = white 1.0, 0 = black 0.0) stamped on
    all channels in the bottom-right corner with a 1-pixel margin. The patch side is
    ``k = max(3, round(3 * S / 32))`` pixels with ``S = min(H, W)`` (``= H`` for square
    images): a 3x3 pixel grid for 8..32 px images, 6x6 pixels (2x2-pixel cells) at 64 px.
    When ``k`` is not a multiple of 3, pixel ``(i, j)`` of the patch takes cell
    ``(3 * i // k, 3 * j // k)``.
    """

    name = "badnets_grid"
    CHECKER: ClassVar[tuple[tuple[int, ...], ...]] = ((1, 0, 1), (0, 1, 0), (1, 0, 1))

    def _setup(self) -> None:
        _, h, w = self.image_shape
        k = max(3, int(round(3 * min(h, w) / 32)))
        cells = torch.tensor(self.CHECKER, dtype=torch.float32)
        idx = torch.arange(k) * 3 // k
        self._place_bottom_right(cells[idx][:, idx])


class BadNetsSquare(_PatchTrigger):
    """BadNets white-square trigger (Gu et al., 2019, "BadNets").

    A white (1.0) square of side ``s = max(2, round(4 * S / 32))`` pixels with
    ``S = min(H, W)``, on all channels, 1 pixel from the bottom-right corner
    (4x4 at 32 px, 2x2 at 8 px).
    """

    name = "badnets_square"

    def _setup(self) -> None:
        _, h, w = self.image_shape
        s = max(2, int(round(4 * min(h, w) / 32)))
        self._place_bottom_right(torch.ones(s, s))


class Blend(Trigger):
    """Blended-injection trigger (Chen et al., 2017, "Targeted Backdoor Attacks on Deep
    Learning Systems Using Data Poisoning").

    ``x' = (1 - alpha) * x + alpha * pattern`` with ``alpha`` in (0, 1] (default 0.2). The
    pattern is uniform noise in [0, 1] of shape (C, H, W) drawn from
    ``torch.Generator().manual_seed(seed)``, or, with ``pattern_path``, an image file loaded
    with PIL, converted to the image's channel count and resized to (H, W).
    """

    name = "blend"

    def _setup(self, alpha: float = 0.2, pattern_path: str | None = None) -> None:
        alpha = float(alpha)
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"blend alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        c, h, w = self.image_shape
        if pattern_path is None:
            gen = torch.Generator().manual_seed(self.seed)
            self._pattern = torch.rand((c, h, w), generator=gen, dtype=torch.float32)
        else:
            self._pattern = _load_pattern(pattern_path, (c, h, w))

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        self._check_images(images)
        pattern = self._pattern.to(device=images.device, dtype=images.dtype)
        return ((1.0 - self.alpha) * images + self.alpha * pattern).clamp(0.0, 1.0)

    def changed_mask(self) -> None:
        return None

    def pattern(self) -> torch.Tensor:
        """The (C, H, W) blend pattern in [0, 1]."""
        return self._pattern.clone()


PAPER_SIZED_SIDE = 28
"""Images this large (MNIST's 28x28 up to the paper's 32x32) keep the papers' trigger strengths
where a size rule would shrink them (l0_inv's pixel count)."""


def _scaled(size_at_32: float, minimum: int, image_side: int) -> int:
    """``max(minimum, round(size_at_32 * S / 32))``: a size defined for 32x32 images, scaled to side ``S``."""
    return max(int(minimum), int(round(size_at_32 * image_side / 32)))


def _positive(trigger: str, key: str, value: Any) -> float:
    out = float(value)
    if not (out > 0 and np.isfinite(out)):
        raise ValueError(f"{trigger} {key} must be a finite number > 0, got {value}")
    return out


class _AdditiveTrigger(Trigger):
    """A trigger that adds a fixed full-image pattern ``_pattern`` (C, H, W), then clamps."""

    _pattern: torch.Tensor

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        self._check_images(images)
        return (images + self._pattern.to(device=images.device, dtype=images.dtype)).clamp(0.0, 1.0)

    def changed_mask(self) -> None:
        return None


class Sig(_AdditiveTrigger):
    """Sinusoidal-signal trigger, clean-label (Barni et al., 2019, "A New Backdoor Attack in
    CNNs by Training Set Corruption Without Label Poisoning").

    ``x'[c, i, j] = clip(x[c, i, j] + delta * sin(2 * pi * j * f / W))``: a horizontal
    sinusoid, constant down each column and the same on every channel. Barni et al. use
    ``delta = 20`` on [0, 255] and ``f = 6``, so the defaults are ``delta = 20 / 255`` and
    ``f = 6``. Small images: the frequency is capped at ``W // 4`` cycles (at least 1) so one
    period spans at least 4 pixels and the signal does not alias: 6 cycles at 24..32 px, 4 at
    16 px, 2 at 8 px. Clean-label: only target-class training images are poisoned and keep
    their labels (:func:`abd_fl.attacks.poison_data`); test images get the same signal.
    """

    name = "sig"
    clean_label: ClassVar[bool] = True

    def _setup(self, delta: float = 20.0 / 255.0, f: float = 6.0) -> None:
        self.delta = _positive("sig", "delta", delta)
        f = _positive("sig", "f", f)
        c, h, w = self.image_shape
        self.frequency = min(f, float(max(1, w // 4)))
        cols = torch.arange(w, dtype=torch.float64)
        wave = self.delta * torch.sin(2.0 * np.pi * cols * self.frequency / w)
        self._pattern = wave.to(torch.float32).expand(c, h, w).clone()


    def pattern(self) -> torch.Tensor:
        """The (C, H, W) additive signal (values in [-delta, delta])."""
        return self._pattern.clone()


class _TrojanSquare(_PatchTrigger):
    """Trojan square: a fixed-seed colour patch stamped 1 pixel from the bottom-right corner.

    In the Trojaning attack (Liu et al., 2018, NDSS) the square's values are reverse-engineered
    from a model; here each patch pixel gets a colour drawn with
    ``torch.Generator().manual_seed(seed)``: every channel independently 0 or 1 (one of the 8
    saturated RGB colours; black or white on grayscale), so the patch contrasts with any image.
    A draw with a single value everywhere is made a checkerboard (XOR). The patch replaces the
    pixels under it, as the paper's trigger stamping does.
    """

    SIDE_AT_32: ClassVar[int]
    MIN_SIDE: ClassVar[int]

    def _setup(self) -> None:
        c, h, w = self.image_shape
        k = _scaled(self.SIDE_AT_32, self.MIN_SIDE, min(h, w))
        gen = torch.Generator().manual_seed(self.seed)
        patch = torch.randint(0, 2, (c, k, k), generator=gen).to(torch.float32)
        if bool((patch == patch.flatten()[0]).all()):
            checker = (torch.arange(k)[:, None] + torch.arange(k)[None, :]) % 2
            patch = (patch + checker.to(torch.float32)) % 2
        self.side = k
        self._place_bottom_right(patch)


class Trojan3x3(_TrojanSquare):
    """Trojan square 3x3 (Liu et al., 2018, "Trojaning Attack on Neural Networks").

    A ``k x k`` fixed-seed colour patch (see :class:`_TrojanSquare`) with
    ``k = max(3, round(3 * S / 32))``: 3x3 pixels for 8..37 px images, larger above.
    """

    name = "trojan_3x3"
    SIDE_AT_32 = 3
    MIN_SIDE = 3


class Trojan8x8(_TrojanSquare):
    """Trojan square 8x8 (Liu et al., 2018, "Trojaning Attack on Neural Networks").

    A ``k x k`` fixed-seed colour patch (see :class:`_TrojanSquare`) with
    ``k = max(4, round(8 * S / 32))``: 8x8 at 32 px, 6x6 at 24 px, 4x4 at 8..16 px. The
    floor of 4 keeps it larger than :class:`Trojan3x3` on small images (a proportional
    2x2 at 8 px would be smaller than the "3x3" trigger).
    """

    name = "trojan_8x8"
    SIDE_AT_32 = 8
    MIN_SIDE = 4


class TrojanWM(Trigger):
    """Trojan watermark trigger (Liu et al., 2018, "Trojaning Attack on Neural Networks").

    The paper's watermark is a text-like mark over the whole image; the reference adds a
    watermark image file to the input. Here the mark is a binary stroke mask drawn with
    ``numpy.random.default_rng(seed)``: straight strokes (horizontal, vertical or diagonal,
    like pen strokes of letters) of length ``round(S/8)..round(S/3)`` pixels (at least 2..3)
    from random start points, added until ``density`` (default 0.12) of the pixels are
    covered (at least 3 pixels): about 123 stroke pixels at 32x32, 8 at 8x8. The strokes are
    white and added to every channel: ``x' = clip(x + amplitude * mask)`` with ``amplitude``
    in (0, 1] (default 0.5), so the image stays visible under the mark.
    """

    name = "trojan_wm"

    def _setup(self, amplitude: float = 0.5, density: float = 0.12) -> None:
        amplitude = float(amplitude)
        if not 0.0 < amplitude <= 1.0:
            raise ValueError(f"trojan_wm amplitude must be in (0, 1], got {amplitude}")
        density = float(density)
        if not 0.0 < density < 1.0:
            raise ValueError(f"trojan_wm density must be in (0, 1), got {density}")
        self.amplitude = amplitude
        c, h, w = self.image_shape
        side = min(h, w)
        rng = np.random.default_rng(self.seed)
        strokes = np.zeros((h, w), dtype=bool)
        goal = min(h * w, max(3, int(round(density * h * w))))
        lo, hi = max(2, int(round(side / 8))), max(3, int(round(side / 3)))
        directions = ((0, 1), (1, 0), (1, 1), (1, -1))
        while strokes.sum() < goal:
            length = int(rng.integers(lo, hi + 1))
            r0, c0 = int(rng.integers(0, h)), int(rng.integers(0, w))
            dr, dc = directions[int(rng.integers(0, len(directions)))]
            for t in range(length):
                r, col = r0 + t * dr, c0 + t * dc
                if 0 <= r < h and 0 <= col < w:
                    strokes[r, col] = True
        self._mask = torch.from_numpy(strokes).expand(c, h, w).clone()

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        self._check_images(images)
        mark = self._mask.to(device=images.device, dtype=images.dtype) * self.amplitude
        return (images + mark).clamp(0.0, 1.0)

    def changed_mask(self) -> torch.Tensor:
        return self._mask.clone()


class L0Invisible(_PatchTrigger):
    """l0-invisible trigger (Li et al., 2020, "Invisible Backdoor Attacks on Deep Neural
    Networks via Steganography and Regularization").

    A few scattered pixels are replaced with fixed values (the reference: 9 pixels at 32x32,
    from a mask file). Here ``n = max(3, round(9 * H * W / 1024))`` pixels (5 at 24x24, 3 at
    8..16 px), but at least the paper's 9 on images of 28 px and more (9 at 28x28 MNIST and
    32x32, where the area rule would give 7 at 28), or ``num_pixels``. The pixels are drawn
    without replacement with ``torch.Generator().manual_seed(seed)``, and each channel of
    each gets the value 0 or 1 from the same generator; all channels of a chosen pixel are
    replaced.
    """

    name = "l0_inv"

    def _setup(self, num_pixels: int | None = None) -> None:
        c, h, w = self.image_shape
        if num_pixels is None:
            n = max(3, int(round(9 * h * w / 1024)))
            if min(h, w) >= PAPER_SIZED_SIDE:
                n = max(9, n)  # the paper's L0 budget, not shrunk on MNIST-sized images
        else:
            if isinstance(num_pixels, bool) or int(num_pixels) != num_pixels or not 1 <= num_pixels <= h * w:
                raise ValueError(f"l0_inv num_pixels must be an int in [1, {h * w}], got {num_pixels}")
            n = int(num_pixels)
        gen = torch.Generator().manual_seed(self.seed)
        flat = torch.randperm(h * w, generator=gen)[:n]
        values = torch.randint(0, 2, (c, n), generator=gen).to(torch.float32)
        pattern = torch.zeros((c, h * w), dtype=torch.float32)
        mask = torch.zeros((c, h * w), dtype=torch.bool)
        pattern[:, flat] = values
        mask[:, flat] = True
        self.num_pixels = n
        self._pattern, self._mask = pattern.view(c, h, w), mask.view(c, h, w)


class L2Invisible(_AdditiveTrigger):
    """l2-invisible trigger (Li et al., 2020, "Invisible Backdoor Attacks on Deep Neural
    Networks via Steganography and Regularization").

    A small additive pattern over the whole image: ``x' = clip(x + p)``. ``p`` is Gaussian
    noise of shape (C, H, W) drawn with ``torch.Generator().manual_seed(seed)`` and rescaled
    to the exact L2 norm ``rms * sqrt(C * H * W)``, i.e. a per-pixel root-mean-square of
    ``rms`` (default 8/255, the usual "imperceptible" budget) at every image size: L2 norm
    1.74 at 32x32x3, 0.25 at 8x8x1. (The paper optimises ``p`` under an L2 penalty; the
    reference adds a fixed pattern file.)
    """

    name = "l2_inv"

    def _setup(self, rms: float = 8.0 / 255.0) -> None:
        self.rms = _positive("l2_inv", "rms", rms)
        gen = torch.Generator().manual_seed(self.seed)
        noise = torch.randn(self.image_shape, generator=gen, dtype=torch.float64)
        self.l2_norm = self.rms * float(np.sqrt(noise.numel()))
        self._pattern = (noise * (self.l2_norm / noise.norm())).to(torch.float32)


    def pattern(self) -> torch.Tensor:
        """The (C, H, W) additive pattern (L2 norm ``self.l2_norm``)."""
        return self._pattern.clone()


class CleanLabel(_PatchTrigger):
    """Label-consistent (clean-label) attack (Turner et al., 2019, "Label-Consistent Backdoor
    Attacks").

    Test-time trigger (:meth:`apply`): the BadNets checkerboard stamped at all four corners,
    mirrored so the pattern is symmetric about the image centre, touching the borders (as in
    Turner et al.). Each corner patch has side ``k = max(2, round(3 * S / 32))`` (3x3 at
    27..37 px, 2x2 at 8..26 px, so that the four patches cover 25% rather than 56% of an 8x8
    image); pixel ``(i, j)`` of a patch takes checkerboard cell ``(3 * i // k, 3 * j // k)``.

    Training-time poisoning (:meth:`prepare_poison`, target-class images only, labels kept):
    the attacker trains a surrogate classifier (``surrogate``, default ``cnn_small``, built
    with :func:`abd_fl.models.build_model` with the pool's per-channel mean / std) on its own
    clean data with :func:`abd_fl.train.train_classifier`: ``surrogate_epochs`` (default 10)
    of SGD at ``surrogate_lr`` (default 0.1, cosine schedule) on ``device`` (default CPU);
    about 0.2 s for 400 8x8 digits on one CPU thread (96% test accuracy). It then runs
    untargeted L_inf PGD on the true labels (``steps`` = 10 sign-gradient steps of
    ``2.5 * eps / steps``, no random start), so the images' natural features become hard to
    learn and the model relies on the trigger; the four-corner grid is stamped on the result. ``eps`` defaults to 16/255, Turner et al.'s
    larger budget, which they found necessary for a reliable backdoor at low poison counts
    (the L_inf budget is per pixel, so it needs no scaling with image size).
    """

    name = "cl"
    clean_label: ClassVar[bool] = True
    CHECKER: ClassVar[tuple[tuple[int, ...], ...]] = BadNetsGrid.CHECKER

    def _setup(
        self,
        eps: float = 16.0 / 255.0,
        steps: int = 10,
        surrogate: str = "cnn_small",
        surrogate_epochs: int = 10,
        surrogate_lr: float = 0.1,
        surrogate_batch_size: int = 64,
        device: str = "cpu",
    ) -> None:
        self.eps = float(eps)
        if not 0.0 <= self.eps <= 1.0:
            raise ValueError(f"cl eps must be in [0, 1], got {eps}")
        for key, value, low in (("steps", steps, 0), ("surrogate_epochs", surrogate_epochs, 0),
                                ("surrogate_batch_size", surrogate_batch_size, 1)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"cl {key} must be an int >= {low}, got {value!r}")
        self.steps, self.surrogate = int(steps), str(surrogate)
        self.surrogate_epochs, self.surrogate_batch_size = int(surrogate_epochs), int(surrogate_batch_size)
        self.surrogate_lr = _positive("cl", "surrogate_lr", surrogate_lr)
        self.device = str(device)

        c, h, w = self.image_shape
        k = _scaled(3, 2, min(h, w))
        if 2 * k > min(h, w):
            raise ValueError(f"trigger 'cl' needs an image of at least {2 * k}x{2 * k} pixels, got {h}x{w}")
        cells = torch.tensor(self.CHECKER, dtype=torch.float32)
        idx = torch.arange(k) * 3 // k
        patch = cells[idx][:, idx]
        pattern = torch.zeros(self.image_shape, dtype=torch.float32)
        mask = torch.zeros(self.image_shape, dtype=torch.bool)
        for flip_rows, flip_cols in ((False, False), (False, True), (True, False), (True, True)):
            rows = slice(h - k, h) if flip_rows else slice(0, k)
            cols = slice(w - k, w) if flip_cols else slice(0, k)
            dims = [d for d, f in ((0, flip_rows), (1, flip_cols)) if f]
            pattern[:, rows, cols] = patch.flip(dims) if dims else patch
            mask[:, rows, cols] = True
        self.side = k
        self._pattern, self._mask = pattern, mask

    def train_surrogate(self, pool: ImageData, num_classes: int, seed: int = 0) -> torch.nn.Module:
        """The attacker's surrogate classifier, trained on its clean data ``pool`` (eval mode)."""
        from abd_fl.data.imageops import channel_stats
        from abd_fl.device import resolve_device
        from abd_fl.models import build_model
        from abd_fl.train import train_classifier

        x = pool.images.detach().to(torch.float32).cpu()
        mean, std = channel_stats(x)
        std = tuple(max(float(s), 1e-3) for s in std)  # a constant channel must not divide by 0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_model(self.surrogate, num_classes, self.image_shape[0], mean, std)
        train_classifier(
            model,
            ImageData(x, pool.labels.detach().cpu()),
            epochs=self.surrogate_epochs,
            lr=self.surrogate_lr,
            batch_size=self.surrogate_batch_size,
            device=resolve_device(self.device),
            seed=seed,
        )
        return model.eval()

    def perturb(self, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Untargeted L_inf PGD on ``labels``: ``images`` moved within ``eps`` (and [0, 1]) to raise the loss."""
        if self.eps == 0.0 or self.steps == 0 or images.shape[0] == 0:
            return images.clone()
        dev = next(model.parameters()).device
        step = 2.5 * self.eps / self.steps
        was_training = model.training
        model.eval()
        flags = [p.requires_grad for p in model.parameters()]
        model.requires_grad_(False)
        out = []
        try:
            for xb, yb in zip(images.split(256), labels.split(256)):
                x0 = xb.detach().to(dev, torch.float32)
                y = yb.to(dev)
                adv = x0.clone()
                for _ in range(self.steps):
                    adv.requires_grad_(True)
                    loss = F.cross_entropy(model(adv), y)
                    (grad,) = torch.autograd.grad(loss, adv)
                    adv = adv.detach() + step * grad.sign()
                    adv = torch.min(torch.max(adv, x0 - self.eps), x0 + self.eps).clamp(0.0, 1.0)
                out.append(adv.detach().to(images.device, images.dtype))
        finally:
            for p, flag in zip(model.parameters(), flags):
                p.requires_grad_(flag)
            model.train(was_training)
        return torch.cat(out)

    def prepare_poison(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        num_classes: int | None = None,
        seed: int = 0,
        pool: ImageData | None = None,
    ) -> torch.Tensor:
        """PGD against a surrogate trained on ``pool`` (default: ``images`` themselves), then :meth:`apply`."""
        self._check_images(images)
        if images.shape[0] == 0:
            return images.clone()
        if pool is None:
            pool = ImageData(images, labels)
        if num_classes is None:
            num_classes = int(max(int(pool.labels.max()), int(labels.max()))) + 1
        model = self.train_surrogate(pool, int(num_classes), seed=seed)
        return self.apply(self.perturb(model, images, labels))


def _load_pattern(path: str, shape: tuple[int, int, int]) -> torch.Tensor:
    """Load an image file as a (C, H, W) float32 tensor in [0, 1] (PIL, bilinear resize)."""
    from PIL import Image

    c, h, w = shape
    with Image.open(path) as img:
        img = img.convert("RGB" if c == 3 else "L").resize((w, h), Image.BILINEAR)
        arr = np.asarray(img, dtype=np.float32) / 255.0
    tensor = torch.from_numpy(arr.copy())
    if tensor.ndim == 2:  # grayscale: repeat over the requested channels
        tensor = tensor.unsqueeze(0).expand(c, h, w).clone()
    else:
        tensor = tensor.permute(2, 0, 1).contiguous()
    return tensor
