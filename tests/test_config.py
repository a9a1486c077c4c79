"""Bad configs fail with one clear line before anything starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from abd_fl.config import ConfigError, validate_config
from abd_fl.data import DatasetNotFoundError
from abd_fl.experiment import build_bundle, malicious_ids
from abd_fl.local_update import client_train_data
from abd_fl.paths import compose_config

ROOT = Path(__file__).resolve().parents[1]


def test_default_config_is_valid() -> None:
    cfg = compose_config()
    validate_config(cfg)
    assert cfg["simulation"]["num_clients"] >= 2 and cfg["attack"]["num_malicious"] >= 1


@pytest.mark.parametrize(
    "override, message",
    [
        ("dataset.name=imagenet", "unknown dataset 'imagenet'; choose one of: digits"),
        ("model.client=vgg", "unknown model.client 'vgg'; choose one of:"),
        ("attack.trigger=rainbow", "unknown trigger 'rainbow'; choose one of:"),
        ("strategy.base=fedsgd", "unknown strategy.base 'fedsgd'; choose one of: fedavg"),
        ("attack.poison_rate=1.5", "attack.poison_rate must be in [0.0, 1.0], got 1.5"),
        ("attack.poison_rate=-0.1", "attack.poison_rate must be in [0.0, 1.0], got -0.1"),
        ("attack.num_malicious=9", "attack.num_malicious=9 is more than simulation.num_clients=6"),
        ("attack.malicious_ids=[0,7]", "attack.malicious_ids must be distinct partition ids in [0, 5]"),
        ("simulation.rounds=3", "one_shot runs exactly 1 round"),
        ("device=tpu", "unknown device 'tpu'"),
        ("distill.synthesizer=gan", "unknown synthesizer 'gan'"),
        ("defense=nothing_at_all", None),
        ("defense.name=vaccine", "unknown defense 'vaccine'; choose one of: none, abd, sv, sr"),
        ("defense.params.sr_fraction=2.0", "bad defense.params: defense.sr_fraction must be in [0, 1], got 2.0"),
        ("defense.params.sr_config.portion=0.0", "bad defense.params: SRConfig.portion"),
        # issue 15, item 5: more values and impossible combinations, each one line before anything starts
        ("attack.target_label=12", "attack.target_label must be in [0, 9], got 12"),
        ("dataset.image_size=3", "digits image_size 3 is not supported; choose one of: 8, 16, 24, 32"),
        ("dataset=mnist5k dataset.image_size=30", "mnist5k image_size 30 is not supported; choose 28 (native), 32"),
        ("simulation.num_clients=1", "attack.num_malicious=2 is more than simulation.num_clients=1"),
        ("strategy=fedftg model.student=cnn_small", "strategy.mode=multi_round distils into the aggregated model, so "
         "model.student must equal model.client, got student=cnn_small client=cnn"),
        ("strategy=bulyan", "strategy.base=bulyan with num_malicious_nodes=1 needs at least 7 replies per round"),
        ("strategy=fedgen strategy.mode=one_shot", "strategy=fedgen is defined by strategy.mode=multi_round, got strategy.mode=one_shot"),
        ("simulation.alpha=0", "simulation.alpha must be in [1e-09, inf], got 0.0"),
        ("strategy.fraction_train=0", "strategy.fraction_train must be in [1e-09, 1.0], got 0.0"),
        ("distill.temperature=0", "distill.temperature must be > 0, got 0.0"),
        ("simulation.local_batch_size=0", "simulation.local_batch_size must be in [1, inf], got 0"),
        ("attack.scale=-1", "attack.scale must be a finite number > 0 (1 = no scaling), got -1.0"),
        ("simulation.partition=shards", "unknown simulation.partition 'shards'; choose one of: iid, dirichlet"),
        ("distill.ensemble=avg", "unknown distill.ensemble 'avg'; choose one of: mean_logits"),
        ("strategy.teachers=some", "unknown strategy.teachers 'some'; choose one of: all, selected"),
        ("strategy.update_check.action=drop", "unknown strategy.update_check.action 'drop'; choose one of: off, keep"),
    ],
)
def test_bad_values_fail_with_one_line(override: str, message: str | None) -> None:
    if message is None:  # an unknown config-group option: Hydra itself names the choices
        with pytest.raises(Exception, match="nothing_at_all"):
            compose_config([override])
        return
    cfg = compose_config(override.split(" "))
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+attack.poison=0.1", "unknown attack key(s) ['poison']; known: trigger, trigger_params, poison_rate,"),
        ("+dataset.imagesize=8", "unknown dataset key(s) ['imagesize']; known: name, root, image_size"),
        ("+model.teacher=cnn", "unknown model key(s) ['teacher']; known: client, student, shuffle_layers"),
        ("+strategy.basis=krum", "unknown strategy key(s) ['basis']; known: name, base, base_params, mode, fraction_train, teachers, update_check, fedgen"),
        ("+simulation.client_resources.tpus=1", "unknown simulation.client_resources key(s) ['tpus']; known: num_cpus, num_gpus"),
        ("+sead=1", "unknown top-level key(s) ['sead']; known: dataset, model, attack, distill, strategy, defense, simulation, name,"),
        ("+teachers.fmt=pt", "unknown teachers key(s) ['fmt']; known: which, format, out"),
    ],
)
def test_a_key_added_to_a_typed_group_with_plus_fails_with_one_line(override: str, message: str) -> None:
    """Hydra's ``+key=value`` adds a key the schema does not have (OmegaConf lets it through on
    purpose): validation refuses it, naming the group's fields."""
    cfg = compose_config(override.split(" "))
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_local_dataset_folder_names_the_folder(tmp_path: Path) -> None:
    cfg = compose_config(["dataset=cifar10", f"dataset.root={tmp_path / 'nowhere'}"])
    validate_config(cfg)
    with pytest.raises(DatasetNotFoundError) as err:
        build_bundle(cfg)
    assert str(tmp_path / "nowhere") in str(err.value) and "\n" not in str(err.value)


def test_malicious_clients_from_count_or_ids_and_poisoning() -> None:
    cfg = compose_config(["attack.num_malicious=2", "seed=3"])
    ids = malicious_ids(cfg)
    assert len(ids) == 2 and ids == malicious_ids(cfg)
    assert malicious_ids(compose_config(["attack.malicious_ids=[4,1]"])) == [1, 4]
    data, is_mal = client_train_data(cfg, ids[0])
    assert is_mal and (data.labels == 0).float().mean() > 0.4  # half the local data relabelled to target 0
    benign = next(i for i in range(6) if i not in ids)
    assert client_train_data(cfg, benign)[1] is False
    with pytest.raises(ConfigError, match="target_label must be in"):
        build_bundle(compose_config(["attack.target_label=10"]))


def test_cli_rejects_a_bad_value_before_starting_anything() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "abd_fl.cli", "attack.poison_rate=2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "config error: attack.poison_rate must be in [0.0, 1.0], got 2" in proc.stderr


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("distill.iterations=abc", "distill.iterations=abc: Value 'abc' of type 'str' could not be converted to Integer"),
        ("defense.params.nope=1", "Key 'nope' not in 'ABDConfig'"),
        ("simulation.num_clients=abc", "simulation.num_clients=abc: Value 'abc' of type 'str' could not be converted to Integer"),
        ("dataset.imagesize=8", "Could not override 'dataset.imagesize': Key 'imagesize' not in 'DatasetSettings'"),
    ],
)
def test_cli_refuses_a_wrong_type_or_key_of_a_typed_group_in_one_line(override: str, message: str) -> None:
    """The typed schemas' refusals reach the user as every config error does: one line, exit 2."""
    proc = subprocess.run([sys.executable, "-m", "abd_fl.cli", override], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("abd-fl: config error: ") and message in lines[0], proc.stderr


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("dataset.image_size=big", "could not be converted to Integer"),
        ("dataset.imagesize=8", "Key 'imagesize' not in 'DatasetSettings'"),
        ("model.shuffle_layers=two", "could not be converted to Integer"),
        ("model.teacher=cnn", "Key 'teacher' not in 'ModelSettings'"),
        ("attack.single_shot=maybe", "is not a valid bool"),
        ("attack.poison=0.1", "Key 'poison' not in 'AttackSettings'"),
        ("strategy.fraction_train=all", "could not be converted to Float"),
        ("strategy.basis=krum", "Key 'basis' not in 'StrategySettings'"),
        ("simulation.num_clients=abc", "could not be converted to Integer"),
        ("simulation.client_resources.tpus=1", "Key 'tpus' not in 'ClientResources'"),
        ("seed=abc", "could not be converted to Integer"),
        ("teachers.fmt=pt", "Key 'fmt' not in 'TeachersSettings'"),
    ],
)
def test_the_cli_entry_point_refuses_each_typed_groups_wrong_type_and_unknown_key(override: str, message: str, monkeypatch, capsys) -> None:
    """``abd-fl``'s ``main`` for every group (in this process; the subprocess test above runs the
    real command for two of them): one line on stderr naming the key, exit code 2, no run."""
    from abd_fl import cli

    def no_run() -> None:
        raise AssertionError(f"Hydra was started for {override}")

    monkeypatch.setattr(cli, "_hydra_main", no_run)
    monkeypatch.setattr(sys, "argv", ["abd-fl", override])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("abd-fl: config error: "), lines
    assert message in lines[0] and override.split("=")[0] in lines[0], lines


def test_cli_stops_on_a_missing_dataset_folder_before_ray_starts(tmp_path: Path) -> None:
    """`abd-fl dataset=cifar10 dataset.root=/nonexist`: one line, exit 2, no simulation started."""
    from tests.process_cleanup import ProcessScope, describe

    missing = tmp_path / "nonexist"
    scope = ProcessScope()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "abd_fl.cli", "dataset=cifar10", f"dataset.root={missing}", f"output_dir={tmp_path / 'out'}"],
            cwd=ROOT,
            env=scope.env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        survivors = scope.stop()  # on failure, whatever the run started (Ray) is stopped
    assert survivors == [], describe(survivors)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    assert "Traceback" not in output and "Starting Flower" not in output and "ray" not in output.lower(), output[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("abd-fl:")]
    assert errors == [f"abd-fl: dataset error: dataset 'cifar10' not found under '{missing}' (expected the torchvision layout, "
                      f"e.g. {missing / 'cifar-10-batches-py'}); downloads are disabled, place the files there first"]


def test_the_cli_silences_alembics_info_lines() -> None:
    """Importing Flower's simulation engine imports alembic, whose plugin set-up logs at INFO:
    under Hydra's root handler that was a screenful of `alembic` lines at every start."""
    code = (
        "import logging; logging.basicConfig(level=logging.INFO)\n"
        "from abd_fl.cli import quiet_library_loggers; quiet_library_loggers()\n"
        "from flwr.simulation import run_simulation\n"
        "from strategies.server_app import build_server_app\n"
        "logging.getLogger('abd_fl.probe').info('still logging')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "alembic" not in proc.stderr + proc.stdout and "still logging" in proc.stderr


def test_run_simulation_is_isolated_and_only_its_deprecation_warning_is_dropped(monkeypatch) -> None:
    """Flower 1.42 deprecates ``run_simulation`` and has no in-process replacement: the CLI
    calls it in one function, which drops Flower's deprecation warning for that call and
    nothing else (the real ``run_simulation`` logs it; only the simulation itself is faked)."""
    import importlib
    import logging
    import re

    from abd_fl import cli

    # the module (``flwr.simulation.run_simulation`` as an attribute is the function it defines)
    flwr_run_simulation = importlib.import_module("flwr.simulation.run_simulation")

    callers = [
        str(p.relative_to(ROOT))
        for package in ("abd_fl", "strategies", "clients", "benchmarks", "examples")
        for p in (ROOT / package).rglob("*.py")
        if re.search(r"\brun_simulation\(", p.read_text())
    ]
    assert callers == ["abd_fl/cli.py"]
    assert len(re.findall(r"\brun_simulation\(", (ROOT / "abd_fl" / "cli.py").read_text())) == 1

    class Keep(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.DEBUG)
            self.lines: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.lines.append(record.getMessage())

    flwr_logger = logging.getLogger("flwr")
    kept = Keep()
    flwr_logger.addHandler(kept)
    calls = []

    def fake_simulation(**kwargs):
        calls.append(kwargs)
        flwr_logger.warning("another warning during the run")

    monkeypatch.setattr(flwr_run_simulation, "_run_simulation", fake_simulation)
    monkeypatch.setattr(flwr_run_simulation, "event", lambda *args, **kwargs: None)  # no telemetry
    try:
        cli.run_in_process_simulation("server-app", "client-app", num_supernodes=3, backend_config={"init_args": {}})
        from flwr.supercore.logger import warn_deprecated_feature

        warn_deprecated_feature("The `run_simulation` function is deprecated (logged after the call)")
    finally:
        flwr_logger.removeHandler(kept)
    assert [(c["server_app"], c["client_app"], c["num_supernodes"], c["backend_name"]) for c in calls] == [
        ("server-app", "client-app", 3, "ray")
    ]
    assert "another warning during the run" in kept.lines
    deprecations = [line for line in kept.lines if "`run_simulation` function is deprecated" in line]
    assert len(deprecations) == 1 and "logged after the call" in deprecations[0]  # the filter is gone after the call


def test_cli_stops_on_an_impossible_client_split_before_ray_starts(tmp_path: Path) -> None:
    """100 Dirichlet clients of the 1,297 digits training images cannot each get 10: found by a
    100-client run in which every client failed in round 1 and the run printed an empty table.
    Now one line and exit 2, before Ray starts."""
    from tests.process_cleanup import ProcessScope, describe

    scope = ProcessScope()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "abd_fl.cli", "simulation.num_clients=100", f"output_dir={tmp_path / 'out'}"],
            cwd=ROOT, env=scope.env(), capture_output=True, text=True, timeout=120,
        )
    finally:
        survivors = scope.stop()
    assert survivors == [], describe(survivors)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    assert "Traceback" not in output and "Starting Flower" not in output, output[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith(
        "abd-fl: config error: simulation.num_clients=100 with partition=dirichlet: dirichlet partitioning could not give "
        "each of 100 partitions at least 10 samples"), errors
