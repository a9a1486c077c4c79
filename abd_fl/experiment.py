"""Build the objects of one experiment from its resolved config (a plain nested dict).

Shared by the Flower server side (``strategies/``), the Flower client side (``clients/``)
and the centralized runner, so that every side derives the same dataset split, client
partitions, malicious set, trigger and models from the same config and seed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from abd_fl.attacks import Trigger, build_trigger, make_poisoned_test_set, poison_data
from abd_fl.attacks.schedule import AttackSchedule, scale_update, schedule_from_config
from abd_fl.checkpoints import CheckpointError, client_checkpoint_paths, load_teacher
from abd_fl.config import ConfigError, validate_config
from abd_fl.data import DatasetBundle, ImageData, load_dataset, partition_indices
from abd_fl.defense import ABDDefense
from abd_fl.defense.settings import defense_settings
from abd_fl.device import resolve_device
from abd_fl.metrics import backdoor_metrics
from abd_fl.distill import DistillConfig, FixedDataSynthesizer, Synthesizer, distill
from abd_fl.distill.settings import distill_settings
from abd_fl.distill.fedgen import FedGenConfig, FedGenRegularizer, FeatureGenerator, check_generator_state
from abd_fl.models import build_model
from abd_fl.train import ExtraLoss, train_classifier


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


def attack_schedule(cfg: Mapping[str, Any]) -> AttackSchedule:
    """Who attacks in which round (``attack`` keys; absent keys take their defaults)."""
    n = int(cfg["simulation"]["num_clients"])
    try:
        return schedule_from_config(cfg["attack"], n, int(cfg["seed"]))
    except ValueError as err:
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
    attack = cfg["attack"]
    return build_trigger(attack["trigger"], bundle.train.shape, seed=int(cfg["seed"]), **dict(attack.get("trigger_params") or {}))


def client_train_data(
    cfg: Mapping[str, Any], partition_id: int, server_round: int = 1, attacking: bool | None = None
) -> tuple[ImageData, bool]:
    """The local training set of client ``partition_id`` in ``server_round`` (poisoned when
    it attacks in that round, or when ``attacking`` forces it) and whether it attacks."""
    bundle = build_bundle(cfg)
    parts = client_partitions(cfg, bundle)
    if not 0 <= partition_id < len(parts):
        raise ConfigError(f"partition-id {partition_id} out of range [0, {len(parts) - 1}]")
    data = bundle.train.subset(parts[partition_id])
    if attacking is None:
        attacking = attack_schedule(cfg).attacks(partition_id, server_round)
    if attacking and cfg["attack"]["poison_rate"] > 0:
        data, _ = poison_data(
            data,
            build_trigger_from_config(cfg, bundle),
            float(cfg["attack"]["poison_rate"]),
            int(cfg["attack"]["target_label"]),
            seed=int(cfg["seed"]) + partition_id,
            num_classes=bundle.num_classes,
        )
    return data, attacking


@dataclass
class ClientUpdate:
    """What one client sends back after one round of local work."""

    model: nn.Module  # the weights to send (scaled when the attacker scales its update)
    data: ImageData  # the local training set of this round (poisoned when attacking)
    malicious: bool  # attacked in this round
    stats: dict[str, float]  # train loss / accuracy (of the loaded teacher on ``data`` for a checkpoint)
    from_checkpoint: bool = False


def local_training_settings(cfg: Mapping[str, Any], attacking: bool) -> tuple[int, float]:
    """(local epochs, local lr): ``attack.local_epochs`` / ``attack.local_lr`` for an
    attacking client when set, else ``simulation.local_*``."""
    sim, attack = cfg["simulation"], cfg["attack"]
    epochs, lr = int(sim["local_epochs"]), float(sim["local_lr"])
    if attacking:
        if attack.get("local_epochs") is not None:
            epochs = int(attack["local_epochs"])
        if attack.get("local_lr") is not None:
            lr = float(attack["local_lr"])
    return epochs, lr


@torch.no_grad()
def _loss_and_accuracy(model: nn.Module, data: ImageData, device: torch.device | str) -> dict[str, float]:
    model.to(device).eval()
    logits = torch.cat([model(data.images[i : i + 1024].to(device)).cpu() for i in range(0, len(data), 1024)])
    return {
        "loss": float(torch.nn.functional.cross_entropy(logits, data.labels)),
        "accuracy": float((logits.argmax(1) == data.labels).float().mean()),
    }


def train_local_model(
    cfg: Mapping[str, Any],
    partition_id: int,
    data: ImageData,
    attacking: bool,
    global_state: Mapping[str, torch.Tensor],
    device: torch.device | str = "cpu",
    extra_loss: ExtraLoss | None = None,
) -> tuple[nn.Module, dict[str, float]]:
    """Client ``partition_id``'s local training on ``data`` from ``global_state`` (the
    attacker's epochs / lr when ``attacking``; ``extra_loss`` added to every step, e.g.
    FedGen's regulariser); returns the model and its training stats."""
    model = build_named_model(cfg, build_bundle(cfg), "client")
    model.load_state_dict(global_state)
    epochs, lr = local_training_settings(cfg, attacking)
    stats = train_classifier(
        model,
        data,
        epochs=epochs,
        lr=lr,
        batch_size=int(cfg["simulation"]["local_batch_size"]),
        device=device,
        seed=int(cfg["seed"]) * 1000 + partition_id,
        extra_loss=extra_loss,
    )
    return model, stats


def client_update(
    cfg: Mapping[str, Any],
    partition_id: int,
    server_round: int,
    global_state: Mapping[str, torch.Tensor],
    device: torch.device | str = "cpu",
    regularizer: ExtraLoss | None = None,
) -> ClientUpdate:
    """One client's local work in ``server_round``, starting from ``global_state``.

    A benign client (or a malicious one outside the attack window) trains on clean data
    with ``simulation.local_*``. An attacking client trains on its poisoned data with the
    attacker's epochs / lr, or, when ``attack.teacher_checkpoints`` names it, sends the
    pretrained teacher from its file instead; either way its update is then scaled by
    ``attack.scale`` (model replacement; trainable parameters only, BatchNorm running
    statistics are sent as they are). ``regularizer`` (FedGen's, :func:`fedgen_regularizer`)
    is added to the local loss of a client that trains.
    """
    data, attacking = client_train_data(cfg, partition_id, server_round)
    checkpoint = teacher_checkpoint_paths(cfg).get(partition_id) if attacking else None
    if checkpoint is not None:
        model = build_named_model(cfg, build_bundle(cfg), "client")
        load_teacher(model, checkpoint, model_name=cfg["model"]["client"])
        stats = _loss_and_accuracy(model, data, device)
    else:
        model, stats = train_local_model(cfg, partition_id, data, attacking, global_state, device, extra_loss=regularizer)
    scale = float(cfg["attack"].get("scale", 1.0))
    if attacking and scale != 1.0:
        params = [name for name, _ in model.named_parameters()]
        reference = {k: v.detach().to("cpu") for k, v in global_state.items()}
        local = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
        model.load_state_dict(scale_update(reference, local, scale, keys=params))
    return ClientUpdate(model.eval(), data, attacking, stats, from_checkpoint=checkpoint is not None)


def build_named_model(cfg: Mapping[str, Any], bundle: DatasetBundle, role: str, seed: int | None = None) -> nn.Module:
    """A fresh model for ``role`` ('client' or 'student'), initialised with ``seed`` (default: config seed)."""
    torch.manual_seed(int(cfg["seed"]) if seed is None else seed)
    return build_model(cfg["model"][role], bundle.num_classes, bundle.in_channels, bundle.mean, bundle.std)


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


def fedgen_regularizer(
    cfg: Mapping[str, Any], generator_state: Mapping[str, torch.Tensor], server_round: int, partition_id: int
) -> FedGenRegularizer:
    """A client's FedGen regulariser from the generator state the server sent.

    Raises :class:`~abd_fl.distill.fedgen.GeneratorPayloadError` (a ValueError) when the
    state does not fit the generator this config builds (keys, shapes, dtypes, finite
    values, label distribution), or ConfigError when the strategy is not FedGen.
    """
    settings = fedgen_settings(cfg)
    if settings is None:
        raise ConfigError(f"a FedGen generator was sent, but the strategy is '{strategy_name(cfg)}', not fedgen")
    generator = build_feature_generator(cfg, build_bundle(cfg), settings)
    check_generator_state(generator, generator_state)
    generator.load_state_dict(dict(generator_state), strict=True)
    alpha, beta = settings.regularizer_weights(server_round)
    seed = (int(cfg["seed"]) * 1000 + partition_id) * 1000 + server_round
    return FedGenRegularizer(generator, alpha=alpha, beta=beta, batch_size=settings.reg_batch_size, seed=seed)


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


def clean_kd_images(cfg: Mapping[str, Any], bundle: DatasetBundle) -> torch.Tensor:
    """The clean-KD reference's inputs: a seeded ``fraction`` of the clean training images."""
    frac = float(cfg["clean_kd_reference"]["fraction"])
    g = torch.Generator().manual_seed(int(cfg["seed"]))
    n = max(1, int(round(frac * len(bundle.train))))
    return bundle.train.images[torch.randperm(len(bundle.train), generator=g)[:n]]


def distill_arms(cfg: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(role, defense name) of every student distilled each round; the first is the global
    model (:meth:`~abd_fl.defense.settings.DefenseSettings.arms`)."""
    return defense_settings(cfg.get("defense")).arms()


def build_defense(cfg: Mapping[str, Any], defense_name: str, seed: int) -> ABDDefense | None:
    """The defense of one distillation arm (None for ``none``)."""
    return defense_settings(cfg.get("defense")).build(defense_name, seed=seed)


def distill_clean_kd_reference(
    cfg: Mapping[str, Any], bundle: DatasetBundle, teachers: list[nn.Module], device: torch.device | str
) -> nn.Module:
    """The clean-KD reference (the paper's "Clean KD"): a fresh student distilled from the
    same teachers on ``clean_kd_reference.fraction`` of the clean training images, with the
    data-free student's KD loss (attention transfer included when ``distill.attention_beta``
    is set); only the inputs differ. A reference point, not a defense."""
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
            attention_beta=float(cfg["distill"].get("attention_beta", 0.0)),
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
