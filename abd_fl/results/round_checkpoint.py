"""Per-round checkpoints of a federated run, and what ``resume=<run dir>|latest`` reads back.

After every finished round the server writes ``checkpoints/round-<k>.pt`` in the run
directory (round 0: the initial global model): the global model's arrays and any server
extension's state (FedGen's generator and its optimiser). A write goes to a temporary file
that is then renamed, so a kill leaves either the old file or the new one, never half of
one. The rest of what the next round needs is derived, not stored: client and server seeds
are functions of (seed, round), the attack schedule is drawn from (seed, round), and the
per-round metrics are the lines already in ``metrics.jsonl`` (on resume the lines of rounds
after the checkpoint are dropped, so no line is duplicated).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^round-(\d+)\.pt$")


class ResumeError(ValueError):
    """A ``resume`` target that cannot be resumed (one line: what and why)."""


def save_round(run_path: str | Path, server_round: int, global_state: dict[str, torch.Tensor],
               extension_state: dict[str, Any] | None = None) -> Path:
    """Atomically write round ``server_round``'s checkpoint; returns its path."""
    folder = Path(run_path) / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"round-{int(server_round)}.pt"
    tmp = path.with_suffix(".pt.tmp")
    payload = {"round": int(server_round), "global": {k: v.detach().cpu() for k, v in global_state.items()},
               "extension": extension_state}
    with tmp.open("wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    return path


def finished_rounds(run_path: str | Path) -> list[int]:
    """The rounds with a checkpoint in ``run_path`` (0 = the initial model), ascending."""
    folder = Path(run_path) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _NAME.match(p.name)))


def load_round(run_path: str | Path, server_round: int) -> dict[str, Any]:
    """Round ``server_round``'s checkpoint: ``{"round", "global", "extension"}``."""
    path = Path(run_path) / CHECKPOINT_DIR / f"round-{int(server_round)}.pt"
    return torch.load(path, map_location="cpu", weights_only=True)


def truncate_metrics(run_path: str | Path, last_round: int) -> int:
    """Keep the ``metrics.jsonl`` lines of rounds <= ``last_round`` (the lines up to the first
    line of a later round or without a round); atomically. Returns the lines kept."""
    path = Path(run_path) / "metrics.jsonl"
    if not path.exists():
        return 0
    kept: list[str] = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if "round" not in record or int(record["round"]) > last_round:
            break
        kept.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)
    return len(kept)


def resolve_resume(resume: str, output_dir: str | Path) -> Path:
    """The run directory ``resume`` names: ``latest`` (``<output_dir>/latest``) or a path.
    Raises :class:`ResumeError` (one line) when it is not a run directory with checkpoints."""
    path = Path(output_dir) / "latest" if resume == "latest" else Path(resume)
    if not path.is_dir():
        raise ResumeError(f"resume={resume}: {path} is not a run directory (resume=latest or a run's folder)")
    path = path.resolve()
    if not (path / "config.yaml").is_file():
        raise ResumeError(f"resume={resume}: {path} has no config.yaml (not a run directory)")
    if not finished_rounds(path):
        raise ResumeError(f"resume={resume}: {path} has no round checkpoints (checkpoints/round-<k>.pt) to resume from")
    return path


RESUME_FREE_KEYS = ("resume", "output_dir", "progress")
"""Top-level keys a resumed run may set differently from the run it continues."""


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in sorted(set(a) | set(b), key=str):
            if not prefix and key in RESUME_FREE_KEYS:
                continue
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in a or key not in b:
                out.append(name)
            else:
                out += _differences(a[key], b[key], name)
        return out
    return [] if a == b else [prefix or "<root>"]


def check_resumable(run_path: str | Path, cfg: dict[str, Any]) -> None:
    """Raise :class:`ResumeError` (one line, naming the keys) when ``cfg`` is not the config the
    run in ``run_path`` was started with (its ``config.yaml``; ``resume``, ``output_dir`` and
    ``progress`` may differ): a resumed run continues the same experiment."""
    import yaml

    from abd_fl.results.run_dir import _jsonable

    stored = yaml.safe_load((Path(run_path) / "config.yaml").read_text()) or {}
    stored.pop("resolved", None)
    now = yaml.safe_load(yaml.safe_dump(_jsonable(cfg), sort_keys=False)) or {}
    diffs = _differences(stored, now)
    if diffs:
        more = f" and {len(diffs) - 3} more" if len(diffs) > 3 else ""
        raise ResumeError(
            f"resume: the config differs from {Path(run_path) / 'config.yaml'} at {', '.join(diffs[:3])}{more}; "
            "resume with the run's own settings (only resume, output_dir and progress may change)"
        )
