"""Validation of a resolved experiment config (a plain nested dict, as Hydra composes it).

Every check fails with one line naming the bad key, its value and what is allowed, so a
typo in a Hydra override stops the run before Ray or Flower start.

The types of the groups' keys are the typed schemas' (:mod:`abd_fl.config_store`): OmegaConf
refuses a wrong type or an unknown key when the config is composed, so the checks here are
ranges, known names and cross-key rules, plus a key added with Hydra's ``+key=value``
(which the schemas let through) and the types of the free-form values
(``strategy.base_params``, ``attack.teacher_checkpoints``).
"""

from __future__ import annotations

import math
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Mapping, get_type_hints

from abd_fl.attacks import trigger_names
from abd_fl.attacks.schedule import ATTACKER_POOLS, schedule_from_config
from abd_fl.attacks.settings import AttackSettings
from abd_fl.checkpoints import CHECKPOINT_SUFFIXES, CheckpointError, client_checkpoint_paths
from abd_fl.data import DATASET_NAMES
from abd_fl.data.registry import dataset_num_classes
from abd_fl.results.round_checkpoint import ResumeError, resolve_resume
from abd_fl.settings.faults import FaultSettings
from abd_fl.data.settings import DatasetSettings
from abd_fl.defense import DEFENSE_NAMES
from abd_fl.defense.settings import defense_settings
from abd_fl.distill.settings import distill_settings
from abd_fl.distill.fedgen import FedGenConfig
from abd_fl.data.partition import PARTITION_SCHEMES
from abd_fl.models import MODEL_NAMES
from abd_fl.models.settings import ModelSettings
from abd_fl.settings.run import GROUPS, CleanKDReferenceSettings, RunSettings, TeachersSettings
from abd_fl.settings.simulation import SimulationSettings
from abd_fl.settings.strategy import (
    BASE_STRATEGIES,
    KD_TEACHER_SETS,
    MODES,
    PRESET_MODES,
    STRATEGY_NAMES,
    FedGenStrategySettings,
    UpdateCheckSettings,
)

__all__ = ["BASE_STRATEGIES", "MODES", "PRESET_MODES", "STRATEGY_NAMES", "ConfigError", "validate_config"]

TYPED_SECTIONS: dict[str, type] = {
    "dataset": DatasetSettings,
    "model": ModelSettings,
    "attack": AttackSettings,
    "simulation": SimulationSettings,
    "strategy": FedGenStrategySettings,  # every preset's fields; fedgen's only with strategy=fedgen (checked below)
    "teachers": TeachersSettings,
    "clean_kd_reference": CleanKDReferenceSettings,
}
"""The typed groups and top-level settings whose keys :func:`validate_config` checks here
(distill and defense check theirs when their settings are built)."""
DEVICES = ("auto", "cpu", "cuda")
RUNNERS = ("federated", "centralized", "train_teachers")
TEACHER_SETS = ("central", "clients", "both")
TEACHER_FORMATS = ("pt", "safetensors")


class ConfigError(ValueError):
    """A bad value in the experiment config."""


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"unknown {key} '{value}'; choose one of: {', '.join(allowed)}")


def _number(key: str, value: Any, low: float | None = None, high: float | None = None, integer: bool = False) -> None:
    """An untyped key's number: its type, then :func:`_range`."""
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{key} must be {kind}, got {value!r}")
    _range(key, value, low, high)


def _range(key: str, value: float, low: float | None = None, high: float | None = None) -> None:
    """A number (a typed key's: the schema checked its type when composing) finite and in [low, high]."""
    if not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ConfigError(f"{key} must be in [{lo}, {hi}], got {value!r}")


def validate_config(cfg: Mapping[str, Any]) -> None:
    """Check a resolved experiment config; raise :class:`ConfigError` on the first bad value."""
    ds, model, attack, strat = cfg["dataset"], cfg["model"], cfg["attack"], cfg["strategy"]
    dist, sim = cfg["distill"], cfg["simulation"]
    _choice("dataset", ds["name"], DATASET_NAMES)
    _choice("model.client", model["client"], MODEL_NAMES)
    _choice("model.student", model["student"], MODEL_NAMES)
    _choice("trigger", attack["trigger"], trigger_names())
    _choice("strategy.base", strat["base"], BASE_STRATEGIES)
    _choice("strategy.mode", strat["mode"], MODES)
    _choice("strategy.teachers", strat.get("teachers", "all"), KD_TEACHER_SETS)
    try:
        UpdateCheckSettings(**(strat.get("update_check") or {})).validate()
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from None
    _validate_strategy_preset(strat)
    top = [*GROUPS, *(f.name for f in fields(RunSettings))]
    unknown = sorted(str(k) for k in cfg if k not in top)
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {unknown}; known: {', '.join(top)}")
    for group, cls in TYPED_SECTIONS.items():
        _known_keys(group, cfg.get(group) or {}, cls)
    try:  # the typed group (abd_fl/distill/settings.py: the synthesizer's name first); each synthesizer checks its parameters (ood: reads its image file) when built
        settings = distill_settings(dist)
        settings.build_synthesizer()
        settings.loop_config(seed=0)  # the loop's values (e.g. distill.ensemble)
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from None
    _choice("simulation.partition", sim["partition"], PARTITION_SCHEMES)
    defense = cfg.get("defense") or {"name": "none"}
    _choice("defense", defense["name"], DEFENSE_NAMES)
    try:  # every arm's settings now (abd_fl/defense/settings.py), so a bad value fails before any client trains
        defense_settings(defense).validate()
    except (TypeError, ValueError) as err:
        raise ConfigError(f"bad defense.params: {err}") from None
    _choice("runner", cfg.get("runner", "federated"), RUNNERS)
    device = str(cfg.get("device", "auto"))
    if not (device in DEVICES or device.startswith("cuda:")):
        raise ConfigError(f"unknown device '{device}'; choose one of: auto, cpu, cuda, cuda:N")

    _range("attack.poison_rate", attack["poison_rate"], 0.0, 1.0)
    try:
        classes = dataset_num_classes(ds["name"], ds.get("image_size"))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    _range("attack.target_label", attack["target_label"], 0, classes - 1)
    _range("simulation.num_clients", sim["num_clients"], 1, None)
    _range("simulation.rounds", sim["rounds"], 1, None)
    _range("simulation.alpha", sim["alpha"], 1e-9, None)
    _range("simulation.local_epochs", sim["local_epochs"], 0, None)
    _range("simulation.local_lr", sim["local_lr"], 1e-12, None)
    _range("simulation.local_batch_size", sim["local_batch_size"], 1, None)
    _range("simulation.client_resources.num_cpus", sim["client_resources"]["num_cpus"], 0, None)
    _range("simulation.client_resources.num_gpus", sim["client_resources"]["num_gpus"], 0, None)
    _range("strategy.fraction_train", strat["fraction_train"], 1e-9, 1.0)
    for key in ("iterations", "student_steps", "batch_size"):
        _range(f"distill.{key}", dist[key], 0 if key == "iterations" else 1, None)
    _range("distill.lr", dist["lr"], 1e-12, None)
    _range("distill.temperature", dist["temperature"], 1e-9, None)
    _range("distill.attention_beta", dist.get("attention_beta", 0.0), 0.0, None)
    ref = cfg.get("clean_kd_reference") or {}
    if ref.get("enabled", False):
        _range("clean_kd_reference.fraction", ref["fraction"], 1e-9, 1.0)

    _validate_attackers(cfg)
    _validate_resume(cfg)
    try:
        FaultSettings(**(cfg.get("fault") or {})).validate(int(sim["num_clients"]))
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from None
    _validate_checkpoints(cfg)
    _validate_bulyan(strat, sim)
    if strat["mode"] == "one_shot" and sim["rounds"] != 1:
        raise ConfigError(f"strategy.mode=one_shot runs exactly 1 round, got simulation.rounds={sim['rounds']}")
    if strat["mode"] == "multi_round" and model["client"] != model["student"]:
        raise ConfigError(
            "strategy.mode=multi_round distils into the aggregated model, so model.student must equal "
            f"model.client, got student={model['student']} client={model['client']}"
        )


def _known_keys(key: str, values: Mapping[str, Any], cls: type) -> None:
    """A typed group's keys, and its nested settings', are its schema's fields. OmegaConf refuses
    any other key when composing, except one added on purpose with Hydra's ``+key=value``."""
    known = [f.name for f in fields(cls)]
    unknown = sorted((str(k) for k in values if k not in known))
    if unknown:
        raise ConfigError(f"unknown {key} key(s) {unknown}; known: {', '.join(known)}")
    hints = get_type_hints(cls)
    for name in known:
        if is_dataclass(hints[name]) and isinstance(values.get(name), Mapping):
            _known_keys(f"{key}.{name}", values[name], hints[name])


def _validate_resume(cfg: Mapping[str, Any]) -> None:
    """``resume`` names a run directory with round checkpoints, and the run is federated."""
    resume = cfg.get("resume")
    if not resume:
        return
    if cfg.get("runner", "federated") != "federated":
        raise ConfigError(f"resume={resume} continues a federated run; runner={cfg.get('runner')} has no rounds to resume")
    try:
        resolve_resume(str(resume), str(cfg.get("output_dir", "outputs")))
    except ResumeError as err:
        raise ConfigError(str(err)) from None


def _validate_bulyan(strat: Mapping[str, Any], sim: Mapping[str, Any]) -> None:
    """Bulyan aggregates only when a round has at least 4 f + 3 replies (f = ``num_malicious_nodes``);
    with fewer clients sampled it would skip every round, so the run is refused up front."""
    if strat["base"] != "bulyan":
        return
    params = dict(strat.get("base_params") or {})
    f = params.get("num_malicious_nodes", 0)
    _number("strategy.base_params.num_malicious_nodes", f, 0, None, integer=True)
    n, frac = sim["num_clients"], strat["fraction_train"]
    sampled = max(int(n * frac), int(params.get("min_train_nodes", max(1, round(frac * n)))))
    if sampled < 4 * f + 3:
        raise ConfigError(
            f"strategy.base=bulyan with num_malicious_nodes={f} needs at least {4 * f + 3} replies per round "
            f"(4 f + 3), but simulation.num_clients={n} with strategy.fraction_train={frac} samples {sampled}: "
            "raise simulation.num_clients or lower strategy.base_params.num_malicious_nodes"
        )


def _validate_strategy_preset(strat: Mapping[str, Any]) -> None:
    """``strategy.name`` (absent in older files: the base's name), the preset's mode, FedGen's settings."""
    name = strat.get("name") or strat["base"]
    _choice("strategy.name", name, STRATEGY_NAMES)
    mode = PRESET_MODES.get(name)
    if mode is not None and strat["mode"] != mode:
        raise ConfigError(f"strategy={name} is defined by strategy.mode={mode}, got strategy.mode={strat['mode']}")
    if name == "fedgen":
        try:
            FedGenConfig(**dict(strat.get("fedgen") or {}))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"bad strategy.fedgen: {err}") from None
    elif strat.get("fedgen"):
        raise ConfigError(f"strategy.fedgen settings are for strategy=fedgen, got strategy.name={name}")


def _validate_attackers(cfg: Mapping[str, Any]) -> None:
    """Who attacks (count / fraction / ids, fixed or per-round pool), when (window), how
    (local epochs / lr, model-replacement scale). Absent keys take their defaults."""
    attack, sim = cfg["attack"], cfg["simulation"]
    n = sim["num_clients"]
    ids = attack.get("malicious_ids")
    fraction = attack.get("malicious_fraction")
    pool = attack.get("attacker_pool", "fixed")
    _choice("attack.attacker_pool", pool, ATTACKER_POOLS)
    if ids is not None:
        ids = list(ids)
        bad = [i for i in ids if not 0 <= i < n]
        if bad or len(set(ids)) != len(ids):
            raise ConfigError(
                f"attack.malicious_ids must be distinct partition ids in [0, {n - 1}], got {ids}"
            )
        if fraction is not None:
            raise ConfigError(f"set attack.malicious_ids or attack.malicious_fraction, not both; got ids {ids} and fraction {fraction}")
        if pool != "fixed":
            raise ConfigError(f"attack.attacker_pool={pool} draws attackers every round; explicit attack.malicious_ids need attacker_pool=fixed")
    elif fraction is not None:
        _range("attack.malicious_fraction", fraction, 0.0, 1.0)
    else:
        _range("attack.num_malicious", attack["num_malicious"], 0, None)
        if attack["num_malicious"] > n:
            raise ConfigError(
                f"attack.num_malicious={attack['num_malicious']} is more than simulation.num_clients={n}"
            )
    start, every = attack.get("start_round", 1), attack.get("every", 1)
    _range("attack.start_round", start, 1, None)
    if start > sim["rounds"]:
        raise ConfigError(f"attack.start_round={start} is after the last round (simulation.rounds={sim['rounds']}): nobody would attack")
    _range("attack.every", every, 1, None)
    if attack.get("local_epochs") is not None:
        _range("attack.local_epochs", attack["local_epochs"], 0, None)
    lr = attack.get("local_lr")
    if lr is not None and not 0 < lr < math.inf:
        raise ConfigError(f"attack.local_lr must be a finite number > 0 or null (= simulation.local_lr), got {lr!r}")
    scale = attack.get("scale", 1.0)
    if not 0 < scale < math.inf:
        raise ConfigError(f"attack.scale must be a finite number > 0 (1 = no scaling), got {scale!r}")


def _checkpoint_file(key: str, path: Any) -> None:
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{key} must be a file path, got {path!r}")
    p = Path(path)
    if p.suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise ConfigError(f"{key} '{path}' has unsupported extension '{p.suffix}'; use one of: {', '.join(CHECKPOINT_SUFFIXES)}")
    if not p.is_file():
        raise ConfigError(f"{key}: teacher checkpoint not found: '{path}'")


def _validate_checkpoints(cfg: Mapping[str, Any]) -> None:
    """Teacher checkpoints (files exist, ids attack at least once) and the teachers runner.
    The files' contents are checked when a run is prepared (``check_teacher_checkpoints``)."""
    runner = cfg.get("runner", "federated")
    central = cfg.get("teacher_checkpoint")
    if central is not None:
        if runner != "centralized":
            raise ConfigError(
                f"teacher_checkpoint is for runner=centralized, got runner={runner} "
                "(federated clients take theirs from attack.teacher_checkpoints)"
            )
        _checkpoint_file("teacher_checkpoint", central)
    spec = cfg["attack"].get("teacher_checkpoints")
    if spec is not None:
        if runner != "federated":
            raise ConfigError(f"attack.teacher_checkpoints is for runner=federated, got runner={runner} (centralized: teacher_checkpoint)")
        n = cfg["simulation"]["num_clients"]
        try:
            paths = client_checkpoint_paths(spec, n)
        except CheckpointError as err:
            raise ConfigError(str(err)) from None
        for pid, path in sorted(paths.items()):
            _checkpoint_file(f"attack.teacher_checkpoints[{pid}]", str(path))
        schedule = schedule_from_config(cfg["attack"], int(n), int(cfg["seed"]))
        ever = schedule.ever_malicious(int(cfg["simulation"]["rounds"]))
        idle = sorted(set(paths) - set(ever))
        if idle and not isinstance(spec, str):
            raise ConfigError(
                f"attack.teacher_checkpoints names partition ids {idle} that never attack in this run; "
                f"malicious clients: {ever} (attack.malicious_ids chooses them)"
            )
        if isinstance(spec, str) and ever and not set(paths) & set(ever):
            raise ConfigError(
                f"attack.teacher_checkpoints folder '{spec}' has files for clients {sorted(paths)} but none for the "
                f"malicious clients {ever} (attack.malicious_ids chooses them)"
            )
    teachers = cfg.get("teachers") or {}
    _choice("teachers.which", teachers.get("which", "both"), TEACHER_SETS)
    _choice("teachers.format", teachers.get("format", "pt"), TEACHER_FORMATS)
    if runner == "train_teachers" and teachers.get("which", "both") == "clients":
        n = cfg["simulation"]["num_clients"]
        if not schedule_from_config(cfg["attack"], int(n), int(cfg["seed"])).ever_malicious(int(cfg["simulation"]["rounds"])):
            raise ConfigError("teachers.which=clients trains one teacher per malicious client, but the attack config has none")
    out = teachers.get("out")
    if out == "":
        raise ConfigError(f"teachers.out must be a folder path or null (= the run directory), got {out!r}")
