"""Strategy presets (`strategy=<name>`): each selects its FL algorithm's mode, base strategy
and distill group, and the user can still override the distill group."""

from __future__ import annotations

import pytest
from flwr.serverapp.strategy import FedAvg

from abd_fl.config import ConfigError, validate_config
from abd_fl.experiment import distill_arms, fedgen_settings, strategy_name
from abd_fl.paths import compose_config
from strategies.datafree_kd import DataFreeKD

PRESETS = {
    # name: (mode, base, distill synthesizer chosen by the preset)
    "dense": ("one_shot", "fedavg", "dense"),
    "fedftg": ("multi_round", "fedavg", "dense"),
    "feddf": ("multi_round", "fedavg", "ood"),
    "fedgen": ("multi_round", "fedavg", "zskt"),  # FedGen keeps the default group (its defended arms' repair)
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_each_preset_selects_its_mode_base_and_synthesizer(name: str) -> None:
    mode, base, synthesizer = PRESETS[name]
    cfg = compose_config([f"strategy={name}"])
    validate_config(cfg)
    assert strategy_name(cfg) == name
    assert (cfg["strategy"]["mode"], cfg["strategy"]["base"], cfg["distill"]["synthesizer"]) == (mode, base, synthesizer)
    assert (fedgen_settings(cfg) is not None) == (name == "fedgen")


@pytest.mark.parametrize("name", ["dense", "fedftg", "feddf"])
@pytest.mark.parametrize("order", ["after", "before"])
def test_the_user_can_still_override_the_presets_distill_group(name: str, order: str) -> None:
    overrides = [f"strategy={name}", "distill=zskt"] if order == "after" else ["distill=zskt", f"strategy={name}"]
    cfg = compose_config(overrides)
    validate_config(cfg)
    assert cfg["distill"]["synthesizer"] == "zskt" and cfg["distill"]["iterations"] == 500
    assert cfg["strategy"]["mode"] == PRESETS[name][0]


def test_an_experiment_preset_still_applies_on_top_of_a_strategy_preset() -> None:
    cfg = compose_config(["strategy=feddf", "experiment=tiny"])
    assert cfg["distill"]["synthesizer"] == "ood" and cfg["distill"]["iterations"] == 3
    assert cfg["distill"]["synthesizer_params"]["batch_size"] == 32
    assert cfg["simulation"]["num_clients"] == 3


def test_the_default_and_the_base_strategy_files_are_unchanged() -> None:
    cfg = compose_config([])
    assert strategy_name(cfg) == "fedavg" and cfg["strategy"]["mode"] == "one_shot" and cfg["distill"]["synthesizer"] == "zskt"
    for base in ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan"):
        c = compose_config([f"strategy={base}"])
        assert strategy_name(c) == base == c["strategy"]["base"] and c["distill"]["synthesizer"] == "zskt"


def test_dense_is_one_round(monkeypatch) -> None:
    from flwr.supercore.task_identity import TaskIdentity  # messages need a ServerApp's identity

    for attr, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value, raising=False)
    cfg = compose_config(["strategy=dense"])
    assert cfg["simulation"]["rounds"] == 1
    with pytest.raises(ConfigError, match="one_shot runs exactly 1 round"):
        validate_config(compose_config(["strategy=dense", "simulation.rounds=2"]))
    with pytest.raises(ConfigError, match="strategy=dense is defined by strategy.mode=one_shot"):
        validate_config(compose_config(["strategy=dense", "strategy.mode=multi_round"]))

    class Grid:
        def get_node_ids(self):
            return [1, 2, 3]

    from flwr.app import ArrayRecord, ConfigRecord

    from abd_fl.models import build_model

    def model():
        return build_model("cnn_small", 10, 1, (0.3,), (0.4,))

    strategy = DataFreeKD(FedAvg(fraction_evaluate=0.0), model, model, lambda *a: None, mode=cfg["strategy"]["mode"])
    arrays = ArrayRecord(model().state_dict())
    assert len(list(strategy.configure_train(1, arrays, ConfigRecord(), Grid()))) == 3
    assert list(strategy.configure_train(2, arrays, ConfigRecord(), Grid())) == []  # no second round


@pytest.mark.parametrize("name", ["fedftg", "feddf", "fedgen"])
def test_multi_round_presets_refuse_one_shot_mode(name: str) -> None:
    with pytest.raises(ConfigError, match=f"strategy={name} is defined by strategy.mode=multi_round"):
        validate_config(compose_config([f"strategy={name}", "strategy.mode=one_shot"]))


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("defense", ["none", "abd", "sv", "sr"])
def test_every_preset_composes_with_every_defense(name: str, defense: str) -> None:
    cfg = compose_config([f"strategy={name}", f"defense={defense}"])
    validate_config(cfg)
    roles = [arm for arm, _ in distill_arms(cfg)]
    assert roles[0] == ("dfkd_student" if defense == "none" else f"{defense}_student")


def test_fedgen_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match="bad strategy.fedgen: strategy.fedgen.steps must be an integer >= 0"):
        validate_config(compose_config(["strategy=fedgen", "strategy.fedgen.steps=-1"]))
    with pytest.raises(ConfigError, match="unknown strategy.fedgen.label_sampling 'zipf'"):
        validate_config(compose_config(["strategy=fedgen", "strategy.fedgen.label_sampling=zipf"]))
    with pytest.raises(ConfigError, match="Key 'alpha' not in 'FedGenConfig'"):  # the schema (abd_fl/settings/strategy.py)
        compose_config(["strategy=fedgen", "strategy.fedgen.alpha=1"])
    with pytest.raises(ConfigError, match="bad strategy.fedgen: .*unexpected keyword argument 'alpha'"):  # added on purpose
        validate_config(compose_config(["strategy=fedgen", "+strategy.fedgen.alpha=1"]))
    with pytest.raises(ConfigError, match="unknown strategy.name 'fedprox'"):
        validate_config(compose_config(["strategy.name=fedprox"]))


BASE_PRESETS = {
    # name: Flower Message-API class and the settings the preset gives it
    "fedavg": ("FedAvg", {}),
    "fedmedian": ("FedMedian", {}),
    "fedtrimmedavg": ("FedTrimmedAvg", {"beta": 0.2}),
    "krum": ("Krum", {"num_malicious_nodes": 2}),
    "multikrum": ("MultiKrum", {"num_malicious_nodes": 2, "num_nodes_to_select": 4}),
    "bulyan": ("Bulyan", {"num_malicious_nodes": 1}),
}


@pytest.mark.parametrize("mode", ["one_shot", "multi_round"])
@pytest.mark.parametrize("name", sorted(BASE_PRESETS))
def test_each_base_preset_builds_its_flower_strategy_in_both_modes(name: str, mode: str) -> None:
    from flwr.serverapp import strategy as fs

    from strategies.datafree_kd import make_base_strategy

    rounds = 1 if mode == "one_shot" else 2
    cfg = compose_config([f"strategy={name}", f"strategy.mode={mode}", f"simulation.rounds={rounds}", "simulation.num_clients=7"])
    validate_config(cfg)
    cls, params = BASE_PRESETS[name]
    assert cfg["strategy"]["base"] == name and cfg["strategy"]["base_params"] == params
    base = make_base_strategy(name, cfg["strategy"]["base_params"], 7, 1.0)
    assert type(base) is getattr(fs, cls) and base.fraction_evaluate == 0.0
    for key, value in params.items():
        assert getattr(base, key) == value


def test_bulyan_refuses_a_run_with_fewer_clients_than_it_needs() -> None:
    with pytest.raises(ConfigError, match=r"bulyan with num_malicious_nodes=1 needs at least 7 replies per round .* samples 6"):
        validate_config(compose_config(["strategy=bulyan"]))
    validate_config(compose_config(["strategy=bulyan", "strategy.base_params.num_malicious_nodes=0"]))
    with pytest.raises(ConfigError, match="num_malicious_nodes must be an integer"):
        validate_config(compose_config(["strategy=bulyan", "simulation.num_clients=7", "strategy.base_params.num_malicious_nodes=x"]))
