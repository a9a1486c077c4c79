"""The paper's own setting without Flower or Ray: one poisoned teacher, distilled into a
student by data-free KD (with and without a defense), beside clean KD on real data.

Uses the same config groups as the federated run (dataset, model, attack, distill,
defense); ``model.client`` is the teacher, ``model.student`` the student, and the teacher
is trained on the whole (poisoned) training set with ``simulation.local_*`` settings, or
loaded from ``teacher_checkpoint`` (a user's pretrained, possibly poisoned, teacher).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Mapping

import torch

from abd_fl.attacks import poison_data
from abd_fl.checkpoints import load_teacher
from abd_fl.distill import distill
from abd_fl.clean_kd_reference import distill_clean_kd_reference
from abd_fl.experiment import (
    build_bundle,
    build_defense,
    build_named_model,
    build_synthesizer_from_config,
    build_trigger_from_config,
    distill_arms,
    distill_config,
    prepare_run,
)
from abd_fl.results import RunDir, finish_run
from abd_fl.train import train_classifier

log = logging.getLogger("abd_fl")


def train_poisoned_teacher(cfg: Mapping[str, Any], device: torch.device) -> torch.nn.Module:
    """The attacker's teacher: ``model.client`` trained on the poisoned full training set."""
    bundle = build_bundle(cfg)
    attack, sim = cfg["attack"], cfg["simulation"]
    data = bundle.train
    if float(attack["poison_rate"]) > 0:
        data, _ = poison_data(
            data, build_trigger_from_config(cfg, bundle), float(attack["poison_rate"]), int(attack["target_label"]),
            seed=int(cfg["seed"]), num_classes=bundle.num_classes,
        )
    teacher = build_named_model(cfg, bundle, "client", seed=int(cfg["seed"]) + 1)
    train_classifier(
        teacher, data, epochs=int(sim["local_epochs"]), lr=float(sim["local_lr"]),
        batch_size=int(sim["local_batch_size"]), device=device, seed=int(cfg["seed"]),
    )
    return teacher.eval()


def central_teacher(cfg: Mapping[str, Any], device: torch.device) -> torch.nn.Module:
    """The teacher of the centralized run: loaded from ``teacher_checkpoint`` when set
    (same keys and shapes as ``model.client``), else trained by :func:`train_poisoned_teacher`."""
    path = cfg.get("teacher_checkpoint")
    if not path:
        return train_poisoned_teacher(cfg, device)
    teacher = build_named_model(cfg, build_bundle(cfg), "client")
    load_teacher(teacher, path, model_name=str(cfg["model"]["client"]))
    log.info("teacher loaded from %s", path)
    return teacher.to(device).eval()


def run_centralized(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run the centralized experiment; writes the same files as a federated run."""
    t_start = time.perf_counter()
    setup = prepare_run(cfg)
    device, bundle, metrics = setup.device, setup.bundle, setup.metrics
    run = RunDir.create(cfg.get("output_dir", "outputs"), str(cfg.get("name", "central")))
    teacher_source = cfg.get("teacher_checkpoint") or "trained"
    run.write_config({**cfg, "resolved": {"runner": "centralized", "device": str(device), "teacher": teacher_source}})

    teacher = central_teacher(cfg, device)
    summary: dict[str, Any] = {"malicious_teacher": metrics(teacher)}
    run.append_metrics({"role": "malicious_teacher", **summary["malicious_teacher"]})
    timings: dict[str, float] = {}
    for arm, defense_name in distill_arms(cfg):
        student = build_named_model(cfg, bundle, "student")
        dcfg = distill_config(cfg)
        result = distill(
            [teacher], student, build_synthesizer_from_config(cfg),
            defense=build_defense(cfg, defense_name, seed=dcfg.seed),
            config=dcfg, device=device, image_shape=bundle.train.shape,
        )
        summary[arm] = metrics(student)
        timings[f"{arm}_s"] = result.wall_s
        run.append_metrics({"role": arm, **summary[arm], "wall_s": result.wall_s, "defense_s": result.defense_s, "defense": result.defense_report})
        log.info("%s: acc %.3f asr %.3f (floor %.3f)", arm, summary[arm]["acc"], summary[arm]["asr"], summary[arm]["asr_floor"])
    ref = cfg.get("clean_kd_reference") or {}
    if ref.get("enabled", False):
        student = distill_clean_kd_reference(cfg, bundle, [teacher], device)
        summary["clean_kd_reference"] = metrics(student)
        run.append_metrics({"role": "clean_kd_reference", **summary["clean_kd_reference"]})
    summary["timings"] = timings
    summary["wall_s"] = time.perf_counter() - t_start
    finish_run(run, summary, title=f"abd-fl centralized: {cfg.get('name')} ({run.path})")
    return summary
