"""Backdoor triggers applied in pixel space ``[0, 1]`` (before model normalisation).

Each trigger is one small subclass of :class:`Trigger`; subclasses that set ``name`` are
registered automatically in :data:`TRIGGERS` by ``__init_subclass__``, so adding an attack
is a single class. The three triggers below are the ones evaluated by ABD
("Revisiting Data-Free Knowledge Distillation with Poisoned Teachers", Hong et al.,
ICML 2023): BadNets grid / square (Gu et al., 2019) and Blend (Chen et al., 2017).
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np
import torch

__all__ = [
    "Trigger",
    "TRIGGERS",
    "build_trigger",
    "trigger_names",
    "BadNetsGrid",
    "BadNetsSquare",
    "Blend",
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
        """Put the 2-D ``patch`` 1 pixel away from the bottom and right borders, on every channel."""
        c, h, w = self.image_shape
        k_h, k_w = patch.shape
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
