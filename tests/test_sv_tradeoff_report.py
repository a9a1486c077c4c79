"""benchmarks/sv_tradeoff.py's report (issue 12, item 3): the mean (min-max) table per point,
each seed judged against the same seed's baseline by the central target, and the figure with
the coefficient's trade-off curve, written where ``--figure`` says (never into docs/ from a
test)."""

from __future__ import annotations

import json

import pytest

from tests.benchmark_modules import benchmark_module


@pytest.fixture(scope="module")
def svt():
    yield from benchmark_module("sv_tradeoff")


def _row(point: str, seed: int, acc: float, asr: float) -> dict:
    return {"trigger": "badnets_square", "point": point, "seed": seed, "overrides": [], "teacher": {},
            "acc": acc, "asr": asr, "asr_floor": 0.0, "wall_s": 1.0}


def test_report_table_verdicts_and_curve_figure(svt, tmp_path) -> None:
    rows = [_row("baseline", 0, 0.90, 0.95), _row("baseline", 1, 0.80, 0.97),
            _row("ref", 0, 0.88, 0.04), _row("ref", 1, 0.60, 0.00),      # met on seed 0 only
            _row("coef0.01", 0, 0.90, 0.90), _row("coef0.01", 1, 0.80, 0.92),
            _row("coef0.3", 0, 0.30, 0.00),
            _row("ref", 0, 0.89, 0.03)]                                   # a rerun: the later row wins
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    figure = tmp_path / "fig.png"
    text = svt.report(tmp_path, figure)
    assert "| badnets_square | ref | 2 | 74.5 (60.0-89.0) | 1.5 (0.0-3.0) |" in text
    assert "| badnets_square | coef0.3 | 1 | 30.0 | 0.0 |" in text
    assert "| badnets_square | ref | 0 | 90.0 / 95.0 | 89.0 / 3.0 (0.0) | +1.0 | met |" in text
    assert "| badnets_square | ref | 1 | 80.0 / 97.0 | 60.0 / 0.0 (0.0) | +20.0 | missed |" in text
    assert (tmp_path / "results.md").read_text() == text
    assert figure.is_file() and figure.stat().st_size > 10_000
