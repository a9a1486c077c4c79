"""Surrogate-input sources for data-free KD, built by name from config."""

from __future__ import annotations

from typing import Any

from abd_fl.distill.synthesizers.base import Synthesizer
from abd_fl.distill.synthesizers.dense import DENSESynthesizer
from abd_fl.distill.synthesizers.fixed_data import FixedDataSynthesizer
from abd_fl.distill.synthesizers.zskt import ZSKTSynthesizer

SYNTHESIZERS: dict[str, type[Synthesizer]] = {"zskt": ZSKTSynthesizer, "dense": DENSESynthesizer}


def build_synthesizer(name: str, **params: Any) -> Synthesizer:
    """Build a data-free synthesizer by name (``zskt`` or ``dense``) with its parameters."""
    if name not in SYNTHESIZERS:
        raise ValueError(f"unknown synthesizer '{name}'; choose one of: {', '.join(SYNTHESIZERS)}")
    try:
        return SYNTHESIZERS[name](**params)
    except TypeError as err:
        raise ValueError(f"bad parameters for synthesizer '{name}': {err}") from None


__all__ = [
    "Synthesizer",
    "ZSKTSynthesizer",
    "DENSESynthesizer",
    "FixedDataSynthesizer",
    "SYNTHESIZERS",
    "build_synthesizer",
]
