"""End-to-end: ``flwr run .`` completes a tiny run of this Flower App, and the test
stops every process it started.

``flwr run . --stream`` against the ``local`` connection starts a detached local
SuperLink (``flower-superlink --simulation``, in its own session) when none answers on
``127.0.0.1:$FLWR_LOCAL_SUPERLINK_HTTP_API_PORT``. The SuperLink starts a
``flower-superexec`` (also detached), which runs the app in a ``flwr-simulation``
process that starts a local Ray cluster (gcs_server, raylet, workers, agents). The
SuperLink keeps running after the run ends, so the test finds all of these by PID and
stops them, even when the test fails:

- every process of the test carries a unique marker in its environment (environments
  are inherited by all descendants, Ray's included), and the SuperLink's command line
  names this test's ``FLWR_HOME``;
- the finalizer terminates those processes and all their descendants, waits, kills
  what is left and asserts that nothing remains.

Isolation from anything else on the machine: ``FLWR_HOME`` is a tmp dir (config.toml
and the SuperLink's state, log and installed apps), the SuperLink listens on a free
port (``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT``) and ``RAY_ADDRESS`` is removed, so Ray
starts a cluster of its own. ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` makes
the SuperExec run the app in the current environment instead of building one with uv
(which would download torch).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.process_cleanup import ProcessScope, describe

REPO_ROOT = Path(__file__).resolve().parents[1]
NUM_SUPERNODES = 2
RUN_TIMEOUT_S = 300  # the whole `flwr run --stream`
CMD_TIMEOUT_S = 60  # short CLI calls (`flwr ls`)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(text: str, lines: int = 80) -> str:
    """The end of a `flwr` log, without the app's echo of the log-push HTTP requests."""
    kept = [line for line in text.splitlines() if "/v1/runtime/push-logs" not in line]
    return "\n".join(kept[-lines:])


def _flwr_executable() -> str:
    candidate = Path(sys.executable).parent / "flwr"
    if candidate.is_file():
        return str(candidate)
    found = shutil.which("flwr")
    if found is None:
        pytest.fail("the `flwr` CLI is not installed next to this Python nor on PATH")
    return found


@dataclass
class FlwrSandbox:
    """Environment and paths of one isolated local Flower deployment."""

    home: Path
    output_dir: Path
    log_path: Path
    env: dict[str, str]
    scope: ProcessScope


@pytest.fixture
def flwr_sandbox(tmp_path: Path):
    home = tmp_path / "flwr-home"
    output_dir = tmp_path / "outputs"
    home.mkdir()
    output_dir.mkdir()
    scope = ProcessScope(cmdline_contains=str(home))
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # make Ray start a cluster of its own
    env.update(
        {
            "FLWR_HOME": str(home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
            "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
            "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONUNBUFFERED": "1",
            # `flwr` spawns `flower-superlink` by name, which spawns `flower-superexec`
            "PATH": os.pathsep.join([str(Path(_flwr_executable()).parent), env.get("PATH", "")]),
        }
    )
    sandbox = FlwrSandbox(home, output_dir, tmp_path / "flwr-run.log", scope.env(base=env), scope)
    try:
        yield sandbox
    finally:
        survivors = sandbox.scope.stop()
        assert not survivors, f"processes left running after cleanup:\n{describe(survivors)}"


def _run_flwr(sandbox: FlwrSandbox, args: list[str], log_path: Path, timeout: float) -> int:
    """Run the `flwr` CLI in its own session, output to ``log_path``; kill its group on timeout."""
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(
            [_flwr_executable(), *args],
            cwd=REPO_ROOT,
            env=sandbox.env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        sandbox.scope.roots.append(proc.pid)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: pgid == pid
            proc.wait()
            tail = _tail(log_path.read_text(errors="replace"))
            pytest.fail(f"`flwr {' '.join(args[:2])}` timed out after {timeout}s; log tail:\n{tail}")


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
    assert rc == 0, f"`flwr run` exited with {rc}; log tail:\n{_tail(log)}"

    # The run was accepted, with the federation size we asked for ...
    match = re.search(r"Successfully started run (\d+)", log)
    assert match, f"no run id in the `flwr run` output:\n{_tail(log)}"
    run_id = match.group(1)
    assert f"({NUM_SUPERNODES} simulated SuperNodes)" in log, _tail(log)

    # ... and finished successfully (`flwr run --stream` exits 0 even for a failed run).
    ls_log = sandbox.log_path.with_name("flwr-ls.log")
    rc = _run_flwr(sandbox, ["ls", "--run-id", run_id, "--format", "json"], ls_log, CMD_TIMEOUT_S)
    ls_out = ls_log.read_text(errors="replace")
    assert rc == 0, f"`flwr ls` exited with {rc}:\n{ls_out}"
    runs = json.loads(ls_out[ls_out.index("{") :])["runs"]
    assert [r["status"] for r in runs] == ["finished:completed"], (
        f"run {run_id}: {runs}\n`flwr run` log tail:\n{_tail(log)}"
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
