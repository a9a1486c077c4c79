"""Seeds make runs reproducible: the same composed config run twice on one machine gives
the same teacher, students, ABD report and metrics (the Table-3 sweep relies on it to
compare arms and seeds). Across machines the CPU kernels may differ (docs/results.md, Table 3)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from abd_fl.centralized import run_centralized
from abd_fl.paths import compose_config

def _without_timings(value):
    """A record with every wall-clock field (``timings``, ``*_s``) dropped: those differ from run to run."""
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k != "timings" and not k.endswith("_s")}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def _run(tmp_path: Path, name: str, distill: str, seed: int) -> tuple[dict, list[dict]]:
    cfg = compose_config([
        "experiment=central", "experiment=tiny", f"distill={distill}", "defense=abd", f"seed={seed}",
        f"output_dir={tmp_path / name}", "distill.iterations=4",
    ])
    summary = run_centralized(cfg)
    lines = (tmp_path / name / "latest" / "metrics.jsonl").read_text().splitlines()
    return _without_timings(summary), [_without_timings(json.loads(x)) for x in lines if x.strip()]


@pytest.mark.parametrize("distill", ["zskt", "cmi"])
def test_the_same_seed_gives_the_same_run(tmp_path: Path, distill: str) -> None:
    first, first_metrics = _run(tmp_path, "a", distill, seed=5)
    second, second_metrics = _run(tmp_path, "b", distill, seed=5)
    assert {"malicious_teacher", "dfkd_student", "abd_student"} <= set(first)
    assert first == second
    assert first_metrics == second_metrics
    other, _ = _run(tmp_path, "c", distill, seed=6)  # another seed: another teacher
    assert other["malicious_teacher"] != first["malicious_teacher"]
