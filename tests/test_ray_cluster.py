"""An existing Ray cluster (issue 16, item 5): ``simulation.ray_address`` sends the clients to
a Ray head the user started, instead of a local Ray instance of the run's own.

The test starts a private head on 127.0.0.1 (a free port, its own temp dir, in a
:class:`ProcessScope`), runs a tiny experiment against it, checks that the run's driver
connected to that head and that the ClientApp actors ran in its workers (their logs are in
the head's session folder), and stops the head and everything it started by pid.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.process_cleanup import ProcessScope, describe, run_simulation_cli

# 93 s on this 2-core machine with two sweeps running (a head's start-up, then a tiny run): `make test-slow`
pytestmark = pytest.mark.slow

RAY = Path(sys.executable).with_name("ray")
TINY = ["experiment=tiny", "simulation.num_clients=3", "attack.num_malicious=1", "defense=none",
        "clean_kd_reference.enabled=false", "distill.iterations=2", "progress=false"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_head(port: int, proc: subprocess.Popen, env: dict[str, str], timeout: float = 120.0) -> None:
    """Until ``ray status`` sees the head's node (its port answering is not enough: the raylet
    registers after the GCS opens its port)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "ray start --head exited before the head came up"
        status = subprocess.run([str(RAY), "status", f"--address=127.0.0.1:{port}"], env=env, capture_output=True,
                                text=True, timeout=60)
        if status.returncode == 0 and "node_" in status.stdout:
            return
        time.sleep(1.0)
    raise AssertionError(f"the Ray head on 127.0.0.1:{port} had no node within {timeout:.0f} s")


def test_clients_run_on_an_existing_ray_cluster(tmp_path: Path) -> None:
    if not RAY.is_file():
        pytest.skip(f"no ray command beside the interpreter ({RAY})")
    # Ray's socket paths live under the temp dir and must stay short: not under pytest's tmp_path
    temp_dir = Path(tempfile.mkdtemp(prefix="abdray", dir="/tmp"))
    port = _free_port()
    head = ProcessScope()
    proc = subprocess.Popen(
        [str(RAY), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         f"--temp-dir={temp_dir}", "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats"],
        env=head.env({"RAY_USAGE_STATS_ENABLED": "0"}), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    head.roots.append(proc.pid)
    try:
        _wait_for_head(port, proc, head.env({"RAY_USAGE_STATS_ENABLED": "0"}))
        run = run_simulation_cli([*TINY, f"simulation.ray_address=127.0.0.1:{port}"], tmp_path / "out")
        summary = json.loads((run / "summary.json").read_text())
        assert "dfkd_student" in summary
        logs = temp_dir / "session_latest" / "logs"
        drivers = list(logs.glob("python-core-driver-*.log"))
        assert drivers, f"no driver connected to the head (logs: {sorted(p.name for p in logs.iterdir())})"
        actor_logs = [p for p in logs.glob("worker-*") if "ClientAppActor" in p.read_text(errors="replace")]
        assert actor_logs, "no ClientApp actor ran in the head's workers"
    finally:
        survivors = head.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert survivors == [], describe(survivors)
