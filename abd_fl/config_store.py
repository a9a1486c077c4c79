"""Hydra's ConfigStore entries: the typed schemas the YAML groups extend.

``configs/distill/<name>.yaml`` starts from ``<name>_schema`` (the dataclass of
:mod:`abd_fl.distill.settings`) and ``configs/defense/<name>.yaml`` from ``<name>_schema``
(:data:`abd_fl.defense.settings.DEFENSE_PRESETS`), so the shipped values live in one place,
the Python API builds the same objects, and OmegaConf rejects an unknown key or a wrong type
in a YAML file or an override (``distill.iterations=abc``) when the config is composed.

:func:`register_configs` runs before any composition: in ``abd-fl``'s entry point and in
:func:`abd_fl.paths.compose_config`.
"""

from __future__ import annotations

from abd_fl.defense.settings import DEFENSE_PRESETS
from abd_fl.distill.settings import DISTILL_PRESETS

_registered = False


def register_configs() -> None:
    """Store every group schema in Hydra's ConfigStore (idempotent)."""
    global _registered
    if _registered:
        return
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for name, cls in DISTILL_PRESETS.items():
        cs.store(group="distill", name=f"{name}_schema", node=cls)
    for name, settings in DEFENSE_PRESETS.items():
        cs.store(group="defense", name=f"{name}_schema", node=settings)
    _registered = True
