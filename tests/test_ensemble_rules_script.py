"""The teacher-ensemble benchmark (benchmarks/ensemble_rules.py, issue 15 item 1): every cell's
overrides (scenario x rule x the server's other guards) compose to a valid config that asks for
what the cell's name says."""

from __future__ import annotations

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
