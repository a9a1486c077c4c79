"""``abd-fl runner=train_teachers``: train poisoned teachers for the configured attack and
save them, for later runs to load (``teacher_checkpoint`` / ``attack.teacher_checkpoints``).

``teachers.which`` picks what is trained (both by default):

- ``central``: the centralized runner's teacher (``model.client`` on the whole training
  set, ``attack.poison_rate`` of it poisoned) -> ``central.<format>``;
- ``clients``: every malicious client's teacher, trained exactly as that client trains in
  an attacking round from the initial global model (its poisoned partition, the
  attacker's epochs / lr; no scaling) -> ``client_<partition id>.<format>``.

Files go to ``teachers.out`` (default: the run directory), with ``teachers.json`` holding
each teacher's file, Acc, ASR and ASR floor on the test split, and the attack settings.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from abd_fl.centralized import train_poisoned_teacher
from abd_fl.checkpoints import save_state_dict
from abd_fl.experiment import build_named_model, malicious_ids, prepare_run
from abd_fl.local_update import client_train_data, train_local_model
from abd_fl.results import RunDir

log = logging.getLogger("abd_fl")


def run_train_teachers(cfg: dict[str, Any]) -> dict[str, Any]:
    """Train and save the teachers; returns the ``teachers.json`` content."""
    t_start = time.perf_counter()
    setup = prepare_run(cfg)
    device, bundle = setup.device, setup.bundle
    opts = cfg.get("teachers") or {}
    which, fmt = str(opts.get("which", "both")), str(opts.get("format", "pt"))
    run = RunDir.create(cfg.get("output_dir", "outputs"), f"{cfg.get('name', 'run')}-teachers")
    out = Path(opts["out"]) if opts.get("out") else run.path
    out.mkdir(parents=True, exist_ok=True)
    ids = malicious_ids(cfg) if which in ("clients", "both") else []
    run.write_config({**cfg, "resolved": {"runner": "train_teachers", "device": str(device), "malicious_ids": ids, "out": str(out)}})

    attack = cfg["attack"]
    report: dict[str, Any] = {
        "dataset": cfg["dataset"]["name"],
        "model": cfg["model"]["client"],
        "trigger": attack["trigger"],
        "trigger_params": dict(attack.get("trigger_params") or {}),
        "poison_rate": attack["poison_rate"],
        "target_label": attack["target_label"],
        "seed": cfg["seed"],
        "teachers": {},
    }

    def record(name: str, model, partition_id: int | None, num_examples: int) -> None:
        path = save_state_dict(model, out / f"{name}.{fmt}")
        report["teachers"][name] = {"file": path.name, "partition_id": partition_id, "num_examples": num_examples, **setup.metrics(model)}
        m = report["teachers"][name]
        log.info("%s: acc %.3f asr %.3f (floor %.3f) -> %s", name, m["acc"], m["asr"], m["asr_floor"], path)

    if which in ("central", "both"):
        record("central", train_poisoned_teacher(cfg, device), None, len(bundle.train))
    initial = build_named_model(cfg, bundle, "client").state_dict()  # what the server sends first
    for pid in ids:
        data, _ = client_train_data(cfg, pid, attacking=True)
        model, _ = train_local_model(cfg, pid, data, True, initial, device)
        record(f"client_{pid}", model.eval(), pid, len(data))
    report["wall_s"] = time.perf_counter() - t_start
    RunDir(out).write_json("teachers.json", report)
    if out.resolve() != run.path.resolve():
        run.write_json("teachers.json", report)
    log.info(
        "teachers in %s; use them with: runner=centralized teacher_checkpoint=%s | attack.teacher_checkpoints=%s",
        out, (out / f"central.{fmt}").resolve(), out.resolve(),
    )
    return report
