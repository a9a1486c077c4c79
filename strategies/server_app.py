"""The Flower ServerApp: builds the data-free-KD strategy from the experiment config,
runs the rounds, evaluates on the server, and writes the run's files as it goes.

Two ways in, one code path:
- ``abd-fl`` (Hydra CLI, :mod:`abd_fl.cli`) builds ``build_server_app(cfg)`` with the
  composed config and runs it in Flower's simulation engine (Ray backend);
- ``flwr run .`` loads the module-level ``app``, which composes the same Hydra config from
  the run config: ``overrides`` (space-separated Hydra overrides) and
  ``num-server-rounds`` (-> ``simulation.rounds``).
"""

from __future__ import annotations

import json
import logging
import resource
import shlex
import time
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from abd_fl.data import DatasetBundle
from abd_fl.distill import DistillResult, distill
from abd_fl.evaluation import evaluate_round
from abd_fl.clean_kd_reference import distill_clean_kd_reference
from abd_fl.experiment import (
    attack_schedule,
    build_feature_generator,
    build_named_model,
    distill_arms,
    fedgen_settings,
    check_partitions,
    malicious_ids,
    prepare_run,
    strategy_name,
)
from abd_fl.defense import suspicion_auc
from abd_fl.defense.settings import DefenseSettings, defense_settings
from abd_fl.distill.ensemble import DEFAULT_ENSEMBLE
from abd_fl.distill.fedgen import FedGenConfig
from abd_fl.distill.settings import DistillSettings, distill_settings
from abd_fl.paths import compose_config
from abd_fl.results import RunDir, finish_run
from abd_fl.results.round_checkpoint import (
    check_resumable,
    finished_rounds,
    load_round,
    resolve_resume,
    save_round,
    truncate_metrics,
)
from abd_fl.settings.strategy import UpdateCheckSettings
from strategies.datafree_kd import DataFreeKD, DistillFn, RoundOutcome, load_arrays, make_base_strategy
from strategies.fedgen import FedGenExtension

log = logging.getLogger("abd_fl")
CONFIG_KEY = "abd-config"
TEACHER_ROLES = ("malicious_teacher", "benign_teachers", "ensemble", "fedavg")


def server_memory_mb(device: torch.device | str) -> dict[str, float]:
    """The server process's peak resident memory so far (MB; on Linux ``ru_maxrss`` is in KB),
    and on CUDA the peak memory torch allocated on the device: the figures of the scaling
    plot (issue 16, ``benchmarks/scale_clients.py``)."""
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.device(device).type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def config_from_run_config(run_config: dict[str, Any]) -> dict[str, Any]:
    """Map ``flwr run`` run-config keys onto the Hydra config."""
    overrides = shlex.split(str(run_config.get("overrides", "") or ""))
    if "num-server-rounds" in run_config and not any(o.startswith("simulation.rounds=") for o in overrides):
        overrides.append(f"simulation.rounds={int(run_config['num-server-rounds'])}")
    return compose_config(overrides)


def _progress_bar(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    import sys

    from tqdm.auto import tqdm

    # in a log file (not a terminal) a bar line every 30 s, not one per iteration
    return tqdm(total=total, desc=desc, leave=False, mininterval=0.1 if sys.stderr.isatty() else 30.0)


def _configure_logging() -> None:
    """Give the ``abd_fl`` logger its own handler (never the root logger: Flower and httpx log there)."""
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s abd_fl: %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.INFO)


def detection_report(distill_results: dict[str, DistillResult], malicious: list[bool | None]) -> dict[str, dict[str, Any]]:
    """Per arm, the defense's per-teacher suspicion scores and their AUC against the
    clients' ``malicious`` flags. The AUCs are None when some reply did not carry its flag
    (a stock ClientApp): detection cannot be scored without the ground truth."""
    known = None not in malicious

    def auc(scores: list[float]) -> float | None:
        return suspicion_auc(scores, malicious) if known else None

    detection: dict[str, dict[str, Any]] = {}
    for arm, result in distill_results.items():
        teachers_report = result.defense_report.get("teachers") or []
        # every teacher scored on D_s: by its vaccine search, or (search=off) its unverified vaccine
        if teachers_report and all(t.get("tail_ratio") is not None for t in teachers_report):
            ratios = [t["tail_ratio"] for t in teachers_report]
            shares = [t.get("tail_class_share") or 0.0 for t in teachers_report]  # None: an empty tail
            detection[arm] = {
                "tail_ratio": ratios,
                "mean_score": [t["mean_score"] for t in teachers_report],
                "tail_class_share": shares,
                "vaccine_found": [t["found"] for t in teachers_report],
                "verified": [t.get("verified", True) for t in teachers_report],
                "auc_tail_ratio": auc(ratios),
                "auc_neg_mean_score": auc([-t["mean_score"] for t in teachers_report]),
                "auc_tail_class_share": auc(shares),
            }
        flips = [t.get("trigger_flip") for t in teachers_report]
        if teachers_report and all(f is not None for f in flips):  # defense=abd_ti: the student trigger's flip rate per teacher
            detection.setdefault(arm, {}).update({"trigger_flip": flips, "auc_trigger_flip": auc(flips)})
    return detection


def build_distill_fn(cfg: dict[str, Any], bundle: DatasetBundle, device: torch.device | str) -> DistillFn:
    """The ServerApp's ``distill_fn(arm, teachers, student, round)``: the data-free KD of
    ``cfg``'s distill group with the arm's defense (``distill.iterations=0`` leaves the
    student as it starts: in multi_round mode, the base aggregate)."""
    return distill_fn_for_shape(cfg, bundle.train.shape, device)


def distill_fn_for_shape(cfg: dict[str, Any], image_shape: tuple[int, int, int], device: torch.device | str) -> DistillFn:
    """:func:`make_distill_fn` with the typed groups of ``cfg`` (which needs only ``seed``,
    ``progress``, ``strategy``, ``distill`` and ``defense``), for images of ``image_shape``."""
    return make_distill_fn(
        distill_settings(cfg["distill"]),
        defense_settings(cfg.get("defense")),
        image_shape,
        device,
        seed=int(cfg["seed"]),
        progress=bool(cfg.get("progress", True)),
        fedgen=fedgen_settings(cfg),
    )


def make_distill_fn(
    distill_cfg: DistillSettings,
    defense_cfg: DefenseSettings,
    image_shape: tuple[int, int, int],
    device: torch.device | str,
    *,
    seed: int = 0,
    progress: bool = False,
    fedgen: FedGenConfig | None = None,
) -> DistillFn:
    """``distill_fn(arm, teachers, student, round)`` for :class:`DataFreeKD`: the data-free KD
    of ``distill_cfg`` (Algorithm 1's loop, :func:`abd_fl.distill.distill`) with each arm's
    defense from ``defense_cfg`` (:meth:`DefenseSettings.arms`), on images of ``image_shape``
    (C, H, W), seeded per round (``seed * 100 + round``). ``fedgen``: FedGen's settings when
    the strategy is FedGen (an undefended arm keeps the FedAvg aggregate)."""
    arm_defense = dict(defense_cfg.arms())

    def distill_fn(arm: str, teachers, student, server_round: int) -> DistillResult:
        round_seed = int(seed) * 100 + server_round
        dcfg = distill_cfg.loop_config(seed=round_seed)
        if fedgen is not None:
            # FedGen: the global model is the FedAvg aggregate (the student starts from it in
            # multi_round mode); only a defended arm repairs it by a data-free distillation
            # with its defense attached (abd_fl/distill/fedgen.py, README design notes).
            if arm_defense[arm] == "none":
                return DistillResult(wall_s=0.0, defense_s=0.0, defense_report={"fedgen": "FedAvg aggregate, not distilled"})
            if fedgen.defense_iterations is not None:
                dcfg.iterations = fedgen.defense_iterations
        bar = _progress_bar(progress, dcfg.iterations, f"round {server_round} {arm}")
        try:
            return distill(
                teachers,
                student,
                distill_cfg.build_synthesizer(),
                defense=defense_cfg.build(arm_defense[arm], seed=round_seed),
                config=dcfg,
                device=device,
                image_shape=image_shape,
                progress=(lambda it, logs: bar.update(1)) if bar else None,
            )
        finally:
            if bar:
                bar.close()

    return distill_fn


def run_server(grid: Grid, cfg: dict[str, Any]) -> dict[str, Any]:
    """Run the whole federated experiment on ``grid``; returns the summary."""
    _configure_logging()
    t_start = time.perf_counter()
    setup = prepare_run(cfg)
    check_partitions(cfg, setup.bundle)  # also for `flwr run`, which does not pass through abd-fl's checks
    device, bundle = setup.device, setup.bundle
    clean_test, poisoned_test, target = setup.clean_test, setup.poisoned_test, setup.target
    sim = cfg["simulation"]
    mal_ids = malicious_ids(cfg)
    schedule = attack_schedule(cfg).by_round(int(sim["rounds"]))
    resume = cfg.get("resume")
    if resume:
        run = RunDir(resolve_resume(str(resume), cfg.get("output_dir", "outputs")))
        check_resumable(run.path, cfg)
        run.mark_latest()
        log.info("resuming %s (malicious clients: %s; attackers by round: %s)", run.path, mal_ids, schedule)
    else:
        run = RunDir.create(cfg.get("output_dir", "outputs"), str(cfg.get("name", "run")))
        run.write_config({**cfg, "resolved": {"malicious_ids": mal_ids, "attackers_by_round": schedule, "device": str(device)}})
        log.info("run directory: %s (malicious clients: %s; attackers by round: %s)", run.path, mal_ids, schedule)
    arms = distill_arms(cfg)
    fedgen = fedgen_settings(cfg)

    def client_model():
        return build_named_model(cfg, bundle, "client")

    def student_model():
        return build_named_model(cfg, bundle, "student")

    distill_fn = build_distill_fn(cfg, bundle, device)

    state: dict[str, Any] = {}

    def on_round(outcome: RoundOutcome) -> None:
        t0 = time.perf_counter()
        metrics = evaluate_round(
            outcome.teachers,
            [i["malicious"] for i in outcome.teacher_info],
            outcome.aggregated,
            outcome.students,
            clean_test,
            poisoned_test,
            target,
            device,
            ensemble_rule=str(cfg["distill"].get("ensemble", DEFAULT_ENSEMBLE)),
            ensemble_trim=float(cfg["distill"].get("ensemble_trim", 0.2)),
            every_rule=bool(cfg["distill"].get("ensemble_report", False)),
        )
        timings = {**outcome.timings, "evaluate_s": time.perf_counter() - t0}
        malicious = [i["malicious"] for i in outcome.teacher_info]
        detection = detection_report(outcome.distill_results, malicious)
        record = {
            "round": outcome.server_round,
            **metrics,
            "teacher_info": outcome.teacher_info,
            # None when some reply did not say whether it attacked (a stock ClientApp)
            "attackers": None if None in malicious else [i["partition_id"] for i in outcome.teacher_info if i["malicious"]],
            "detection": detection,
            "rejected": [{"node_id": n, "reason": r} for n, r in outcome.rejected],
            # strategy.teachers=selected: valid replies the base's selection (Krum, MultiKrum, Bulyan) left out of KD
            "teachers_excluded": outcome.excluded,
            "update_flags": [f.record() for f in outcome.update_flags],
            "distill": {
                arm: {"wall_s": r.wall_s, "defense_s": r.defense_s, "defense": r.defense_report, "history": r.history}
                for arm, r in outcome.distill_results.items()
            },
            "timings": timings,
            "server_memory": server_memory_mb(device),
        }
        if extension is not None:
            record[extension.name] = outcome.extension  # e.g. FedGen's generator training
        run.append_metrics(record)
        # the round is finished: what the next one needs, atomically (resume=<run dir>)
        save_round(run.path, outcome.server_round, outcome.students[arms[0][0]].state_dict(),
                   extension.state_dict() if extension is not None else None)
        state.update(teachers=outcome.teachers, metrics=metrics)
        for arm, _ in arms:
            m = metrics[arm]
            log.info("round %d: %s acc %.3f asr %.3f (floor %.3f)", outcome.server_round, arm, m["acc"], m["asr"], m["asr_floor"])

    base = make_base_strategy(
        cfg["strategy"]["base"], cfg["strategy"].get("base_params"), int(sim["num_clients"]), float(cfg["strategy"]["fraction_train"])
    )
    extension = None
    if fedgen is not None:
        extension = FedGenExtension(build_feature_generator(cfg, bundle, fedgen), fedgen, device=device, seed=int(cfg["seed"]))
    log.info("strategy: %s (mode %s, base %s)", strategy_name(cfg), cfg["strategy"]["mode"], cfg["strategy"]["base"])
    total_rounds = int(sim["rounds"])
    initial = student_model().state_dict()
    first_round = 1
    if resume:
        done = max(finished_rounds(run.path))
        summary_path = run.path / "summary.json"
        if done >= total_rounds and summary_path.is_file():
            log.info("resume: %s finished all %d rounds already; nothing to run", run.path, total_rounds)
            return json.loads(summary_path.read_text())
        # a run killed after its last round's checkpoint but before its summary reruns that round
        start = min(done, total_rounds - 1)
        checkpoint = load_round(run.path, start)
        initial = checkpoint["global"]
        if extension is not None and checkpoint.get("extension") is not None:
            extension.load_state_dict(checkpoint["extension"])
        kept = truncate_metrics(run.path, start)
        first_round = start + 1
        log.info("resume: from round %d's checkpoint, rounds %d-%d to run (%d metrics lines kept)",
                 start, first_round, total_rounds, kept)
    else:
        save_round(run.path, 0, initial, extension.state_dict() if extension is not None else None)
    strategy = DataFreeKD(
        base,
        client_model,
        student_model,
        distill_fn,
        arms=tuple(arm for arm, _ in arms),
        mode=cfg["strategy"]["mode"],
        on_round=on_round,
        extension=extension,
        teachers=str(cfg["strategy"].get("teachers", "all")),
        update_check=UpdateCheckSettings(**(cfg["strategy"].get("update_check") or {})),
        first_round=first_round,
    )

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = load_arrays(student_model(), arrays)
        return MetricRecord(setup.metrics(model))

    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(initial),
        num_rounds=total_rounds - first_round + 1,
        train_config=ConfigRecord({CONFIG_KEY: json.dumps(cfg)}),
        evaluate_fn=evaluate_fn,
    )

    roles = TEACHER_ROLES + tuple(arm for arm, _ in arms)
    summary: dict[str, Any] = {k: state["metrics"][k] for k in roles + ("ensembles",) if k in state.get("metrics", {})}
    ref = cfg.get("clean_kd_reference") or {}
    if ref.get("enabled", False) and state.get("teachers"):
        reference = distill_clean_kd_reference(cfg, bundle, state["teachers"], device)
        summary["clean_kd_reference"] = setup.metrics(reference)
        run.append_metrics({"clean_kd_reference": summary["clean_kd_reference"]})
    summary["wall_s"] = time.perf_counter() - t_start
    finish_run(run, summary, title=f"abd-fl: {cfg.get('name')} ({run.path})")
    return summary


def build_server_app(cfg: dict[str, Any] | None = None) -> ServerApp:
    """A ServerApp running ``cfg`` (or, when None, the config composed from the run config)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        resolved = cfg if cfg is not None else config_from_run_config(dict(context.run_config))
        run_server(grid, resolved)

    return server_app


app = build_server_app()
