"""Typed settings of the top-level keys of ``configs/config.yaml``: the run's name, runner,
seed, device, output folder, and the settings of the centralized teacher, the
``train_teachers`` runner and the clean-KD reference.

:func:`abd_fl.config_store.register_configs` stores ``config_schema``, these fields after a
slot per group, which ``configs/config.yaml`` extends (its values are the defaults below), so
OmegaConf refuses an unknown top-level key or a wrong type (``seed=abc``) when the config is
composed. Known names (``runner``, ``device``, ``teachers.which``, ...), ranges and the
checkpoint files are checked by :func:`abd_fl.config.validate_config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from abd_fl.settings.faults import FaultSettings

GROUPS = ("dataset", "model", "attack", "distill", "strategy", "defense", "simulation")
"""The config groups of ``configs/config.yaml``, in its defaults list's order (a slot each in
``config_schema``, before the top-level keys)."""


@dataclass
class TeachersSettings:
    """``runner=train_teachers``: train poisoned teachers for the attack config and save them."""

    which: str = "both"
    """``central`` (one on the whole poisoned train set) | ``clients`` (one per malicious client) | ``both``."""
    format: str = "pt"
    """``pt`` | ``safetensors``."""
    out: Optional[str] = None
    """Folder for the files and ``teachers.json``; None = the run directory."""


@dataclass
class CleanKDReferenceSettings:
    """KD from the same teachers on clean training data (the paper's "Clean KD"), beside the
    data-free students: the same KD loss, only the inputs differ."""

    enabled: bool = True
    fraction: float = 0.2
    """Share of the clean training images used, in (0, 1]."""
    iterations: int = 200
    """KD iterations, >= 0 ..."""
    student_steps: int = 10
    """... of this many student steps each, >= 1."""
    temperature: float = 1.0
    """KD temperature, > 0 (the data-free student's loss)."""


@dataclass
class RunSettings:
    """The top-level keys of an experiment config."""

    name: str = "default"
    """The run's name: runs are written to ``<output_dir>/<name>-<timestamp>/``."""
    runner: str = "federated"
    """``federated`` (Flower + Ray) | ``centralized`` (one teacher, no Flower) | ``train_teachers``."""
    seed: int = 0
    """Seeds the data split, the partitions, the attacker draw, training and distillation."""
    device: str = "auto"
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``."""
    output_dir: str = "outputs"
    """Folder the run directories are written to."""
    progress: bool = True
    """Progress bars for long loops."""
    resume: Optional[str] = None
    """``runner=federated``: continue a killed run from its last finished round: ``latest``
    (``<output_dir>/latest``) or a run directory; the other settings must be the run's own
    (``abd_fl/results/round_checkpoint.py``)."""
    fault: FaultSettings = field(default_factory=FaultSettings)
    """Broken replies injected on purpose (``fault.kind``, which clients, which rounds): the
    fault table's cases (``benchmarks/faults.py``); ``none`` by default."""
    teacher_checkpoint: Optional[str] = None
    """``runner=centralized``: load the poisoned teacher from this ``.pt`` / ``.pth`` /
    ``.safetensors`` file instead of training it (federated clients: ``attack.teacher_checkpoints``)."""
    teachers: TeachersSettings = field(default_factory=TeachersSettings)
    clean_kd_reference: CleanKDReferenceSettings = field(default_factory=CleanKDReferenceSettings)
