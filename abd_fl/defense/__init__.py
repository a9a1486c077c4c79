"""ABD (Hong et al., ICML 2023): the Shuffling Vaccine, Self-Retrospection and the
Algorithm-2 pipeline, implementing the hooks that :mod:`abd_fl.distill` defines."""

from abd_fl.defense.abd import DEFENSE_NAMES, ABDConfig, ABDDefense, abd_config_for
from abd_fl.defense.retrospection import SRConfig, add_sr_gradient, sr_hypergradient, synthesize_delta
from abd_fl.defense.vaccine import (
    ShuffledEnsemble,
    VaccineResult,
    detection_auc,
    kd_weights,
    search_vaccine,
    shuffle_scores,
    shuffled_copy,
    suspicion_auc,
    tail_ratio,
    vaccine_regularizer,
)

__all__ = [
    "DEFENSE_NAMES",
    "ABDConfig",
    "ABDDefense",
    "abd_config_for",
    "SRConfig",
    "add_sr_gradient",
    "sr_hypergradient",
    "synthesize_delta",
    "ShuffledEnsemble",
    "VaccineResult",
    "detection_auc",
    "kd_weights",
    "search_vaccine",
    "shuffle_scores",
    "shuffled_copy",
    "suspicion_auc",
    "tail_ratio",
    "vaccine_regularizer",
]
