"""Hydra's ConfigStore entries: the typed schemas the YAML groups extend.

Every group file starts from a stored schema (``defaults: [<schema>, _self_]``), so the
shipped values live in one place, the Python API builds the same objects, and OmegaConf
rejects an unknown key or a wrong type in a YAML file or an override
(``simulation.num_clients=abc``, ``dataset.imagesize=8``) when the config is composed:

========== ============================== ==================================================
group      schema(s)                      dataclass
========== ============================== ==================================================
dataset    ``dataset_schema``             :class:`abd_fl.data.settings.DatasetSettings`
model      ``model_schema``               :class:`abd_fl.models.settings.ModelSettings`
attack     ``attack_schema``              :class:`abd_fl.attacks.settings.AttackSettings`
distill    ``<name>_schema`` per file     :data:`abd_fl.distill.settings.DISTILL_PRESETS`
strategy   ``<name>_schema`` per file     :data:`abd_fl.settings.strategy.STRATEGY_PRESETS`
defense    ``<name>_schema`` per file     :data:`abd_fl.defense.settings.DEFENSE_PRESETS`
simulation ``simulation_schema``          :class:`abd_fl.settings.simulation.SimulationSettings`
========== ============================== ==================================================

A group with one schema: each file sets the values that define it (a dataset's name, a
model pair, a trigger), the schema's defaults give the rest. A group with a schema per file:
the values are the preset's, the file adds nothing but Hydra-only choices (an interpolation,
another group's default). The top-level keys (``seed``, ``runner``, ``teachers``, ...) are
not typed; :func:`abd_fl.config.validate_config` checks them.

:func:`register_configs` runs before any composition: in ``abd-fl``'s entry point and in
:func:`abd_fl.paths.compose_config`.
"""

from __future__ import annotations

from abd_fl.attacks.settings import AttackSettings
from abd_fl.data.settings import DatasetSettings
from abd_fl.defense.settings import DEFENSE_PRESETS
from abd_fl.distill.settings import DISTILL_PRESETS
from abd_fl.models.settings import ModelSettings
from abd_fl.settings.simulation import SimulationSettings
from abd_fl.settings.strategy import STRATEGY_PRESETS

GROUP_SCHEMAS: dict[str, type] = {
    "dataset": DatasetSettings,
    "model": ModelSettings,
    "attack": AttackSettings,
    "simulation": SimulationSettings,
}
"""The groups with one schema, ``<group>_schema``, that every file of the group extends."""

_registered = False


def register_configs() -> None:
    """Store every group schema in Hydra's ConfigStore (idempotent)."""
    global _registered
    if _registered:
        return
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for group, cls in GROUP_SCHEMAS.items():
        cs.store(group=group, name=f"{group}_schema", node=cls)
    for name, cls in DISTILL_PRESETS.items():
        cs.store(group="distill", name=f"{name}_schema", node=cls)
    for name, settings in DEFENSE_PRESETS.items():
        cs.store(group="defense", name=f"{name}_schema", node=settings)
    for name, settings in STRATEGY_PRESETS.items():
        cs.store(group="strategy", name=f"{name}_schema", node=settings)
    _registered = True
