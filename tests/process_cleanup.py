"""Stop every process a test started, by pid.

Each test run gets a unique marker in its environment; environments are inherited by all
descendants (Ray's gcs_server/raylet/workers, Flower's detached SuperLink and SuperExec),
so the marker finds them even after they were reparented. Optional extra roots (pids the
test spawned) and a command-line substring (e.g. a test's FLWR_HOME) widen the search.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field

import psutil

MARKER_VAR = "ABD_FL_TEST_MARKER"
TERM_GRACE_S = 10.0


@dataclass
class ProcessScope:
    """What identifies the processes of one test."""

    marker: str = field(default_factory=lambda: uuid.uuid4().hex)
    roots: list[int] = field(default_factory=list)
    cmdline_contains: str | None = None

    def env(self, extra: dict[str, str] | None = None, base: dict[str, str] | None = None) -> dict[str, str]:
        """An environment for subprocesses that carries this scope's marker."""
        return {**(os.environ if base is None else base), **(extra or {}), MARKER_VAR: self.marker}

    def _owns(self, proc: psutil.Process) -> bool:
        try:
            if proc.environ().get(MARKER_VAR) == self.marker:
                return True
        except (psutil.Error, OSError):
            pass
        if self.cmdline_contains:
            try:
                return any(self.cmdline_contains in arg for arg in proc.cmdline())
            except (psutil.Error, OSError):
                return False
        return False

    def processes(self) -> list[psutil.Process]:
        """Live processes of this scope, with all their descendants."""
        me = os.getpid()
        seeds = []
        for pid in self.roots:
            try:
                seeds.append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                pass
        seeds += [p for p in psutil.process_iter() if p.pid != me and self._owns(p)]
        found: dict[int, psutil.Process] = {}
        for proc in seeds:
            found[proc.pid] = proc
            try:
                found.update({c.pid: c for c in proc.children(recursive=True)})
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                pass
        alive = []
        for pid, proc in found.items():
            try:
                if pid != me and proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                pass
        return alive

    def stop(self) -> list[psutil.Process]:
        """SIGTERM every process of the scope, then SIGKILL stragglers; returns survivors."""
        for _attempt in range(3):  # a dying parent may still spawn or reparent children
            procs = self.processes()
            if not procs:
                return []
            for proc in procs:
                try:
                    proc.terminate()
                except psutil.NoSuchProcess:
                    pass
            _, alive = psutil.wait_procs(procs, timeout=TERM_GRACE_S)
            for proc in alive:
                try:
                    proc.kill()
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(alive, timeout=5)
            time.sleep(0.5)
        return self.processes()


def describe(procs: list[psutil.Process]) -> str:
    lines = []
    for p in procs:
        try:
            cmd = " ".join(p.cmdline())
        except (psutil.Error, OSError):
            cmd = "<gone>"
        lines.append(f"{p.pid} {cmd[:200]}")
    return "\n".join(lines)


def run_simulation_cli(overrides: list[str], out, timeout: float = 420) -> "os.PathLike":
    """Run ``python -m abd_fl.cli <overrides> output_dir=<out>`` (a Ray simulation) inside a
    :class:`ProcessScope`, stop everything it started, assert it succeeded and left nothing
    running, and return the resolved run directory (``<out>/latest``); the CLI's stdout and
    stderr are kept in ``<out>/cli_output.txt``."""
    import subprocess
    import sys
    from pathlib import Path

    scope = ProcessScope()
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "abd_fl.cli", *overrides, f"output_dir={out}"]
    try:
        proc = subprocess.run(cmd, cwd=root, env=scope.env(), capture_output=True, text=True, timeout=timeout)
    finally:
        survivors = scope.stop()
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "cli_output.txt").write_text(proc.stdout + proc.stderr)  # for tests of what the CLI prints
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert survivors == [], describe(survivors)
    return (Path(out) / "latest").resolve()


# ---- a private local Flower deployment for tests of the `flwr` CLI ----------------------
#
# ``flwr run <app> --stream`` against the ``local`` connection starts a detached local
# SuperLink (``flower-superlink --simulation``, in its own session) when none answers on
# ``127.0.0.1:$FLWR_LOCAL_SUPERLINK_HTTP_API_PORT``. The SuperLink starts a
# ``flower-superexec`` (also detached), which runs the app in a ``flwr-simulation`` process
# that starts a local Ray cluster. The SuperLink keeps running after the run ends, so a
# sandbox finds all of these by PID and stops them: every process carries the sandbox's
# marker in its environment (inherited by all descendants, Ray's included), and the
# SuperLink's command line names the sandbox's ``FLWR_HOME``.
#
# Isolation from anything else on the machine: ``FLWR_HOME`` is a tmp dir (config.toml and
# the SuperLink's state, log and installed apps), the SuperLink listens on free ports and
# ``RAY_ADDRESS`` is removed, so Ray starts a cluster of its own.
# ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` makes the SuperExec run the app in the
# current environment instead of building one with uv (which would download torch).


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flwr_log_tail(text: str, lines: int = 80) -> str:
    """The end of a `flwr` log, without the app's echo of the log-push HTTP requests."""
    kept = [line for line in text.splitlines() if "/v1/runtime/push-logs" not in line]
    return "\n".join(kept[-lines:])


def flwr_executable() -> str:
    """The `flwr` CLI next to this Python (the venv's bin), else the one on PATH."""
    import shutil
    import sys
    from pathlib import Path

    import pytest

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

    home: "os.PathLike"
    output_dir: "os.PathLike"
    log_path: "os.PathLike"
    env: dict[str, str]
    scope: ProcessScope

    def run_flwr(self, args: list[str], log_path, timeout: float, cwd) -> int:
        """Run the `flwr` CLI in its own session, output to ``log_path``; kill its group on timeout."""
        import signal
        import subprocess
        from pathlib import Path

        import pytest

        with Path(log_path).open("w") as log_file:
            proc = subprocess.Popen(
                [flwr_executable(), *args],
                cwd=cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            self.scope.roots.append(proc.pid)
            try:
                return proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: pgid == pid
                proc.wait()
                tail = flwr_log_tail(Path(log_path).read_text(errors="replace"))
                pytest.fail(f"`flwr {' '.join(args[:2])}` timed out after {timeout}s; log tail:\n{tail}")


def make_flwr_sandbox(tmp_path, extra_env: dict[str, str] | None = None):
    """A context manager yielding a :class:`FlwrSandbox` under ``tmp_path``; on exit it stops
    every process of the sandbox by pid and asserts that none is left."""
    from contextlib import contextmanager
    from pathlib import Path

    @contextmanager
    def sandbox():
        home = Path(tmp_path) / "flwr-home"
        output_dir = Path(tmp_path) / "outputs"
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
                "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
                "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
                "RAY_USAGE_STATS_ENABLED": "0",
                "PYTHONUNBUFFERED": "1",
                # `flwr` spawns `flower-superlink` by name, which spawns `flower-superexec`:
                # the venv's bin must be on PATH
                "PATH": os.pathsep.join([str(Path(flwr_executable()).parent), env.get("PATH", "")]),
                **(extra_env or {}),
            }
        )
        box = FlwrSandbox(home, output_dir, Path(tmp_path) / "flwr-run.log", scope.env(base=env), scope)
        try:
            yield box
        finally:
            survivors = box.scope.stop()
            assert not survivors, f"processes left running after cleanup:\n{describe(survivors)}"

    return sandbox()
