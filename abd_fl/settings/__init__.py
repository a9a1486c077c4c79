"""Typed settings of the groups that configure the federation rather than one algorithm:
``strategy`` (:mod:`abd_fl.settings.strategy`) and ``simulation``
(:mod:`abd_fl.settings.simulation`), and of the top-level keys of ``configs/config.yaml``
(:mod:`abd_fl.settings.run`). Plain data: the Flower strategies are named by strings here and
built in ``strategies/`` (this package imports no flwr).

The other groups' settings live beside what they configure: ``abd_fl/data/settings.py``,
``abd_fl/models/settings.py``, ``abd_fl/attacks/settings.py``, ``abd_fl/distill/settings.py``,
``abd_fl/defense/settings.py``; :mod:`abd_fl.config_store` stores them all as Hydra schemas.
"""

from abd_fl.settings.run import GROUPS, CleanKDReferenceSettings, RunSettings, TeachersSettings
from abd_fl.settings.simulation import ClientResources, SimulationSettings
from abd_fl.settings.strategy import STRATEGY_PRESETS, FedGenStrategySettings, StrategySettings, strategy_preset

__all__ = [
    "GROUPS",
    "CleanKDReferenceSettings",
    "RunSettings",
    "TeachersSettings",
    "ClientResources",
    "SimulationSettings",
    "STRATEGY_PRESETS",
    "FedGenStrategySettings",
    "StrategySettings",
    "strategy_preset",
]
