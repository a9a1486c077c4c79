"""Wiring: the objects of one experiment built from its resolved config (a plain nested dict)
through the typed settings of each group (:class:`~abd_fl.data.settings.DatasetSettings`,
:class:`~abd_fl.models.settings.ModelSettings`, :class:`~abd_fl.attacks.settings.AttackSettings`,
:func:`~abd_fl.distill.settings.distill_settings`, :func:`~abd_fl.defense.settings.defense_settings`).

Shared by the Flower server side (``strategies/``), the Flower client side (``clients/``)
and the centralized runner, so that every side derives the same dataset split, client
partitions, malicious set, trigger and models from the same config and seed. What a client
does with them in a round is :mod:`abd_fl.local_update`; the clean-KD reference is
:mod:`abd_fl.clean_kd_reference`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from abd_fl.attacks import Trigger, build_trigger, make_poisoned_test_set
from abd_fl.attacks.schedule import AttackSchedule
from abd_fl.attacks.settings import AttackSettings
from abd_fl.checkpoints import CheckpointError, client_checkpoint_paths, load_teacher
from abd_fl.config import ConfigError, validate_config
from abd_fl.data import DatasetBundle, ImageData, partition_indices
from abd_fl.data.settings import DatasetSettings
from abd_fl.defense import ABDDefense
from abd_fl.defense.settings import defense_settings
from abd_fl.device import resolve_device
from abd_fl.distill import DistillConfig, Synthesizer
from abd_fl.distill.fedgen import FedGenConfig, FeatureGenerator
from abd_fl.distill.settings import distill_settings
from abd_fl.metrics import backdoor_metrics
from abd_fl.models.settings import ModelSettings


@functools.lru_cache(maxsize=4)
def _bundle_cached(name: str, root: str | None, image_size: int | None, seed: int) -> DatasetBundle:
    return DatasetSettings(name, root, image_size).load(seed)


def build_bundle(cfg: Mapping[str, Any]) -> DatasetBundle:
    """The dataset with its fixed, seeded train/test split (cached per process)."""
    ds = cfg["dataset"]
    bundle = _bundle_cached(ds["name"], ds.get("root"), ds.get("image_size"), int(cfg["seed"]))
    target = cfg["attack"]["target_label"]
    if not 0 <= target < bundle.num_classes:
        raise ConfigError(f"attack.target_label must be in [0, {bundle.num_classes - 1}], got {target}")
    return bundle


def client_partitions(cfg: Mapping[str, Any], bundle: DatasetBundle) -> list[np.ndarray]:
    """Train-set indices of every client (flwr-datasets partitioner, seeded)."""
    sim = cfg["simulation"]
    return partition_indices(
        bundle.train.labels.numpy(),
        num_partitions=int(sim["num_clients"]),
        scheme=sim["partition"],
        alpha=float(sim["alpha"]),
        seed=int(cfg["seed"]),
    )


def check_partitions(cfg: Mapping[str, Any], bundle: DatasetBundle) -> None:
    """Split the training set over the clients as every client will (:func:`client_partitions`)
    and raise a one-line :class:`ConfigError` when the split is impossible (e.g. a Dirichlet
    split that cannot give every client its minimum of images), so the run stops before Ray
    starts instead of every client failing in round 1."""
    try:
        client_partitions(cfg, bundle)
    except ValueError as err:
        sim = cfg["simulation"]
        raise ConfigError(f"simulation.num_clients={sim['num_clients']} with partition={sim['partition']}: {err}") from None


def attack_schedule(cfg: Mapping[str, Any]) -> AttackSchedule:
    """Who attacks in which round (``attack`` keys; absent keys take
    :class:`~abd_fl.attacks.settings.AttackSettings`' defaults, e.g. 2 malicious clients)."""
    n = int(cfg["simulation"]["num_clients"])
    try:
        return AttackSettings(**cfg["attack"]).schedule(n, int(cfg["seed"]))
    except (TypeError, ValueError) as err:  # TypeError: a key AttackSettings does not have
        raise ConfigError(f"bad attack settings: {err} (simulation.num_clients={n})") from None


def malicious_ids(cfg: Mapping[str, Any]) -> list[int]:
    """Partition ids of the malicious clients: the fixed pool (explicit ids, or a count /
    fraction sampled with the seed) or, with ``attacker_pool=per_round``, every client that
    attacks in at least one round of the run. Who attacks in a given round: :func:`attackers`."""
    return attack_schedule(cfg).ever_malicious(int(cfg["simulation"]["rounds"]))


def attackers(cfg: Mapping[str, Any], server_round: int) -> list[int]:
    """Partition ids of the clients that attack in ``server_round`` (empty outside the window)."""
    return attack_schedule(cfg).attackers(server_round)


def teacher_checkpoint_paths(cfg: Mapping[str, Any]) -> dict[int, Path]:
    """``{partition id: file}`` of the clients that send a pretrained teacher when they attack."""
    try:
        return client_checkpoint_paths(cfg["attack"].get("teacher_checkpoints"), int(cfg["simulation"]["num_clients"]))
    except CheckpointError as err:
        raise ConfigError(str(err)) from None


def with_absolute_checkpoint_paths(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``cfg`` whose teacher-checkpoint paths are absolute (taken from the current
    directory), so Ray's client processes find the same files."""
    out = dict(cfg)
    if out.get("teacher_checkpoint"):
        out["teacher_checkpoint"] = str(Path(out["teacher_checkpoint"]).expanduser().resolve())
    spec = cfg["attack"].get("teacher_checkpoints")
    if spec is not None:
        if isinstance(spec, str):
            spec = str(Path(spec).expanduser().resolve())
        elif isinstance(spec, Mapping):
            spec = {k: str(Path(str(v)).expanduser().resolve()) for k, v in spec.items()}
        out["attack"] = {**cfg["attack"], "teacher_checkpoints": spec}
    return out


def check_teacher_checkpoints(cfg: Mapping[str, Any]) -> None:
    """Open every teacher checkpoint of ``cfg`` and fit it to its model (raises
    :class:`~abd_fl.checkpoints.CheckpointError`), so a bad file stops the run before any
    client trains."""
    paths = list(teacher_checkpoint_paths(cfg).values())
    if cfg.get("teacher_checkpoint"):
        paths.append(Path(cfg["teacher_checkpoint"]))
    if not paths:
        return
    bundle = build_bundle(cfg)
    for path in paths:
        load_teacher(build_named_model(cfg, bundle, "client"), path, model_name=cfg["model"]["client"])


def build_trigger_from_config(cfg: Mapping[str, Any], bundle: DatasetBundle) -> Trigger:
    """The run's backdoor trigger for the dataset's image shape (seeded with the config seed)."""
    attack = cfg["attack"]
    return build_trigger(attack["trigger"], bundle.train.shape, seed=int(cfg["seed"]), **dict(attack.get("trigger_params") or {}))


def build_named_model(cfg: Mapping[str, Any], bundle: DatasetBundle, role: str, seed: int | None = None) -> nn.Module:
    """A fresh model for ``role`` ('client' or 'student'), initialised with ``seed`` (default: config seed)."""
    torch.manual_seed(int(cfg["seed"]) if seed is None else seed)
    return ModelSettings(**cfg["model"]).build(role, bundle.num_classes, bundle.in_channels, bundle.mean, bundle.std)


def strategy_name(cfg: Mapping[str, Any]) -> str:
    """The strategy preset's name (``strategy.name``; a file without one is named by its base)."""
    strat = cfg["strategy"]
    return str(strat.get("name") or strat["base"])


def fedgen_settings(cfg: Mapping[str, Any]) -> FedGenConfig | None:
    """FedGen's settings (``strategy.fedgen``) when the strategy is ``fedgen``, else None."""
    if strategy_name(cfg) != "fedgen":
        return None
    return FedGenConfig(**dict(cfg["strategy"].get("fedgen") or {}))


def build_feature_generator(cfg: Mapping[str, Any], bundle: DatasetBundle, settings: FedGenConfig) -> FeatureGenerator:
    """FedGen's generator for the client architecture's feature width (seeded with the config seed)."""
    feature_dim = build_named_model(cfg, bundle, "client").feature_dim
    torch.manual_seed(int(cfg["seed"]) + 17)
    return FeatureGenerator(bundle.num_classes, feature_dim, settings.noise_dim, settings.hidden_dim)


def evaluation_sets(cfg: Mapping[str, Any], bundle: DatasetBundle) -> tuple[ImageData, ImageData]:
    """(clean test set, poisoned test set): used only to report Acc/ASR, never to train or defend."""
    trigger = build_trigger_from_config(cfg, bundle)
    return bundle.test, make_poisoned_test_set(bundle.test, trigger, int(cfg["attack"]["target_label"]))


def distill_config(cfg: Mapping[str, Any]) -> DistillConfig:
    """The loop settings of the run's ``distill`` group (:class:`~abd_fl.distill.settings.DistillSettings`)."""
    return distill_settings(cfg["distill"]).loop_config(seed=int(cfg["seed"]))


def build_synthesizer_from_config(cfg: Mapping[str, Any]) -> Synthesizer:
    """A fresh synthesizer of the run's ``distill`` group."""
    return distill_settings(cfg["distill"]).build_synthesizer()


def distill_arms(cfg: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(role, defense name) of every student distilled each round; the first is the global
    model (:meth:`~abd_fl.defense.settings.DefenseSettings.arms`)."""
    return defense_settings(cfg.get("defense")).arms()


def build_defense(cfg: Mapping[str, Any], defense_name: str, seed: int) -> ABDDefense | None:
    """The defense of one distillation arm (None for ``none``)."""
    return defense_settings(cfg.get("defense")).build(defense_name, seed=seed)


@dataclass
class RunSetup:
    """What every runner (federated or centralized) derives from a config before it starts."""

    device: torch.device
    bundle: DatasetBundle
    clean_test: ImageData
    poisoned_test: ImageData
    target: int

    def metrics(self, model: nn.Module) -> dict[str, float]:
        """Acc / ASR / ASR floor of ``model`` on the evaluation sets (reporting only)."""
        return backdoor_metrics(model, self.clean_test, self.poisoned_test, self.target, self.device)


def prepare_run(cfg: Mapping[str, Any]) -> RunSetup:
    """Validate ``cfg`` (teacher checkpoints included) and build the device, dataset and evaluation sets of a run."""
    validate_config(cfg)
    check_teacher_checkpoints(cfg)
    bundle = build_bundle(cfg)
    clean_test, poisoned_test = evaluation_sets(cfg, bundle)
    return RunSetup(
        device=resolve_device(str(cfg.get("device", "auto"))),
        bundle=bundle,
        clean_test=clean_test,
        poisoned_test=poisoned_test,
        target=int(cfg["attack"]["target_label"]),
    )
