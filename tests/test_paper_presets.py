"""The paper presets (`experiment=cifar10_paper|gtsrb_paper`) compose to the paper's settings
and run end to end, for a few steps, on tiny files written in the datasets' real on-disk
formats (the real datasets are never downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from abd_fl.centralized import run_centralized
from abd_fl.paths import compose_config
from tests.test_data import write_cifar10, write_gtsrb

TINY = [
    "device=cpu",
    "progress=false",
    "simulation.local_epochs=1",
    "simulation.local_batch_size=16",
    "distill.iterations=2",
    "distill.student_steps=1",
    "distill.batch_size=8",
    "distill.synthesizer_params.batch_size=8",
    "defense.params.surrogate_batches=1",
    "defense.params.sr_fraction=0.5",
    "defense.params.sr=on",
    "clean_kd_reference.iterations=1",
    "clean_kd_reference.student_steps=1",
]


@pytest.mark.parametrize(
    "preset, dataset, temperature, iterations, search",
    [("cifar10_paper", "cifar10", 1.0, 80000, "off"), ("gtsrb_paper", "gtsrb", 0.5, 10000, "verify")],
)
def test_paper_preset_composes_to_the_paper_setting(
    preset: str, dataset: str, temperature: float, iterations: int, search: str
) -> None:
    cfg = compose_config([f"experiment={preset}"])
    assert cfg["runner"] == "centralized" and cfg["dataset"]["name"] == dataset
    assert (cfg["model"]["client"], cfg["model"]["student"], cfg["model"]["shuffle_layers"]) == ("wrn16_2", "wrn16_1", 5)
    assert cfg["attack"]["trigger"] == "badnets_grid" and cfg["attack"]["poison_rate"] == 0.1
    # one iteration = one reference pseudo-batch (1 generator + 10 student steps on one z)
    assert cfg["distill"]["synthesizer"] == "zskt" and cfg["distill"]["iterations"] == iterations
    assert cfg["distill"]["temperature"] == temperature
    params = cfg["defense"]["params"]
    assert params["search"] == search and params["sr"] == "on" and (params["surrogate_start"], params["surrogate_stop"]) == (11, 50)


@pytest.mark.parametrize("preset, writer", [("cifar10_paper", write_cifar10), ("gtsrb_paper", write_gtsrb)])
def test_paper_preset_runs_on_tiny_real_format_files(
    preset: str, writer, tmp_path: Path, one_torch_thread: None
) -> None:
    writer(tmp_path / "data")
    cfg = compose_config([f"experiment={preset}", f"dataset.root={tmp_path / 'data'}", f"output_dir={tmp_path / 'out'}", *TINY])
    summary = run_centralized(cfg)
    for role in ("malicious_teacher", "dfkd_student", "abd_student", "clean_kd_reference"):
        assert set(summary[role]) >= {"acc", "asr", "asr_floor"}
        assert 0.0 <= summary[role]["asr"] <= 1.0
    run_dir = next((tmp_path / "out").glob(f"{preset}-*"))
    written = json.loads((run_dir / "summary.json").read_text())
    assert written["abd_student"] == summary["abd_student"]
    report = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    abd = next(r for r in report if r["role"] == "abd_student")
    assert abd["defense"]["sr_active"] and abd["defense"]["sr_steps"] >= 1
