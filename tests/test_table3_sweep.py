"""The Table-3 sweep's bookkeeping (benchmarks/table3.py, benchmarks/sweep.py): budgets of
the multi-round presets, the verdict and the per-row counts of the table, and reading
finished runs back without running anything."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from abd_fl.paths import compose_config
from tests.benchmark_modules import benchmark_module


@pytest.fixture(scope="module")
def table3():
    yield from benchmark_module("table3")


def _value(overrides: list[str], key: str) -> str:
    """The last value given to ``key`` (Hydra: the last override wins)."""
    hits = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == key]
    assert hits, f"{key} not in {overrides}"
    return hits[-1]


def test_one_shot_and_centralized_runs_keep_their_budgets(table3) -> None:
    assert table3.run_overrides("central", "ood", []) == ["experiment=central", "distill=ood"]
    assert table3.run_overrides("fl", "dense", ["seed=3"]) == ["strategy=dense", "seed=3"]
    assert table3.run_overrides("fl", "zskt_one_shot", []) == []


@pytest.mark.parametrize("method", ["fedftg", "feddf"])
def test_multi_round_presets_split_epochs_and_iterations_over_the_rounds(table3, method: str) -> None:
    one_round = compose_config([f"strategy={method}"])
    got = table3.run_overrides("fl", method, [])
    assert _value(got, "simulation.rounds") == str(table3.ROUNDS) == "2"
    assert int(_value(got, "simulation.local_epochs")) == one_round["simulation"]["local_epochs"] // 2
    assert int(_value(got, "distill.iterations")) == one_round["distill"]["iterations"] // 2
    # the split run composes, and its total budget equals the one-shot one (up to rounding)
    split = compose_config(got)
    assert split["simulation"]["rounds"] * split["distill"]["iterations"] in (
        one_round["distill"]["iterations"], one_round["distill"]["iterations"] - 1)


def test_fedgen_splits_its_repair_budget_and_user_overrides_are_split_too(table3) -> None:
    got = table3.run_overrides("fl", "fedgen", ["experiment=tiny"])
    tiny = compose_config(["strategy=fedgen", "experiment=tiny"])
    iters = tiny["strategy"]["fedgen"].get("defense_iterations") or tiny["distill"]["iterations"]
    assert int(_value(got, "strategy.fedgen.defense_iterations")) == max(1, iters // 2)
    assert int(_value(got, "simulation.local_epochs")) == max(1, tiny["simulation"]["local_epochs"] // 2)
    assert not any(o.startswith("distill.iterations=") for o in got)


def _arm(acc: float, asr: float) -> dict:
    return {"acc": acc, "asr": asr, "asr_floor": 0.01}


def _run(base: tuple[float, float], abd: tuple[float, float]) -> dict:
    return {"dfkd_student": _arm(*base), "abd_student": _arm(*abd), "clean_kd_reference": _arm(0.9, 0.02),
            "_wall_s": 10.0, "_vaccines": {"found": [True, False], "malicious": [True, False]}}


def test_the_table_gives_the_verdict_counts_and_failures(table3, tmp_path: Path) -> None:
    results = {
        "central": {
            "met": [_run((0.90, 0.95), (0.87, 0.05))] * 3,  # ASR <= 10% at a 3-point drop
            "too_costly": [_run((0.90, 0.95), (0.80, 0.05))] * 3,  # 10-point drop
            "weak_attack": [_run((0.90, 0.30), (0.90, 0.30))] * 3,
            "partial": [_run((0.90, 0.95), (0.90, 0.50))] * 2,
        }
    }
    text = table3.write_results(tmp_path, results, [0, 1, 2], "cmd", ["central-partial seed 2: not run yet"])
    rows = {line.split("|")[2].strip(): line for line in text.splitlines() if line.startswith("| central")}
    assert rows["met"].split("|")[6].strip() == "yes"
    assert rows["too_costly"].split("|")[6].strip() == "no"
    assert rows["weak_attack"].split("|")[6].strip() == "baseline ASR < 50%"
    assert "partial (n=2)" in rows and rows["partial (n=2)"].split("|")[6].strip() == "no"
    assert "1/2 (1 mal.)" in rows["met"]
    assert "- central-partial seed 2: not run yet" in text
    assert (tmp_path / "results.md").read_text() == text


def _finished_run(out: Path, label: str, seed: int, args: list[str]) -> None:
    run = out / f"{label}-seed{seed}"
    (run / "latest").mkdir(parents=True)
    (run / "latest" / "summary.json").write_text(json.dumps({"abd_student": _arm(0.8, 0.1)}))
    lines = [{"role": "abd_student", "defense": {"teachers": [{"found": True}]}}, {"detection": {"auc": 0.7}}]
    (run / "latest" / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    (run / "sweep_run.json").write_text(json.dumps({"args": [f"seed={seed}", "output_dir=/moved", "progress=false", *args],
                                                     "wall_s": 12.5}))


def test_report_only_reads_finished_runs_back_and_starts_none(table3, tmp_path: Path) -> None:
    from sweep import RunFailed, run_one

    _finished_run(tmp_path, "central-zskt", 0, ["experiment=central"])
    summary = run_one(tmp_path, "central-zskt", ["experiment=central"], 0, report_only=True)
    assert summary["_wall_s"] == 12.5 and summary["_detection"] == {"auc": 0.7}
    assert table3.vaccine_report(tmp_path / "central-zskt-seed0") == {"found": [True], "malicious": [True]}
    with pytest.raises(RunFailed, match="not run yet"):  # other seed: nothing there
        run_one(tmp_path, "central-zskt", ["experiment=central"], 1, report_only=True)
    with pytest.raises(RunFailed, match="not run yet"):  # same seed, other overrides: not this run
        run_one(tmp_path, "central-zskt", ["experiment=central", "distill=cmi"], 0, report_only=True)
    assert not (tmp_path / "central-zskt-seed1").exists()


def test_a_finished_run_is_archived_and_read_back_from_the_archive_alone(table3, tmp_path: Path) -> None:
    from sweep import RunFailed, run_one

    out, archive = tmp_path / "outputs", tmp_path / "archive"
    _finished_run(out, "fl-dense", 2, ["strategy=dense"])
    (out / "fl-dense-seed2" / "latest" / "model.pt").write_bytes(b"big")  # not archived
    first = run_one(out, "fl-dense", ["strategy=dense"], 2, resume=True, archive=archive)
    assert first["_dir"] == str(out / "fl-dense-seed2")
    kept = archive / "fl-dense-seed2"
    assert sorted(p.name for p in (kept / "latest").iterdir()) == ["metrics.jsonl", "summary.json"]
    assert (kept / "sweep_run.json").read_text() == (out / "fl-dense-seed2" / "sweep_run.json").read_text()
    (kept / "latest" / "config.yaml").write_text("stale: true\n")  # left by an earlier run of that name
    run_one(out, "fl-dense", ["strategy=dense"], 2, resume=True, archive=archive)
    assert not (kept / "latest" / "config.yaml").exists()  # a rerun replaces the whole record
    shutil.rmtree(out)  # outputs/ lost: the archive alone rebuilds the table
    again = run_one(out, "fl-dense", ["strategy=dense"], 2, report_only=True, archive=archive)
    assert again["_dir"] == str(kept)
    assert {k: v for k, v in again.items() if k != "_dir"} == {k: v for k, v in first.items() if k != "_dir"}
    assert table3.vaccine_report(kept) == {"found": [True], "malicious": [True]}
    with pytest.raises(RunFailed, match="not run yet"):  # other overrides: the archived run is not this one
        run_one(out, "fl-dense", ["strategy=dense", "seed=9"], 2, report_only=True, archive=archive)
    assert not out.exists()
