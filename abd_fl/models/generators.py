"""Image generators for data-free synthesis (ZSKT and DENSE).

Both papers use the same DCGAN-like shape: ``z -> 128 x (H/4) x (W/4) -> up, conv, BN,
LeakyReLU -> up, conv, BN, LeakyReLU -> conv -> output``. ZSKT (Micaelli & Storkey, 2019)
ends with a BatchNorm (unbounded output); DENSE (Zhang et al., 2022) with a sigmoid. Our
images live in pixel space [0, 1] (models normalise internally), so the output layer is a
choice: ``sigmoid`` (pixel range), ``tanh`` or ``bn`` (the reference ZSKT head).
"""

from __future__ import annotations

import numbers

import torch
from torch import nn

OUTPUT_ACTIVATIONS = ("sigmoid", "tanh", "bn")


class ConvGenerator(nn.Module):
    """Latent vector ``z`` (N, z_dim) -> square image (N, C, S, S), ``S = image_size`` >= 4.

    The two 2x upsamplings make a side of ``4 * ceil(S / 4)``; when ``S`` is not a multiple
    of 4 (e.g. MNIST downsampled to 14) the output is cropped to its central ``S x S``.
    For multiples of 4 (8, 16, 28, 32) nothing is cropped.
    """

    def __init__(
        self,
        z_dim: int,
        image_size: int,
        channels: int,
        ngf: int = 64,
        output_activation: str = "sigmoid",
    ) -> None:
        super().__init__()
        if isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral) or image_size < 4:
            raise ValueError(f"generator image_size must be an integer >= 4, got {image_size!r}")
        image_size = int(image_size)
        if output_activation not in OUTPUT_ACTIVATIONS:
            raise ValueError(
                f"unknown generator output_activation '{output_activation}'; "
                f"choose one of: {', '.join(OUTPUT_ACTIVATIONS)}"
            )
        self.z_dim = z_dim
        self.image_size = image_size
        self.init_size = -(-image_size // 4)  # ceil: 4 * init_size >= image_size
        self._crop = (4 * self.init_size - image_size) // 2
        self.project = nn.Linear(z_dim, 2 * ngf * self.init_size**2)
        self.body = nn.Sequential(
            nn.BatchNorm2d(2 * ngf),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * ngf, 2 * ngf, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * ngf),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * ngf, ngf, 3, padding=1, bias=False),
            nn.BatchNorm2d(ngf),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ngf, channels, 3, padding=1),
        )
        if output_activation == "sigmoid":
            self.head: nn.Module = nn.Sigmoid()
        elif output_activation == "tanh":
            self.head = nn.Tanh()
        else:
            self.head = nn.BatchNorm2d(channels, affine=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.project(z).view(z.shape[0], -1, self.init_size, self.init_size)
        x = self.body(x)
        if x.shape[-1] != self.image_size:
            x = x[..., self._crop : self._crop + self.image_size, self._crop : self._crop + self.image_size]
        return self.head(x)
