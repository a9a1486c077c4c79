"""Typed settings of the ``simulation`` group: the clients, their data split, local training
and the simulation engine's resources.

:func:`abd_fl.config_store.register_configs` stores :class:`SimulationSettings` as the schema
``simulation/simulation_schema`` that ``configs/simulation/default.yaml`` extends (the
defaults below are its values), so OmegaConf refuses an unknown key or a wrong type
(``simulation.num_clients=abc``) when the config is composed. Ranges and cross-key rules
(``strategy.mode=one_shot`` needs ``rounds=1``, ...) are checked by
:func:`abd_fl.config.validate_config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union


@dataclass
class ClientResources:
    """What each simulated client (a Ray actor) reserves."""

    num_cpus: Union[int, float] = 1
    """CPU cores per client (>= 0; fractions share a core); also the client's torch threads."""
    num_gpus: float = 0.0
    """GPUs per client (>= 0; fractions share a GPU)."""


@dataclass
class SimulationSettings:
    """The ``simulation`` group."""

    num_clients: int = 6
    """Simulated clients (SuperNodes), >= 1; every one trains in every round."""
    rounds: int = 1
    """Federated rounds, >= 1; ``strategy.mode=one_shot`` needs exactly 1."""
    partition: str = "dirichlet"
    """How the training set is split among the clients: ``iid`` | ``dirichlet`` (label skew)."""
    alpha: float = 0.5
    """Dirichlet concentration, > 0 (smaller = more non-IID); unused by ``iid``."""
    local_epochs: int = 30
    """Local training epochs per round, >= 0 (``attack.local_epochs`` may differ for attackers)."""
    local_lr: float = 0.05
    """Local SGD learning rate, > 0."""
    local_batch_size: int = 32
    """Local SGD batch size, >= 1."""
    client_resources: ClientResources = field(default_factory=ClientResources)
    ray_address: Optional[str] = None
    """Address of an existing Ray cluster; None = start a local one."""
