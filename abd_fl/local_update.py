"""One client's local work in a round, framework-agnostic: its training set (poisoned when it
attacks), its local training (the attacker's epochs / lr, FedGen's regulariser when sent),
a pretrained teacher instead when the attack names one, and model replacement's scaling.

The Flower ClientApp (``clients/client_app.py``) and the teacher pre-training
(:mod:`abd_fl.teachers`) call these; the objects come from the run's config through
:mod:`abd_fl.experiment`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from abd_fl.attacks import poison_data
from abd_fl.attacks.schedule import scale_update
from abd_fl.checkpoints import load_teacher
from abd_fl.config import ConfigError
from abd_fl.data import ImageData
from abd_fl.distill.fedgen import FedGenRegularizer, check_generator_state
from abd_fl.experiment import (
    attack_schedule,
    build_bundle,
    build_feature_generator,
    build_named_model,
    build_trigger_from_config,
    client_partitions,
    fedgen_settings,
    strategy_name,
    teacher_checkpoint_paths,
)
from abd_fl.train import ExtraLoss, train_classifier


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
