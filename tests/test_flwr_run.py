"""End-to-end: ``flwr run .`` completes a tiny run of this Flower App, and the test
stops every process it started (the local SuperLink that ``flwr run`` launches, its
SuperExec, the simulation and Ray), by pid, even when the test fails: the sandbox of
:func:`tests.process_cleanup.make_flwr_sandbox` (its own ``FLWR_HOME``, free ports, its own
Ray cluster, the venv's bin on PATH, no runtime dependency installation).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from tests.process_cleanup import FlwrSandbox, describe, flwr_log_tail, make_flwr_sandbox

REPO_ROOT = Path(__file__).resolve().parents[1]
NUM_SUPERNODES = 2
RUN_TIMEOUT_S = 300  # the whole `flwr run --stream`
CMD_TIMEOUT_S = 60  # short CLI calls (`flwr ls`)


@pytest.fixture
def flwr_sandbox(tmp_path: Path):
    with make_flwr_sandbox(tmp_path) as sandbox:
        yield sandbox


def _run_flwr(sandbox: FlwrSandbox, args: list[str], log_path: Path, timeout: float) -> int:
    return sandbox.run_flwr(args, log_path, timeout, cwd=REPO_ROOT)


def test_flwr_run_completes_tiny_experiment(flwr_sandbox: FlwrSandbox):
    sandbox = flwr_sandbox
    overrides = " ".join(
        [
            "experiment=tiny",
            f"simulation.num_clients={NUM_SUPERNODES}",
            "attack.num_malicious=1",
            f"output_dir={sandbox.output_dir}",  # absolute: the ServerApp's cwd is the SuperExec's
            "clean_kd_reference.enabled=true",
        ]
    )
    assert "'" not in overrides  # a TOML literal string ('...') cannot hold a single quote
    t0 = time.monotonic()
    rc = _run_flwr(
        sandbox,
        [
            "run",
            str(REPO_ROOT),
            "--stream",
            # one Ray CPU per simulated SuperNode, so it also schedules on 1-CPU runners
            "--federation-config",
            f"num-supernodes={NUM_SUPERNODES} client-resources-num-cpus=1",
            "--run-config",
            f"overrides='{overrides}'",
        ],
        sandbox.log_path,
        RUN_TIMEOUT_S,
    )
    elapsed = time.monotonic() - t0
    log = sandbox.log_path.read_text(errors="replace")
    print(f"\n`flwr run` took {elapsed:.1f}s (log: {sandbox.log_path})")
    assert rc == 0, f"`flwr run` exited with {rc}; log tail:\n{flwr_log_tail(log)}"

    # The run was accepted, with the federation size we asked for ...
    match = re.search(r"Successfully started run (\d+)", log)
    assert match, f"no run id in the `flwr run` output:\n{flwr_log_tail(log)}"
    run_id = match.group(1)
    assert f"({NUM_SUPERNODES} simulated SuperNodes)" in log, flwr_log_tail(log)

    # ... and finished successfully (`flwr run --stream` exits 0 even for a failed run).
    ls_log = sandbox.log_path.with_name("flwr-ls.log")
    rc = _run_flwr(sandbox, ["ls", "--run-id", run_id, "--format", "json"], ls_log, CMD_TIMEOUT_S)
    ls_out = ls_log.read_text(errors="replace")
    assert rc == 0, f"`flwr ls` exited with {rc}:\n{ls_out}"
    runs = json.loads(ls_out[ls_out.index("{") :])["runs"]
    assert [r["status"] for r in runs] == ["finished:completed"], (
        f"run {run_id}: {runs}\n`flwr run` log tail:\n{flwr_log_tail(log)}"
    )

    # The ServerApp wrote its run directory.
    latest = sandbox.output_dir / "latest"
    assert latest.is_symlink() and latest.resolve().parent == sandbox.output_dir.resolve(), (
        f"{latest} missing; output_dir holds {sorted(p.name for p in sandbox.output_dir.iterdir())}"
    )
    summary = json.loads((latest / "summary.json").read_text())
    assert isinstance(summary.get("dfkd_student"), dict), summary
    for key in ("acc", "asr", "asr_floor"):
        assert isinstance(summary["dfkd_student"].get(key), (int, float)), (key, summary)
    assert isinstance(summary.get("wall_s"), (int, float)) and summary["wall_s"] > 0, summary
    assert "clean_kd_reference" in summary, summary
    records = [json.loads(line) for line in (latest / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert any(r.get("round") == 1 for r in records), records

    # The local SuperLink outlives the run: it is ours, and stopping it stops everything.
    ours = sandbox.scope.processes()
    names = " ".join(" ".join(p.cmdline()) for p in ours)
    assert "flower-superlink" in names and str(sandbox.home) in names, describe(ours)
    survivors = sandbox.scope.stop()
    assert not survivors, f"processes left running after cleanup:\n{describe(survivors)}"
