"""Kill and resume (issue 15, item 4): a 3-round federated run killed by pid after round 1
and resumed with ``resume=<run dir>`` ends with the same metrics as an uninterrupted run
(same seed, CPU), with no round lost and no line duplicated in ``metrics.jsonl``."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from abd_fl.config import ConfigError, validate_config
from abd_fl.paths import compose_config
from abd_fl.results.round_checkpoint import (
    ResumeError,
    check_resumable,
    finished_rounds,
    load_round,
    save_round,
    truncate_metrics,
)
from tests.process_cleanup import ProcessScope, describe, run_simulation_cli

ROOT = Path(__file__).resolve().parents[1]
RUN = ["experiment=tiny", "strategy.mode=multi_round", "simulation.rounds=3", "defense=none",
       "clean_kd_reference.enabled=false", "seed=3"]


def _rounds(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_a_killed_run_resumes_to_the_same_result(tmp_path: Path) -> None:
    full = run_simulation_cli(RUN, tmp_path / "full")

    out = tmp_path / "killed"
    scope = ProcessScope()
    proc = subprocess.Popen([sys.executable, "-m", "abd_fl.cli", *RUN, f"output_dir={out}"], cwd=ROOT, env=scope.env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            runs = [p for p in out.glob("tiny-*") if (p / "checkpoints" / "round-1.pt").is_file()]
            if runs:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.kill()  # by pid, mid-run: SIGKILL leaves no chance to clean up
        proc.wait(timeout=30)
    finally:
        survivors = scope.stop()  # then the Ray processes it started
    assert survivors == [], describe(survivors)
    killed = runs[0]
    assert 1 <= max(finished_rounds(killed)) < 3 and not (killed / "summary.json").exists()

    resumed = run_simulation_cli([*RUN, f"resume={killed}"], out)
    assert resumed == killed.resolve()  # the same run directory, continued
    got, want = _rounds(resumed), _rounds(full)
    assert [r["round"] for r in got] == [1, 2, 3]  # no round lost, none duplicated
    for g, w in zip(got, want):
        for role in ("dfkd_student", "fedavg", "ensemble"):
            assert g[role] == w[role], (g["round"], role)
    assert json.loads((resumed / "summary.json").read_text())["dfkd_student"] == json.loads(
        (full / "summary.json").read_text())["dfkd_student"]
    for k in (0, 1, 2, 3):  # every round's global model, bit for bit
        a, b = load_round(resumed, k)["global"], load_round(full, k)["global"]
        assert all(torch.equal(a[key], b[key]) for key in a)


def test_checkpoint_files_are_replaced_whole_and_metrics_truncated_by_round(tmp_path: Path) -> None:
    save_round(tmp_path, 0, {"w": torch.zeros(2)})
    save_round(tmp_path, 1, {"w": torch.ones(2)}, {"x": 1})
    save_round(tmp_path, 1, {"w": torch.full((2,), 2.0)})
    assert finished_rounds(tmp_path) == [0, 1] and not list((tmp_path / "checkpoints").glob("*.tmp"))
    assert torch.equal(load_round(tmp_path, 1)["global"]["w"], torch.full((2,), 2.0))
    lines = [{"round": 1}, {"round": 2}, {"round": 3}, {"clean_kd_reference": {}}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert truncate_metrics(tmp_path, 2) == 2
    assert [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == lines[:2]


def test_resume_refuses_a_missing_run_another_config_and_the_centralized_runner(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^resume=.*nothing: .* is not a run directory"):
        validate_config(compose_config([f"resume={tmp_path / 'nothing'}"]))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(ConfigError, match=r"has no round checkpoints"):
        validate_config(compose_config([f"resume={run}"]))
    save_round(run, 0, {"w": torch.zeros(1)})
    with pytest.raises(ConfigError, match=r"^resume=.* continues a federated run; runner=centralized"):
        validate_config(compose_config(["experiment=central", f"resume={run}"]))
    import yaml

    cfg = compose_config([])
    (run / "config.yaml").write_text(yaml.safe_dump({**cfg, "resolved": {}}))
    check_resumable(run, {**cfg, "resume": str(run), "progress": False})  # the free keys may change
    with pytest.raises(ResumeError, match=r"differs from .*config.yaml at distill.iterations, seed;"):
        check_resumable(run, {**cfg, "seed": 5, "distill": {**cfg["distill"], "iterations": 1}})
