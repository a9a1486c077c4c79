"""The Table-2 sweep (benchmarks/table2.py): the grid of datasets x teacher architectures and
its abd-fl commands, the table rebuilt from archived records without running anything, and
one real run of one cell with tiny budgets."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from abd_fl.config import validate_config
from abd_fl.paths import compose_config
from tests.benchmark_modules import benchmark_module


# a centralized run in seconds (a teacher epoch, 2 ZSKT iterations per arm, 2 clean-KD iterations)
TINY = [
    "device=cpu", "simulation.local_epochs=1", "distill.iterations=2", "distill.student_steps=2",
    "distill.batch_size=32", "distill.synthesizer_params.batch_size=32",
    "clean_kd_reference.iterations=2", "clean_kd_reference.student_steps=2",
]


@pytest.fixture(scope="module")
def table2():
    yield from benchmark_module("table2")


def _rows(text: str) -> dict[str, list[str]]:
    """The table's rows by 'dataset/teacher', each as its cells."""
    rows = {}
    for line in text.splitlines():
        parts = [p.strip() for p in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(parts) == 8 and parts[0] != "dataset":
            rows[f"{parts[0]}/{parts[1].split(' ->')[0]}"] = parts
    return rows


def test_the_grid_composes_to_its_datasets_and_model_pairs(table2, tmp_path: Path) -> None:
    cells = table2.grid(str(tmp_path))
    assert [c.name for c in cells] == [
        "digits/cnn", "digits/wrn16_2", "mnist5k/lenet", "mnist5k/wrn16_2",
        "cifar10/wrn16_2", "cifar10/wrn40_2", "gtsrb/wrn16_2", "gtsrb/wrn40_2",
    ]
    assert [c.name for c in table2.grid()] == [c.name for c in cells[:4]]  # no data root: embedded only
    for c in cells:
        cfg = compose_config(table2.run_overrides(c, "abd", []))
        validate_config(cfg)
        assert cfg["runner"] == "centralized" and cfg["dataset"]["name"] == c.dataset
        assert (cfg["model"]["client"], cfg["model"]["student"]) == (c.teacher, c.student)
        assert cfg["defense"]["name"] == "abd" and cfg["defense"]["compare_baseline"]
        assert cfg["clean_kd_reference"]["enabled"]
    wrn8 = compose_config(table2.run_overrides(cells[1], "abd", []))
    assert wrn8["dataset"]["image_size"] == 8 and wrn8["model"]["shuffle_layers"] == 5
    assert wrn8["distill"]["iterations"] == compose_config(["experiment=central"])["distill"]["iterations"]
    assert compose_config(table2.run_overrides(cells[5], "abd", []))["model"]["shuffle_layers"] == 13
    assert compose_config(table2.run_overrides(cells[4], "abd", []))["dataset"]["root"] == str(tmp_path)
    assert compose_config(table2.run_overrides(cells[0], "abd_ti", []))["defense"]["name"] == "abd_ti"


def test_dry_run_prints_one_command_per_cell_and_seed(table2, tmp_path: Path, capsys) -> None:
    out, archive = tmp_path / "out", tmp_path / "archive"
    text = table2.main(["--dry-run", "--seeds", "0", "3", "--out", str(out), "--archive", str(archive),
                        "--", "distill.iterations=7"])
    assert capsys.readouterr().out.strip() == text
    cmds = [shlex.split(line) for line in text.splitlines()]
    assert len(cmds) == 4 * 2
    expected = {
        "digits-cnn-abd": ["experiment=central"],
        "digits-wrn16_2-abd": ["experiment=central", "model.client=wrn16_2", "model.student=wrn16_1",
                               "model.shuffle_layers=5"],
        "mnist5k-lenet-abd": ["experiment=mnist_central", "model=mnist_lenet"],
        "mnist5k-wrn16_2-abd": ["experiment=mnist_central", "model=mnist_wrn"],
    }
    seen = set()
    for cmd in cmds:
        assert cmd[1:3] == ["-m", "abd_fl.cli"] and cmd[5] == "progress=false"
        seed = int(cmd[3].removeprefix("seed="))
        run_dir = Path(cmd[4].removeprefix("output_dir="))
        label = run_dir.name.removesuffix(f"-seed{seed}")
        assert run_dir.parent == out
        assert cmd[6:] == [*expected[label], "defense=abd", "distill.iterations=7"]  # user overrides last
        seen.add((label, seed))
    assert seen == {(label, seed) for label in expected for seed in (0, 3)}
    assert not out.exists() and not archive.exists()  # nothing run, nothing written

    # another defense, a subset of cells, the paper datasets
    text = table2.main(["--dry-run", "--seeds", "1", "--defense", "abd_ti", "--data-root", "/data",
                        "--cells", "mnist5k/lenet", "cifar10", "--out", str(out), "--archive", str(archive)])
    cmds = [shlex.split(line) for line in text.splitlines()]
    assert [Path(c[4]).name for c in cmds] == [
        "mnist5k-lenet-abd_ti-seed1", "cifar10-wrn16_2-abd_ti-seed1", "cifar10-wrn40_2-abd_ti-seed1"]
    assert cmds[1][6:] == ["experiment=cifar10_paper", "dataset.root=/data", "defense=abd_ti"]
    assert cmds[2][6:] == ["experiment=cifar10_paper", "dataset.root=/data", "model.client=wrn40_2",
                           "model.shuffle_layers=13", "defense=abd_ti"]
    with pytest.raises(SystemExit, match="unknown cell"):
        table2.main(["--dry-run", "--cells", "cifar10"])  # no --data-root: no such cell


def test_another_trigger_gets_its_own_runs_and_keeps_the_cells_poison_rate(table2, tmp_path: Path) -> None:
    out = tmp_path / "out"
    text = table2.main(["--dry-run", "--seeds", "2", "--attack", "trojan_wm", "--cells", "mnist5k/lenet", "--out", str(out),
                        "--archive", str(tmp_path / "archive")])  # not the tracked archive: its finished runs are read back
    (cmd,) = [shlex.split(line) for line in text.splitlines()]
    assert Path(cmd[4].removeprefix("output_dir=")).name == "mnist5k-lenet-trojan_wm-abd-seed2"
    assert cmd[6:] == ["experiment=mnist_central", "model=mnist_lenet", "attack=trojan_wm", "defense=abd"]
    cell = {c.name: c for c in table2.grid()}["mnist5k/lenet"]
    own, other = (compose_config(table2.run_overrides(cell, "abd", [], a)) for a in (None, "l0_inv"))
    assert own["attack"]["trigger"] == "badnets_square" and other["attack"]["trigger"] == "l0_inv"
    assert other["attack"]["poison_rate"] == own["attack"]["poison_rate"] == 0.1
    assert table2._suffix("abd", "l0_inv") == "-l0_inv" and table2._suffix("sv", "l0_inv") == "-sv-l0_inv"
    assert "none" not in table2.ATTACKS and "badnets_grid" in table2.ATTACKS
    with pytest.raises(SystemExit):
        table2.parse_args(["--attack", "nope"])


def _arm(acc: float, asr: float, floor: float = 0.01) -> dict:
    return {"acc": acc, "asr": asr, "asr_floor": floor}


def _archived(archive: Path, label: str, seed: int, overrides: list[str], summary: dict, defense: dict) -> None:
    """A finished run's record as ``sweep.archive_run`` lays it out."""
    run = archive / f"{label}-seed{seed}"
    (run / "latest").mkdir(parents=True)
    (run / "sweep_run.json").write_text(json.dumps(
        {"args": [f"seed={seed}", f"output_dir=/elsewhere/{label}-seed{seed}", "progress=false", *overrides],
         "wall_s": 100.0 + seed}))
    (run / "latest" / "summary.json").write_text(json.dumps(summary))
    records = [{"role": "malicious_teacher", **summary["malicious_teacher"]},
               {"role": "abd_student", **summary["abd_student"], "defense": defense},
               {"role": "dfkd_student", **summary["dfkd_student"], "defense": {}}]
    (run / "latest" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (run / "latest" / "config.yaml").write_text("name: central\n")


def test_report_rebuilds_the_table_from_archived_records_and_runs_nothing(table2, tmp_path: Path) -> None:
    out, archive = tmp_path / "out", tmp_path / "archive"
    cells = {c.name: c for c in table2.grid()}
    digits = table2.run_overrides(cells["digits/cnn"], "abd", [])
    unverified = {"teachers": [{"searched": False, "found": True}], "config": {"use_sv": True}}
    for seed, (t_acc, base_asr, abd_asr) in enumerate([(0.99, 0.90, 0.50), (0.97, 1.00, 0.30)]):
        _archived(archive, "digits-cnn-abd", seed, digits, {
            "malicious_teacher": _arm(t_acc, 0.98), "dfkd_student": _arm(0.95, base_asr),
            "abd_student": _arm(0.90, abd_asr, 0.02), "clean_kd_reference": _arm(0.97, 0.01, 0.0)}, unverified)
    lenet = table2.run_overrides(cells["mnist5k/lenet"], "abd", [])
    _archived(archive, "mnist5k-lenet-abd", 0, lenet, {
        "malicious_teacher": _arm(0.98, 1.0), "dfkd_student": _arm(0.80, 0.70),
        "abd_student": _arm(0.78, 0.05), "clean_kd_reference": _arm(0.90, 0.0)},
        {"teachers": [{"searched": True, "found": False}], "config": {"use_sv": True}})
    # a run of the same cell with other (smoke) overrides is not this table's run
    _archived(archive, "mnist5k-lenet-abd", 1, [*lenet, "distill.iterations=2"], {
        "malicious_teacher": _arm(0.5, 0.5), "dfkd_student": _arm(0.1, 0.1),
        "abd_student": _arm(0.1, 0.1), "clean_kd_reference": _arm(0.1, 0.1)}, {})

    text = table2.main(["--report", "--seeds", "0", "1", "--out", str(out), "--archive", str(archive)])
    rows = _rows(text)
    assert list(rows) == ["digits/cnn", "digits/wrn16_2", "mnist5k/lenet", "mnist5k/wrn16_2"]
    assert rows["digits/cnn"][1:] == [
        "cnn -> cnn_small", "98.0 (97.0-99.0) / 98.0 (98.0-98.0)",
        "95.0 (95.0-95.0) / 95.0 (90.0-100.0) (floor 1.0)", "90.0 (90.0-90.0) / 40.0 (30.0-50.0) (floor 2.0)",
        "97.0 (97.0-97.0) / 1.0 (1.0-1.0) (floor 0.0)", "SV unverified / SV unverified", "100"]
    assert rows["mnist5k/lenet"][1:] == [
        "lenet -> lenet_small (n=1)", "98.0 / 100.0", "80.0 / 70.0 (floor 1.0)", "78.0 / 5.0 (floor 1.0)",
        "90.0 / 0.0 (floor 1.0)", "no vaccine", "100"]
    assert rows["digits/wrn16_2"][2] == rows["mnist5k/wrn16_2"][2] == "not run yet"
    assert "| ZSKT | ZSKT+ABD | clean KD |" in text
    assert "- mnist5k-lenet-abd seed 1" in text and "- digits-wrn16_2-abd seed 0" in text
    assert "- digits-cnn-abd seed 0" not in text
    assert (out / "results.md").read_text() == text == (archive / "results.md").read_text()
    assert (out / "table2.png").stat().st_size > 0
    assert sorted(p.name for p in out.iterdir()) == ["results.md", "table2.png"]  # no run started
    assert not (archive / "digits-wrn16_2-abd-seed0").exists()
    dry = table2.main(["--dry-run", "--seeds", "0", "1", "--cells", "digits/cnn", "--out", str(out),
                       "--archive", str(archive)]).splitlines()
    assert [line.endswith("read back") for line in dry] == [True, True]  # a dry run says what resume reads back

    # another defense reads its own runs only: none here, so every cell is "not run yet"
    other = table2.main(["--report", "--seeds", "0", "--defense", "abd_ti", "--out", str(out), "--archive", str(archive)])
    assert all(r[2] == "not run yet" for r in _rows(other).values()) and "| ZSKT+abd_ti |" in other
    assert (out / "results-abd_ti.md").read_text() == other
    assert not (out / "table2-abd_ti.png").exists()  # nothing to plot
    assert (out / "results.md").read_text() == text  # the abd table is left alone


def test_one_real_cell_runs_and_its_row_is_written(table2, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the abd-fl child: one torch thread on a shared machine
    out, archive = tmp_path / "out", tmp_path / "archive"
    argv = ["--cells", "digits/cnn", "--seeds", "0", "--out", str(out), "--archive", str(archive), "--", *TINY]
    text = table2.main(argv)
    rows = _rows(text)
    row = rows["digits/cnn"]
    assert row[1] == "cnn -> cnn_small" and " / " in row[2] and "(floor " in row[3] and "(floor " in row[4]
    assert "not run yet" not in row and row[6] == "SV unverified"
    assert all(rows[name][2] == "not run yet" for name in rows if name != "digits/cnn")
    assert (out / "results.md").read_text() == text
    assert not (archive / "results.md").exists()  # a subset of cells never replaces the whole table there
    record = archive / "digits-cnn-abd-seed0"
    summary = json.loads((record / "latest" / "summary.json").read_text())
    assert {"malicious_teacher", "dfkd_student", "abd_student", "clean_kd_reference"} <= set(summary)
    stamp = (out / "digits-cnn-abd-seed0" / "sweep_run.json").read_text()
    assert table2.main(argv) == text  # resumed: read back, not run again
    assert (out / "digits-cnn-abd-seed0" / "sweep_run.json").read_text() == stamp
