"""Device selection from config: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda[:N]``."""

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
