"""Device selection from config: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda[:N]``;
and the memory format convolutions run in (``auto`` | ``channels_last`` | ``contiguous``)."""

from __future__ import annotations

import torch


def resolve_device(name: str = "auto") -> torch.device:
    """Map a config string to a :class:`torch.device`; one-line error for bad values."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"device '{name}' requested but CUDA is not available; use 'auto' or 'cpu'")
        return torch.device(name)
    raise ValueError(f"unknown device '{name}'; choose one of: auto, cpu, cuda, cuda:N")


MEMORY_FORMATS = ("auto", "channels_last", "contiguous")
"""``distill.memory_format`` values: how the 4-D weights (and so the feature maps) are laid out."""


def check_memory_format(name: str) -> None:
    """One-line ``ValueError`` naming ``name`` unless it is one of :data:`MEMORY_FORMATS`."""
    if name not in MEMORY_FORMATS:
        raise ValueError(f"unknown distill.memory_format '{name}'; choose one of: {', '.join(MEMORY_FORMATS)}")


def resolve_memory_format(name: str, device: torch.device | str) -> torch.memory_format:
    """Map a config string to a :class:`torch.memory_format`; one-line error for bad values.

    ``auto`` is ``channels_last`` on CPU, where oneDNN's NHWC convolutions ran the default
    distillation 1.2-1.6x faster (``benchmarks/perf.py --parts levers``), and ``contiguous``
    on CUDA, where it has not been timed (on a GPU NHWC pays mainly in half precision).
    """
    check_memory_format(name)
    if name == "auto":
        name = "channels_last" if torch.device(device).type == "cpu" else "contiguous"
    return torch.channels_last if name == "channels_last" else torch.contiguous_format
