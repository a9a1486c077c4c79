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
(primary)  ``config_schema``              a slot per group, :class:`abd_fl.settings.run.RunSettings`
========== ============================== ==================================================

A group with one schema: each file sets the values that define it (a dataset's name, a
model pair, a trigger), the schema's defaults give the rest. A group with a schema per file:
the values are the preset's, the file adds nothing but Hydra-only choices (an interpolation,
another group's default). ``configs/config.yaml`` itself extends ``config_schema``: a slot
per group, then the top-level keys (``seed``, ``runner``, ``teachers``, ...) of
:class:`abd_fl.settings.run.RunSettings`, so ``seed=abc`` or an unknown top-level key is
refused the same way.

:func:`register_configs` runs before any composition: in ``abd-fl``'s entry point and in
:func:`abd_fl.paths.compose_config`.
"""

from __future__ import annotations

from dataclasses import field, fields, make_dataclass
from typing import Any, get_type_hints

from abd_fl.attacks.settings import AttackSettings
from abd_fl.data.settings import DatasetSettings
from abd_fl.defense.settings import DEFENSE_PRESETS
from abd_fl.distill.settings import DISTILL_PRESETS
from abd_fl.models.settings import ModelSettings
from abd_fl.settings.run import GROUPS, RunSettings
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


def _root_schema() -> type:
    """``config_schema``: a slot per group (typed by the group's own schema when it is composed;
    None until then), then :class:`~abd_fl.settings.run.RunSettings`' fields, the order of the
    composed config."""
    hints = get_type_hints(RunSettings)
    slots = [(group, Any, field(default=None)) for group in GROUPS]
    top = [(f.name, hints[f.name], f) for f in fields(RunSettings)]
    return make_dataclass("ConfigSchema", slots + top)


def register_configs() -> None:
    """Store every group schema in Hydra's ConfigStore (idempotent)."""
    global _registered
    if _registered:
        return
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=_root_schema())
    for group, cls in GROUP_SCHEMAS.items():
        cs.store(group=group, name=f"{group}_schema", node=cls)
    for name, cls in DISTILL_PRESETS.items():
        cs.store(group="distill", name=f"{name}_schema", node=cls)
    for name, settings in DEFENSE_PRESETS.items():
        cs.store(group="defense", name=f"{name}_schema", node=settings)
    for name, settings in STRATEGY_PRESETS.items():
        cs.store(group="strategy", name=f"{name}_schema", node=settings)
    _registered = True
