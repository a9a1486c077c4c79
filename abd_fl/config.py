"""Validation of a resolved experiment config (a plain nested dict, as Hydra composes it).

Every check fails with one line naming the bad key, its value and what is allowed, so a
typo in a Hydra override stops the run before Ray or Flower start.
"""

from __future__ import annotations

from typing import Any, Mapping

from abd_fl.attacks import trigger_names
from abd_fl.data import DATASET_NAMES
from abd_fl.defense import DEFENSE_NAMES, abd_config_for
from abd_fl.distill import SYNTHESIZERS
from abd_fl.data.partition import PARTITION_SCHEMES
from abd_fl.models import MODEL_NAMES

BASE_STRATEGIES = ("fedavg", "fedmedian", "fedtrimmedavg", "krum")
MODES = ("one_shot", "multi_round")
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    """A bad value in the experiment config."""


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"unknown {key} '{value}'; choose one of: {', '.join(allowed)}")


def _number(key: str, value: Any, low: float | None = None, high: float | None = None, integer: bool = False) -> None:
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{key} must be {kind}, got {value!r}")
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
    _choice("synthesizer", dist["synthesizer"], tuple(SYNTHESIZERS))
    _choice("simulation.partition", sim["partition"], PARTITION_SCHEMES)
    defense = cfg.get("defense") or {"name": "none"}
    _choice("defense", defense["name"], DEFENSE_NAMES)
    try:  # build the defense's settings now, so a bad value fails before any client trains
        abd_config_for(defense["name"], **dict(defense.get("params") or {}))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"bad defense.params: {err}") from None
    _choice("runner", cfg.get("runner", "federated"), ("federated", "centralized"))
    device = str(cfg.get("device", "auto"))
    if not (device in DEVICES or device.startswith("cuda:")):
        raise ConfigError(f"unknown device '{device}'; choose one of: auto, cpu, cuda, cuda:N")

    _number("attack.poison_rate", attack["poison_rate"], 0.0, 1.0)
    _number("attack.target_label", attack["target_label"], 0, None, integer=True)
    _number("simulation.num_clients", sim["num_clients"], 1, None, integer=True)
    _number("simulation.rounds", sim["rounds"], 1, None, integer=True)
    _number("simulation.alpha", sim["alpha"], 1e-9, None)
    _number("simulation.local_epochs", sim["local_epochs"], 0, None, integer=True)
    _number("simulation.local_lr", sim["local_lr"], 1e-12, None)
    _number("simulation.local_batch_size", sim["local_batch_size"], 1, None, integer=True)
    _number("simulation.client_resources.num_cpus", sim["client_resources"]["num_cpus"], 0, None)
    _number("simulation.client_resources.num_gpus", sim["client_resources"]["num_gpus"], 0, None)
    _number("strategy.fraction_train", strat["fraction_train"], 1e-9, 1.0)
    for key in ("iterations", "student_steps", "batch_size"):
        _number(f"distill.{key}", dist[key], 0 if key == "iterations" else 1, None, integer=True)
    _number("distill.lr", dist["lr"], 1e-12, None)
    _number("distill.temperature", dist["temperature"], 1e-9, None)
    ref = cfg.get("clean_kd_reference") or {}
    if ref.get("enabled", False):
        _number("clean_kd_reference.fraction", ref["fraction"], 1e-9, 1.0)

    n = sim["num_clients"]
    ids = attack.get("malicious_ids")
    if ids is not None:
        ids = list(ids)
        bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n]
        if bad or len(set(ids)) != len(ids):
            raise ConfigError(
                f"attack.malicious_ids must be distinct partition ids in [0, {n - 1}], got {ids}"
            )
    else:
        _number("attack.num_malicious", attack["num_malicious"], 0, None, integer=True)
        if attack["num_malicious"] > n:
            raise ConfigError(
                f"attack.num_malicious={attack['num_malicious']} is more than simulation.num_clients={n}"
            )
    if strat["mode"] == "one_shot" and sim["rounds"] != 1:
        raise ConfigError(f"strategy.mode=one_shot runs exactly 1 round, got simulation.rounds={sim['rounds']}")
    if strat["mode"] == "multi_round" and model["client"] != model["student"]:
        raise ConfigError(
            "strategy.mode=multi_round distils into the aggregated model, so model.student must equal "
            f"model.client, got student={model['student']} client={model['client']}"
        )
