"""Data-free knowledge distillation: losses, teacher ensemble, synthesizers, the loop and
the defense hook interface (which this package defines and never implements)."""

from abd_fl.distill.ensemble import TeacherEnsemble
from abd_fl.distill.hooks import DistillContext, DistillDefense, NullDefense
from abd_fl.distill.losses import kd_kl_per_sample, kd_loss
from abd_fl.distill.loop import DistillConfig, DistillResult, distill
from abd_fl.distill.synthesizers import (
    SYNTHESIZERS,
    CMISynthesizer,
    DENSESynthesizer,
    FixedDataSynthesizer,
    OODPatchSynthesizer,
    Synthesizer,
    ZSKTSynthesizer,
    build_synthesizer,
)

__all__ = [
    "TeacherEnsemble",
    "DistillContext",
    "DistillDefense",
    "NullDefense",
    "kd_kl_per_sample",
    "kd_loss",
    "DistillConfig",
    "DistillResult",
    "distill",
    "SYNTHESIZERS",
    "CMISynthesizer",
    "DENSESynthesizer",
    "FixedDataSynthesizer",
    "OODPatchSynthesizer",
    "Synthesizer",
    "ZSKTSynthesizer",
    "build_synthesizer",
]
