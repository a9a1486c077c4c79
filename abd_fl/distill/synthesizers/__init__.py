"""Surrogate-input sources for data-free KD, built by name from config."""

from __future__ import annotations

from typing import Any

from abd_fl.distill.synthesizers.base import Synthesizer
from abd_fl.distill.synthesizers.cmi import CMISynthesizer
from abd_fl.distill.synthesizers.dense import DENSESynthesizer
from abd_fl.distill.synthesizers.fixed_data import FixedDataSynthesizer
from abd_fl.distill.synthesizers.ood import OODPatchSynthesizer
from abd_fl.distill.synthesizers.zskt import ZSKTSynthesizer

SYNTHESIZERS: dict[str, type[Synthesizer]] = {
    "zskt": ZSKTSynthesizer,
    "dense": DENSESynthesizer,
    "cmi": CMISynthesizer,
    "ood": OODPatchSynthesizer,
}


def build_synthesizer(name: str, **params: Any) -> Synthesizer:
    """Build a data-free synthesizer by name (``zskt``, ``dense``, ``cmi``, ``ood``) with its parameters.

    Raises ``ValueError`` (one line) for an unknown name, an unknown parameter or a bad value.
    """
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
    "CMISynthesizer",
    "OODPatchSynthesizer",
    "FixedDataSynthesizer",
    "SYNTHESIZERS",
    "build_synthesizer",
]
