"""Build the objects of one experiment from its resolved config (a plain nested dict).

Shared by the Flower server side (``strategies/``), the Flower client side (``clients/``)
and the centralized runner, so that every side derives the same dataset split, client
partitions, malicious set, trigger and models from the same config and seed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from abd_fl.attacks import Trigger, build_trigger, make_poisoned_test_set, poison_data
from abd_fl.config import ConfigError, validate_config
from abd_fl.data import DatasetBundle, ImageData, load_dataset, partition_indices
from abd_fl.defense import ABDDefense, abd_config_for
from abd_fl.device import resolve_device
from abd_fl.metrics import backdoor_metrics
from abd_fl.distill import DistillConfig, FixedDataSynthesizer, Synthesizer, build_synthesizer, distill
from abd_fl.models import build_model


@functools.lru_cache(maxsize=4)
def _bundle_cached(name: str, root: str | None, image_size: int | None, seed: int) -> DatasetBundle:
    return load_dataset(name, root=root, image_size=image_size, seed=seed)


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


def malicious_ids(cfg: Mapping[str, Any]) -> list[int]:
    """Partition ids of the malicious clients: explicit ids, or ``num_malicious`` sampled with the seed."""
    attack, n = cfg["attack"], int(cfg["simulation"]["num_clients"])
    if attack.get("malicious_ids") is not None:
        return sorted(int(i) for i in attack["malicious_ids"])
    count = int(attack["num_malicious"])
    if count > n:
        raise ConfigError(f"attack.num_malicious={count} is more than simulation.num_clients={n}")
    rng = np.random.default_rng(int(cfg["seed"]) + 7919)
    return sorted(int(i) for i in rng.choice(n, size=count, replace=False))


def build_trigger_from_config(cfg: Mapping[str, Any], bundle: DatasetBundle) -> Trigger:
    attack = cfg["attack"]
    return build_trigger(attack["trigger"], bundle.train.shape, seed=int(cfg["seed"]), **dict(attack.get("trigger_params") or {}))


def client_train_data(cfg: Mapping[str, Any], partition_id: int) -> tuple[ImageData, bool]:
    """The local training set of client ``partition_id`` (poisoned if it is malicious)."""
    bundle = build_bundle(cfg)
    parts = client_partitions(cfg, bundle)
    if not 0 <= partition_id < len(parts):
        raise ConfigError(f"partition-id {partition_id} out of range [0, {len(parts) - 1}]")
    data = bundle.train.subset(parts[partition_id])
    is_malicious = partition_id in malicious_ids(cfg)
    if is_malicious and cfg["attack"]["poison_rate"] > 0:
        data, _ = poison_data(
            data,
            build_trigger_from_config(cfg, bundle),
            float(cfg["attack"]["poison_rate"]),
            int(cfg["attack"]["target_label"]),
            seed=int(cfg["seed"]) + partition_id,
            num_classes=bundle.num_classes,
        )
    return data, is_malicious


def build_named_model(cfg: Mapping[str, Any], bundle: DatasetBundle, role: str, seed: int | None = None) -> nn.Module:
    """A fresh model for ``role`` ('client' or 'student'), initialised with ``seed`` (default: config seed)."""
    torch.manual_seed(int(cfg["seed"]) if seed is None else seed)
    return build_model(cfg["model"][role], bundle.num_classes, bundle.in_channels, bundle.mean, bundle.std)


def evaluation_sets(cfg: Mapping[str, Any], bundle: DatasetBundle) -> tuple[ImageData, ImageData]:
    """(clean test set, poisoned test set): used only to report Acc/ASR, never to train or defend."""
    trigger = build_trigger_from_config(cfg, bundle)
    return bundle.test, make_poisoned_test_set(bundle.test, trigger, int(cfg["attack"]["target_label"]))


def distill_config(cfg: Mapping[str, Any]) -> DistillConfig:
    d = cfg["distill"]
    return DistillConfig(
        iterations=int(d["iterations"]),
        student_steps=int(d["student_steps"]),
        batch_size=int(d["batch_size"]),
        lr=float(d["lr"]),
        temperature=float(d["temperature"]),
        seed=int(cfg["seed"]),
    )


def build_synthesizer_from_config(cfg: Mapping[str, Any]) -> Synthesizer:
    d = cfg["distill"]
    return build_synthesizer(d["synthesizer"], **dict(d.get("synthesizer_params") or {}))


def clean_kd_images(cfg: Mapping[str, Any], bundle: DatasetBundle) -> torch.Tensor:
    """The clean-KD reference's inputs: a seeded ``fraction`` of the clean training images."""
    frac = float(cfg["clean_kd_reference"]["fraction"])
    g = torch.Generator().manual_seed(int(cfg["seed"]))
    n = max(1, int(round(frac * len(bundle.train))))
    return bundle.train.images[torch.randperm(len(bundle.train), generator=g)[:n]]


def distill_arms(cfg: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(role, defense name) of every student distilled each round; the first is the global model.

    ``defense=abd`` gives ``abd_student`` (global) and, with ``compare_baseline``, the
    undefended ``dfkd_student`` from the same teachers and start; ``ablation`` adds
    ``sv_student`` and ``sr_student``.
    """
    d = cfg.get("defense") or {"name": "none"}
    name = d["name"]
    if name == "none":
        return [("dfkd_student", "none")]
    arms = [(f"{name}_student", name)]
    if d.get("ablation", False):
        arms += [(f"{v}_student", v) for v in ("sv", "sr") if v != name]
    if d.get("compare_baseline", True):
        arms.append(("dfkd_student", "none"))
    return arms


def build_defense(cfg: Mapping[str, Any], defense_name: str, seed: int) -> ABDDefense | None:
    """The defense of one distillation arm (None for ``none``)."""
    params = dict((cfg.get("defense") or {}).get("params") or {})
    params["sr_config"] = dict(params.get("sr_config") or {})
    abd_cfg = abd_config_for(defense_name, seed=seed, **params)
    return None if abd_cfg is None else ABDDefense(abd_cfg)


def distill_clean_kd_reference(
    cfg: Mapping[str, Any], bundle: DatasetBundle, teachers: list[nn.Module], device: torch.device | str
) -> nn.Module:
    """The clean-KD reference (the paper's "Clean KD"): a fresh student distilled from the
    same teachers on ``clean_kd_reference.fraction`` of the clean training images, with the
    data-free student's KD loss; only the inputs differ. A reference point, not a defense."""
    ref = cfg["clean_kd_reference"]
    student = build_named_model(cfg, bundle, "student")
    distill(
        teachers,
        student,
        FixedDataSynthesizer(clean_kd_images(cfg, bundle)),
        config=DistillConfig(
            iterations=int(ref["iterations"]),
            student_steps=int(ref["student_steps"]),
            batch_size=int(cfg["distill"]["batch_size"]),
            lr=float(cfg["distill"]["lr"]),
            temperature=float(ref["temperature"]),
            seed=int(cfg["seed"]),
        ),
        device=device,
    )
    return student


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
    """Validate ``cfg`` and build the device, dataset and evaluation sets of a run."""
    validate_config(cfg)
    bundle = build_bundle(cfg)
    clean_test, poisoned_test = evaluation_sets(cfg, bundle)
    return RunSetup(
        device=resolve_device(str(cfg.get("device", "auto"))),
        bundle=bundle,
        clean_test=clean_test,
        poisoned_test=poisoned_test,
        target=int(cfg["attack"]["target_label"]),
    )
