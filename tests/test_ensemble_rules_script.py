"""The teacher-ensemble benchmark (benchmarks/ensemble_rules.py, issue 15 item 1): every cell's
overrides (scenario x rule x the server's other guards) compose to a valid config that asks for
what the cell's name says."""

from __future__ import annotations

import json

import pytest

from abd_fl.config import validate_config
from abd_fl.paths import compose_config
from tests.benchmark_modules import benchmark_module


@pytest.fixture(scope="module")
def rules():
    yield from benchmark_module("ensemble_rules")


@pytest.mark.parametrize("variant", ["plain", "clip", "reject", "krum_selected", "multikrum_selected"])
def test_every_variant_is_a_valid_config(rules, variant: str) -> None:
    cfg = compose_config(rules.cell_overrides("2of6_x5", "mean_probs", [], variant))
    validate_config(cfg)
    assert cfg["attack"]["scale"] == 5 and cfg["distill"]["ensemble"] == "mean_probs"
    assert cfg["defense"]["name"] == "none"
    strategy = cfg["strategy"]
    if variant in ("clip", "reject"):
        assert strategy["update_check"]["action"] == variant
    if variant.endswith("_selected"):
        assert strategy["teachers"] == "selected" and strategy["base"] == variant.removesuffix("_selected")
    else:
        assert strategy["teachers"] == "all" and strategy["base"] == "fedavg"


@pytest.mark.parametrize("scenario", ["clean", "2of6", "2of6_x20", "1of6_x5", "3of6_x5"])
def test_every_scenario_is_a_valid_config(rules, scenario: str) -> None:
    validate_config(compose_config(rules.cell_overrides(scenario, "mean_logits", [])))
    validate_config(compose_config(rules.ensemble_overrides(scenario, [])))


def test_row_names_keep_the_plain_runs_names(rules) -> None:
    assert rules.row_name("2of6_x5", "plain") == "2of6_x5"
    assert rules.row_name("2of6_x5", "clip") == "2of6_x5+clip"


def _finished_run(rules, out, label: str, overrides: list[str], seed: int, summary: dict) -> None:
    run_dir = out / f"{label}-seed{seed}"
    (run_dir / "latest").mkdir(parents=True)
    (run_dir / "latest" / "summary.json").write_text(json.dumps(summary))
    (run_dir / "latest" / "metrics.jsonl").write_text(json.dumps({"round": 1}) + "\n")
    args = rules.run_command(out, label, overrides, seed)[3:]
    (run_dir / "sweep_run.json").write_text(json.dumps({"args": args, "wall_s": 1.0}))


def test_the_tradeoff_figure_draws_every_finished_run_and_skips_the_rest(rules, tmp_path) -> None:
    """--plot reads finished runs only (here from the archive): every rule's ensemble on the
    seeds that have both a clean and an x5 run, and the candidates' students that ran."""
    out, archive = tmp_path / "out", tmp_path / "archive"
    metric = {"acc": 0.9, "asr": 0.1, "asr_floor": 0.1}
    for seed in (0, 1):
        for sc in ("clean", "2of6_x5"):
            _finished_run(rules, archive / "ensembles", f"{sc}-ensembles", rules.ensemble_overrides(sc, []), seed,
                          {"ensembles": {rule: metric for rule in rules.RULES}})
    _finished_run(rules, archive / "ensembles", "clean-ensembles", rules.ensemble_overrides("clean", []), 2,
                  {"ensembles": {rule: metric for rule in rules.RULES}})  # seed 2 has no x5 run: not drawn
    for seed in (0, 1, 2):
        _finished_run(rules, archive, "2of6_x5+multikrum_selected-mean_probs",
                      rules.cell_overrides("2of6_x5", "mean_probs", [], "multikrum_selected"), seed, {"dfkd_student": metric})
    path = tmp_path / "fig.png"
    drawn = rules.plot_tradeoff(out, [0, 1, 2], path, archive)
    assert drawn == {"ensembles": 2 * len(rules.RULES), "students": 3} and path.stat().st_size > 0


def test_a_null_asr_is_left_out_of_tables_and_figure(rules, tmp_path) -> None:
    """An ASR of None (no triggered non-target image) is no number: the tables say n/a when
    no seed has one and average the seeds that do; the figure draws no point for it."""
    assert rules.fmt([None, None]) == "n/a"
    assert rules.fmt([None, 0.2, 0.4]) == "30.0 (20.0-40.0)"
    null = {"acc": 0.9, "asr": None, "asr_floor": 0.0}
    table = rules.tables({("2of6_x5", "mean_probs"): [{"dfkd_student": null, "ensemble": null}]}, ["2of6_x5"], ["mean_probs"])
    assert "90.0 / n/a / 0.0" in table
    out, archive = tmp_path / "out", tmp_path / "archive"
    for sc in ("clean", "2of6_x5"):
        _finished_run(rules, archive / "ensembles", f"{sc}-ensembles", rules.ensemble_overrides(sc, []), 0,
                      {"ensembles": {rule: null for rule in rules.RULES}})
    _finished_run(rules, archive, "2of6_x5-mean_probs", rules.cell_overrides("2of6_x5", "mean_probs", [], "plain"), 0,
                  {"dfkd_student": null})
    drawn = rules.plot_tradeoff(out, [0], tmp_path / "fig.png", archive)
    assert drawn == {"ensembles": 0, "students": 0}
