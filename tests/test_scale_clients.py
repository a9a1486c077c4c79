"""The client-scaling benchmark (benchmarks/scale_clients.py, issue 16 item 4): its runs'
overrides validate, and its figures are read from a run's records as the server writes them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from abd_fl.config import validate_config
from abd_fl.paths import compose_config
from tests.benchmark_modules import benchmark_module


@pytest.fixture(scope="module")
def scale():
    yield from benchmark_module("scale_clients")


@pytest.mark.parametrize("clients", [6, 12, 25, 50, 100])
def test_every_point_is_a_valid_config(scale, clients: int) -> None:
    cfg = compose_config(scale.point_overrides(clients, []))
    validate_config(cfg)
    assert cfg["simulation"]["num_clients"] == clients and cfg["defense"]["name"] == "none"


def _run_dir(tmp: Path, clients: int, wait: float, distill: float, rss: float) -> Path:
    latest = tmp / f"clients{clients}" / "latest"
    latest.mkdir(parents=True)
    record = {"round": 1, "timings": {"replies_wait_s": wait, "dfkd_student_s": distill, "evaluate_s": 1.0},
              "teacher_info": [{"train_s": 2.0 + i} for i in range(clients)], "server_memory": {"peak_rss_mb": rss}}
    (latest / "metrics.jsonl").write_text(json.dumps({"config": 1}) + "\n" + json.dumps(record) + "\n")
    (latest / "summary.json").write_text(json.dumps({"wall_s": wait + distill + 5, "dfkd_student": {"acc": 0.5}}))
    return latest.parent


def test_points_slopes_and_table_from_records(scale, tmp_path: Path) -> None:
    points = [scale.read_point(_run_dir(tmp_path, n, wait=10 + 2 * n, distill=100 + 3 * n, rss=900 + 4 * n))
              for n in (6, 12, 24)]
    assert points[0]["clients"] == 6 and points[0]["distill_s"] == 118 and points[0]["round_s"] == 141
    assert points[0]["client_work_median_s"] == 4.5 and points[2]["peak_rss_mb"] == 996
    xs = [p["clients"] for p in points]
    assert scale.slope(xs, [p["distill_s"] for p in points]) == pytest.approx(3.0)
    assert scale.slope(xs, [p["peak_rss_mb"] for p in points]) == pytest.approx(4.0)
    text = scale.table(points)
    assert "| 24 | 58.0 | 172.0 | 1.0 | 231.0 |" in text and "distillation s: 3.00" in text
    scale.plot(points, tmp_path / "scale.png")
    assert (tmp_path / "scale.png").stat().st_size > 1000
