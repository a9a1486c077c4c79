"""``make flwr-run``: a Flower App through ``flwr run`` on a SuperLink of its own, stopped by pid.

Plain ``flwr run`` starts a detached local SuperLink that outlives the run, and the usual
advice, ``pkill -f flower-superlink``, also kills every other SuperLink on the machine. This
script instead starts ``flower-superlink --simulation`` itself (in ``$FLWR_HOME``, default
``.flwr_home/``, on free ports), points ``flwr run`` at it through a SuperLink connection in
``$FLWR_HOME/config.toml``, checks with ``flwr ls`` that the run completed, and at the end
(also on Ctrl-C or an error) stops that SuperLink by its pid and waits until it and every
process it started (SuperExec, the simulation, Ray) have exited, killing what is left after
30 s. Nothing else is touched.

    python scripts/flwr_run.py APP [--federation-config "..."] [--run-config "..."]

``flower-superlink`` and ``flwr`` must be on PATH (the Makefile puts the venv's bin first);
``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` is set, so the app runs in this environment,
and ``OMP_NUM_THREADS`` defaults to 1.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil

CONNECTION = "abd-fl"
STARTUP_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_superlink(home: Path, env: dict[str, str]) -> tuple[subprocess.Popen, int]:
    http, control = free_port(), free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "127.0.0.1:{http}"\ninsecure = true\n'
    )
    with (home / "superlink.log").open("w") as log:
        proc = subprocess.Popen(
            ["flower-superlink", "--insecure", "--simulation", "--host", "127.0.0.1", "--port", str(http),
             "--control-api-address", f"127.0.0.1:{control}"],
            env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches this script, which stops it
        )
    print(f"flwr-run: SuperLink pid {proc.pid} on 127.0.0.1:{http} (log: {home / 'superlink.log'})", flush=True)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"flwr-run: the SuperLink exited with code {proc.returncode}; see {home / 'superlink.log'}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{http}/health", timeout=1)
            return proc, http
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"flwr-run: the SuperLink did not answer within {STARTUP_TIMEOUT_S:.0f} s; see {home / 'superlink.log'}")


def stop_superlink(proc: subprocess.Popen) -> None:
    """SIGTERM the SuperLink (it stops its SuperExec, whose simulation follows its parent),
    wait for it and all its descendants, SIGKILL what is left after STOP_TIMEOUT_S."""
    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    proc.terminate()
    deadline = time.monotonic() + STOP_TIMEOUT_S
    alive = tree
    while alive and time.monotonic() < deadline:
        proc.poll()  # reap our child
        alive = [p for p in alive if _running(p)]
        time.sleep(0.2)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    print(f"flwr-run: stopped SuperLink {proc.pid}" + (f" (killed {len(alive)} stragglers)" if alive else ""), flush=True)


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("app")
    parser.add_argument("--federation-config", default="")
    parser.add_argument("--run-config", default="")
    args = parser.parse_args()

    home = Path(os.environ.get("FLWR_HOME") or ".flwr_home").resolve()
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    # one intra-op thread per process unless set: the ServerApp's distillation and the Ray
    # actors share the cores (two threads each made a 2-core machine several times slower)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("RAY_ADDRESS", None)  # the simulation starts a Ray cluster of its own

    superlink, _ = start_superlink(home, env)
    try:
        cmd = ["flwr", "run", args.app, CONNECTION, "--stream"]
        if args.federation_config:
            cmd += ["--federation-config", args.federation_config]
        if args.run_config:
            cmd += ["--run-config", args.run_config]
        run = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        run_id = None
        for line in run.stdout:  # type: ignore[union-attr]
            sys.stdout.write(line)
            if run_id is None and "Successfully started run " in line:
                run_id = line.split("Successfully started run ", 1)[1].split()[0]
        if run.wait() != 0 or run_id is None:
            print(f"flwr-run: `flwr run` failed (exit code {run.returncode})", file=sys.stderr)
            return 1
        ls = subprocess.run(["flwr", "ls", CONNECTION, "--run-id", run_id, "--format", "json"], env=env, capture_output=True, text=True)
        status = [r.get("status") for r in json.loads(ls.stdout[ls.stdout.index("{"):])["runs"]] if "{" in ls.stdout else []
        if status != ["finished:completed"]:
            print(f"flwr-run: run {run_id} did not complete: {status or ls.stdout + ls.stderr}", file=sys.stderr)
            return 1
        print(f"flwr-run: run {run_id} finished:completed", flush=True)
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        stop_superlink(superlink)


if __name__ == "__main__":
    sys.exit(main())
