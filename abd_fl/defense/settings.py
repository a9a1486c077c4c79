"""Typed settings of the ``defense`` group: which defense guards each distilled student, and
ABD's parameters (:class:`~abd_fl.defense.abd.ABDConfig`, whose defaults are the reference's
runs). The single source of the values ``configs/defense/<name>.yaml`` ships: Hydra extends
the schemas :func:`abd_fl.config_store.register_configs` stores from :data:`DEFENSE_PRESETS`,
and the Python API (``strategies.api``) builds the same objects.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

from abd_fl.defense.abd import DEFENSE_NAMES, ABDConfig, ABDDefense, abd_config_for

ABD_TI_PARAMS: dict[str, Any] = {
    "use_sv": False,  # no Shuffling Vaccine ...
    "sr": "off",  # ... and no untargeted SR
    "class_balance": 0.1,  # generator loss + coef * sum_c pbar_c log pbar_c (DAFL's information entropy)
    "inversion": "on",  # targeted retrospection: scan the student's classes for a trigger
}
"""``defense=abd_ti`` (ours, README "Design"): ABD's settings with these changed. At
``inversion_at`` of the run the student's trigger is synthesised per class on recent
synthetic batches, and when one class stands out the teachers see purified inputs from then
on; the generator gets a class-balance term throughout."""


@dataclass
class DefenseSettings:
    """The ``defense`` group: the defense of the global student and the comparison arms.

    - ``name``: ``abd`` (Shuffling Vaccine + Self-Retrospection, Algorithm 2), ``sv`` (SV
      only), ``sr`` (SR only), ``abd_ti`` (targeted retrospection, ours) or ``none``;
    - ``compare_baseline``: also distil an undefended ``dfkd_student`` from the same teachers;
    - ``ablation``: also distil ``sv_student`` and ``sr_student`` (the paper's Table 4);
    - ``params``: ABD's settings, shared by every defended arm.
    """

    name: str = "abd"
    compare_baseline: bool = True
    ablation: bool = False
    params: ABDConfig = field(default_factory=ABDConfig)

    def arms(self) -> list[tuple[str, str]]:
        """(role, defense name) of every student distilled each round; the first is the global
        model: ``<name>_student``, then ``sv_student`` / ``sr_student`` with ``ablation``, then
        the undefended ``dfkd_student`` with ``compare_baseline`` (only it for ``none``)."""
        if self.name not in DEFENSE_NAMES:
            raise ValueError(f"unknown defense '{self.name}'; choose one of: {', '.join(DEFENSE_NAMES)}")
        if self.name == "none":
            return [("dfkd_student", "none")]
        arms = [(f"{self.name}_student", self.name)]
        if self.ablation:
            arms += [(f"{v}_student", v) for v in ("sv", "sr") if v != self.name]
        if self.compare_baseline:
            arms.append(("dfkd_student", "none"))
        return arms

    def config_for(self, arm_defense: str, seed: int) -> ABDConfig | None:
        """ABD's settings of one arm (``sv`` / ``sr`` switch their parts; None for ``none``),
        validated (``ValueError`` naming the bad value)."""
        params = asdict(self.params) if hasattr(self.params, "__dataclass_fields__") else dict(self.params)
        params["seed"] = int(seed)
        return abd_config_for(arm_defense, **params)

    def build(self, arm_defense: str, seed: int) -> ABDDefense | None:
        """The defense object of one arm (None for ``none``)."""
        cfg = self.config_for(arm_defense, seed)
        return None if cfg is None else ABDDefense(cfg)

    def validate(self) -> None:
        """Every arm's settings, so a bad value fails before any distillation."""
        for _role, name in self.arms():
            self.config_for(name, seed=0)


_TOP_KEYS = {f.name for f in fields(DefenseSettings)} - {"name", "params"}
_ABD_KEYS = {f.name for f in fields(ABDConfig)}


def _abd_params(params: dict[str, Any]) -> ABDConfig:
    """ABD's settings from keyword values (``sr_config`` may be a dict), validated: ABD's own
    constructor, :func:`~abd_fl.defense.abd.abd_config_for` (whose ``abd`` leaves them as given)."""
    cfg = abd_config_for("abd", **params)
    assert cfg is not None
    return cfg


def defense_preset(name: str, **changes: Any) -> DefenseSettings:
    """``configs/defense/<name>.yaml`` as an object: ``abd`` / ``sv`` / ``sr`` / ``none``
    (ABD's defaults, the reference's runs) or ``abd_ti`` (:data:`ABD_TI_PARAMS`), with
    ``changes`` to :class:`DefenseSettings` fields (``compare_baseline``, ``ablation``) or
    to ABD's parameters (any :class:`ABDConfig` field, e.g. ``num_layers=2``)."""
    if name not in DEFENSE_NAMES:
        raise ValueError(f"unknown defense '{name}'; choose one of: {', '.join(DEFENSE_NAMES)}")
    unknown = sorted(set(changes) - _TOP_KEYS - _ABD_KEYS)
    if unknown:
        raise ValueError(f"unknown defense setting(s) {unknown}; known: {', '.join(sorted(_TOP_KEYS | _ABD_KEYS))}")
    base = ABD_TI_PARAMS if name == "abd_ti" else {}
    params = _abd_params({**base, **{k: v for k, v in changes.items() if k in _ABD_KEYS}})
    return DefenseSettings(name=name, params=params, **{k: v for k, v in changes.items() if k in _TOP_KEYS})


DEFENSE_PRESETS: dict[str, DefenseSettings] = {name: defense_preset(name) for name in DEFENSE_NAMES}
"""``defense=<name>``: the shipped settings of each group file."""


def defense_settings(group: Mapping[str, Any] | None) -> DefenseSettings:
    """The typed settings of a composed ``defense`` group (a plain dict; None = ``none``).
    Raises ``ValueError`` on an unknown name, key or value."""
    group = dict(group or {"name": "none"})
    name = group.pop("name", "none")
    params = dict(group.pop("params", None) or {})
    unknown = sorted(set(group) - _TOP_KEYS)
    if unknown:
        raise ValueError(f"unknown defense key(s) {unknown}; known: name, params, {', '.join(sorted(_TOP_KEYS))}")
    bad = sorted(set(params) - _ABD_KEYS)
    if bad:
        raise ValueError(f"unknown defense.params key(s) {bad}")
    if name not in DEFENSE_NAMES:
        raise ValueError(f"unknown defense '{name}'; choose one of: {', '.join(DEFENSE_NAMES)}")
    return DefenseSettings(name=name, params=_abd_params(params), **group)
