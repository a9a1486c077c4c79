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
