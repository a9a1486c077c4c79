"""Stop every process a test started, by pid: the tagged subprocess, its children, and
anything that inherited the tag (Ray's raylet/GCS/workers, Flower's SuperLink)."""

from __future__ import annotations

import os
import uuid

import psutil

TAG_VAR = "ABD_FL_TEST_TAG"


def tagged_env(extra: dict[str, str] | None = None) -> tuple[dict[str, str], str]:
    tag = uuid.uuid4().hex
    env = {**os.environ, TAG_VAR: tag, **(extra or {})}
    return env, tag


def tagged_processes(tag: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["pid"]):
        if proc.pid == os.getpid():
            continue
        try:
            if proc.environ().get(TAG_VAR) == tag:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def stop_tagged(tag: str, timeout: float = 10.0) -> list[int]:
    """Terminate (then kill) every process carrying ``tag`` and their children; returns the pids."""
    procs = tagged_processes(tag)
    for proc in list(procs):
        try:
            procs.extend(proc.children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    unique = {p.pid: p for p in procs}.values()
    for proc in unique:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(unique), timeout=timeout)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=timeout)
    return [p.pid for p in unique]
