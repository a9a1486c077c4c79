"""Classifier architectures; each takes pixel-space input and normalises it in its first layer."""

from .normalize import ClassifierWithNormalization, Normalize
from .registry import MODEL_NAMES, build_model

__all__ = ["MODEL_NAMES", "ClassifierWithNormalization", "Normalize", "build_model"]
