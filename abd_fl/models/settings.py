"""Typed settings of the ``model`` group: the clients' (teachers') and the server's (student's)
architectures, and how deep ABD's Shuffling Vaccine reaches into them.

:func:`abd_fl.config_store.register_configs` stores :class:`ModelSettings` as the schema
``model/model_schema`` that every ``configs/model/<name>.yaml`` extends, so OmegaConf refuses
an unknown key or a wrong type (``model.shuffle_layers=two``) when the config is composed. The
defaults are ``model=digits``; each other file sets its pair. Known architecture names are
checked by :func:`abd_fl.config.validate_config` (and :func:`abd_fl.models.build_model`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from abd_fl.models.normalize import ClassifierWithNormalization
from abd_fl.models.registry import build_model


@dataclass
class ModelSettings:
    """The ``model`` group (:data:`abd_fl.models.MODEL_NAMES` lists the architectures:
    ``cnn_small``, ``cnn``, ``lenet_small``, ``lenet``, ``wrn16_1``, ``wrn16_2``, ``wrn40_2``,
    ``resnet18``)."""

    client: str = "cnn"
    """The clients' architecture, i.e. the teachers' (``cnn``: 56k parameters, for digits)."""
    student: str = "cnn"
    """The server's student; ``strategy.mode=multi_round`` distils into the aggregate, so it
    must equal ``client`` there."""
    shuffle_layers: int = 1
    """Shuffling Vaccine: how many of the teachers' last conv layers have their input channels
    shuffled (the model's last stage: 1 for ``cnn`` and ``lenet``, 5 for a WRN-16); the
    defense group's ``params.num_layers`` is this value. At least 1 (checked by ABD)."""

    def build(self, role: str, num_classes: int, in_channels: int, mean: Sequence[float], std: Sequence[float]) -> ClassifierWithNormalization:
        """A fresh ``client`` or ``student`` network (:func:`abd_fl.models.build_model`)."""
        if role not in ("client", "student"):
            raise ValueError(f"unknown model role '{role}'; choose one of: client, student")
        return build_model(getattr(self, role), num_classes, in_channels, mean, std)
