"""A run's output directory: resolved config, per-round metrics (appended as produced),
summary, table and plots; ``<output_dir>/latest`` points at the newest run."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

import yaml


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _jsonable(value.item())
    return value


class RunDir:
    """Files of one experiment run. Every write is immediate, so nothing is lost on a crash."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    @classmethod
    def create(cls, output_dir: str | Path, name: str) -> "RunDir":
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = Path(output_dir) / f"{name}-{stamp}"
        path, k = base, 1
        while path.exists():
            path, k = Path(f"{base}-{k}"), k + 1
        run = cls(path)
        run.mark_latest()
        return run

    def mark_latest(self) -> None:
        """Point ``<output_dir>/latest`` at this run (a symlink; a copy where links fail)."""
        latest = self.path.parent / "latest"
        if latest.is_symlink() or latest.is_file():
            latest.unlink()
        elif latest.is_dir():
            shutil.rmtree(latest)
        try:
            os.symlink(self.path.name, latest, target_is_directory=True)
        except OSError:
            shutil.copytree(self.path, latest)

    def write_config(self, cfg: Mapping[str, Any]) -> None:
        (self.path / "config.yaml").write_text(yaml.safe_dump(_jsonable(cfg), sort_keys=False))

    def append_metrics(self, record: Mapping[str, Any]) -> None:
        with (self.path / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(_jsonable(record)) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def write_json(self, name: str, data: Mapping[str, Any]) -> Path:
        path = self.path / name
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(_jsonable(data), indent=2))
        tmp.replace(path)
        return path

    def write_text(self, name: str, text: str) -> Path:
        path = self.path / name
        path.write_text(text)
        return path
