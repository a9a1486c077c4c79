"""``strategies.api``: the typed Python API (``datafree_kd`` with ``ZSKT(...)``, ``defense_preset(...)``)
around a Flower strategy, without Hydra (the example app's ServerApp uses it); its settings are
the very schemas Hydra's groups extend."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from torch import nn

from abd_fl.config import ConfigError
from abd_fl.defense.settings import defense_settings
from abd_fl.distill.settings import distill_settings
from abd_fl.paths import compose_config
from abd_fl.paths import configs_dir
from strategies.api import (
    ABD_TI_PARAMS,
    DISTILL_PRESETS,
    STRATEGY_PRESETS,
    ZSKT,
    AttackSettings,
    CleanKDReferenceSettings,
    ClientResources,
    DataFreeKD,
    DatasetSettings,
    DefenseSettings,
    FedGenConfig,
    FedGenStrategySettings,
    ModelSettings,
    RunSettings,
    SimulationSettings,
    StrategySettings,
    TeachersSettings,
    ZSKTParams,
    base_strategy,
    datafree_kd,
    defense_preset,
    strategy_preset,
)

pytestmark = pytest.mark.usefixtures("server_task_identity")


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (configs_dir() / group).glob("*.yaml"))


class UserNet(nn.Module):
    """A user's own model (not from abd_fl's registry): two convs, BatchNorm, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean((2, 3)))


@pytest.mark.parametrize("defense", ["abd", "sv", "sr", "abd_ti", "none"])
def test_each_defense_preset_is_its_hydra_group(defense: str) -> None:
    """The object the API builds and the group Hydra composes are the same values (one source)."""
    hydra = compose_config([f"defense={defense}"])
    ours = asdict(defense_preset(defense, num_layers=hydra["model"]["shuffle_layers"]))
    assert ours == hydra["defense"]
    assert defense_settings(hydra["defense"]) == defense_preset(defense, num_layers=hydra["model"]["shuffle_layers"])


@pytest.mark.parametrize("distill", ["zskt", "dense", "cmi", "ood"])
def test_each_distill_class_is_its_hydra_group(distill: str) -> None:
    hydra = compose_config([f"distill={distill}"])["distill"]
    assert asdict(DISTILL_PRESETS[distill]()) == hydra
    assert distill_settings(hydra) == DISTILL_PRESETS[distill]()


@pytest.mark.parametrize("strategy", sorted(STRATEGY_PRESETS))
def test_each_strategy_preset_is_its_hydra_group(strategy: str) -> None:
    hydra = compose_config([f"strategy={strategy}"])["strategy"]
    assert asdict(STRATEGY_PRESETS[strategy]) == hydra
    preset = strategy_preset(strategy)
    assert preset == STRATEGY_PRESETS[strategy] and preset is not STRATEGY_PRESETS[strategy]
    assert preset.base_params is not STRATEGY_PRESETS[strategy].base_params  # a copy: changing it leaves the preset
    assert isinstance(preset, FedGenStrategySettings) == (strategy == "fedgen")


def test_every_strategy_file_is_a_preset() -> None:
    assert _options("strategy") == sorted(STRATEGY_PRESETS)


@pytest.mark.parametrize("attack", _options("attack"))
def test_each_attack_file_sets_its_trigger_and_the_schema_the_rest(attack: str) -> None:
    """``attack=<trigger>`` is :class:`AttackSettings` with that trigger; ``none`` poisons nothing."""
    expected = AttackSettings(poison_rate=0.0, num_malicious=0) if attack == "none" else AttackSettings(trigger=attack)
    assert compose_config([f"attack={attack}"])["attack"] == asdict(expected)


@pytest.mark.parametrize("dataset", _options("dataset"))
def test_each_dataset_file_is_its_settings(dataset: str, monkeypatch) -> None:
    monkeypatch.delenv("ABD_DATA_ROOT", raising=False)
    shipped = {"digits": DatasetSettings("digits", None, 8), "mnist5k": DatasetSettings("mnist5k", None, 28)}
    expected = shipped.get(dataset, DatasetSettings(dataset, root="data"))  # local folders: $ABD_DATA_ROOT, else data
    assert compose_config([f"dataset={dataset}"])["dataset"] == asdict(expected)


def test_the_default_groups_are_the_dataclass_defaults() -> None:
    cfg = compose_config()
    assert cfg["model"] == asdict(ModelSettings())
    assert cfg["simulation"] == asdict(SimulationSettings()) and SimulationSettings().client_resources == ClientResources()
    assert cfg["attack"] == asdict(AttackSettings()) and cfg["strategy"] == asdict(StrategySettings())
    assert cfg["dataset"] == asdict(DatasetSettings(image_size=8))
    top = asdict(RunSettings())
    assert {k: cfg[k] for k in top} == top and list(cfg)[len(cfg) - len(top):] == list(top)  # groups first, then these
    assert RunSettings().teachers == TeachersSettings() and RunSettings().clean_kd_reference == CleanKDReferenceSettings()
    assert ModelSettings(**compose_config(["model=wrn"])["model"]) == ModelSettings("wrn16_2", "wrn16_1", 5)
    assert ModelSettings(**compose_config(["model=mnist_lenet"])["model"]) == ModelSettings("lenet", "lenet_small", 1)


def test_dataset_model_and_attack_settings_build_what_they_describe() -> None:
    bundle = DatasetSettings(image_size=8).load(seed=0)
    assert bundle.train.shape == (1, 8, 8)
    student = ModelSettings(student="cnn_small").build("student", bundle.num_classes, bundle.in_channels, bundle.mean, bundle.std)
    assert student(torch.rand(2, 1, 8, 8)).shape == (2, bundle.num_classes)
    with pytest.raises(ValueError, match="unknown model role 'server'"):
        ModelSettings().build("server", 10, 1, [0.5], [0.5])
    cfg = compose_config(["attack.num_malicious=1", "seed=4"])
    schedule = AttackSettings(num_malicious=1).schedule(num_clients=6, seed=4)
    from abd_fl.experiment import malicious_ids

    assert schedule.ever_malicious(1) == malicious_ids(cfg) and len(malicious_ids(cfg)) == 1


def test_strategy_settings_build_the_flower_strategy() -> None:
    from flwr.serverapp.strategy import Krum

    krum = base_strategy("krum", num_clients=6)
    assert type(krum) is Krum and krum.num_malicious_nodes == 2
    changed = strategy_preset("fedgen", fedgen=FedGenConfig(steps=5), fraction_train=0.5)
    assert changed.fedgen.steps == 5 and changed.mode == "multi_round" and STRATEGY_PRESETS["fedgen"].fedgen.steps == 100
    assert type(base_strategy(changed, num_clients=4)) is FedAvg
    with pytest.raises(ValueError, match=r"unknown strategy setting\(s\) \['fedgen'\] for 'krum'"):
        strategy_preset("krum", fedgen=FedGenConfig())
    with pytest.raises(ValueError, match="unknown strategy 'fedprox'"):
        strategy_preset("fedprox")


def test_abd_ti_differs_from_abd_only_by_its_documented_params() -> None:
    abd, ti = asdict(defense_preset("abd").params), asdict(defense_preset("abd_ti").params)
    assert {k for k in abd if abd[k] != ti[k]} == set(ABD_TI_PARAMS)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("distill.iterations=abc", "could not be converted to Integer"),
        ("distill.synthesizer_params.nope=1", "nope"),
        ("defense.params.sr_steps=x", "could not be converted to Integer"),
        ("defense.params.sr_config.n_delta=1.5", "could not be converted to Integer"),
        ("defense.params.use_sv=maybe", "is not a valid bool"),
        ("dataset.image_size=big", "Value 'big' of type 'str' could not be converted to Integer"),
        ("dataset.imagesize=8", "Key 'imagesize' not in 'DatasetSettings'"),
        ("model.shuffle_layers=two", "Value 'two' of type 'str' could not be converted to Integer"),
        ("model.teacher=cnn", "Key 'teacher' not in 'ModelSettings'"),
        ("attack.poison_rate=half", "Value 'half' of type 'str' could not be converted to Float"),
        ("attack.poison=0.1", "Key 'poison' not in 'AttackSettings'"),
        ("strategy.fraction_train=all", "Value 'all' of type 'str' could not be converted to Float"),
        ("strategy.basis=krum", "Key 'basis' not in 'StrategySettings'"),
        ("simulation.num_clients=abc", "Value 'abc' of type 'str' could not be converted to Integer"),
        ("simulation.client_resources.tpus=1", "Key 'tpus' not in 'ClientResources'"),
        ("seed=abc", "Value 'abc' of type 'str' could not be converted to Integer"),
        ("sead=1", "Key 'sead' not in 'ConfigSchema'"),
        ("clean_kd_reference.iterations=1.5", "Value '1.5' of type 'float' could not be converted to Integer"),
        ("teachers.fmt=pt", "Key 'fmt' not in 'TeachersSettings'"),
    ],
)
def test_omegaconf_refuses_a_wrong_type_or_key_when_composing(override: str, message: str) -> None:
    """Type errors are caught by the schema at composition, before any hand-written check."""
    with pytest.raises(ConfigError, match=message) as err:
        compose_config([override])
    assert "\n" not in str(err.value) and override.split("=")[0] in str(err.value)  # one line, naming the key


def test_typed_settings_and_changes() -> None:
    z = ZSKT(iterations=7, student_steps=3, batch_size=16, synthesizer_params=ZSKTParams(batch_size=16))
    loop = z.loop_config(seed=5)
    assert (loop.iterations, loop.student_steps, loop.batch_size, loop.seed, loop.kl_reduction) == (7, 3, 16, 5, "mean")
    d = defense_preset("abd", compare_baseline=False, num_layers=2, sr_config={"n_delta": 3})
    assert d.params.num_layers == 2 and d.params.sr_config.n_delta == 3 and d.arms() == [("abd_student", "abd")]
    assert defense_preset("abd", ablation=True).arms() == [
        ("abd_student", "abd"), ("sv_student", "sv"), ("sr_student", "sr"), ("dfkd_student", "none")
    ]
    with pytest.raises(ValueError, match=r"unknown defense setting\(s\) \['nope'\]"):
        defense_preset("abd", nope=1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"defense": "nope"}, "unknown defense 'nope'"),
        ({"distill": "nope"}, "unknown distill 'nope'"),
        ({"distill": ZSKT(iterations=-1)}, "distill.iterations"),
        ({"distill": ZSKT(synthesizer_params=ZSKTParams(student_bn="both"))}, "unknown zskt student_bn 'both'"),
        ({"defense": DefenseSettings(name="sv2")}, "unknown defense 'sv2'"),
        ({"image_shape": (8, 8)}, "image_shape"),
        ({"device": "tpu"}, "unknown device"),
        ({"mode": "often"}, "unknown DataFreeKD mode"),
    ],
)
def test_bad_settings_fail_when_built(kwargs: dict, message: str) -> None:
    args = {"image_shape": (1, 8, 8), **kwargs}
    with pytest.raises(ValueError, match=message):
        datafree_kd(FedAvg(), UserNet, **args)


def test_a_bad_abd_value_fails_when_built() -> None:
    with pytest.raises(ValueError, match="defense.num_layers must be an integer >= 1, got 0"):
        datafree_kd(FedAvg(), UserNet, (1, 8, 8), defense=defense_preset("abd", num_layers=0))


def test_a_round_of_stock_replies_with_a_user_model(one_torch_thread) -> None:
    """Stock replies (arrays, num-examples, train-loss) of a user's model: FedAvg aggregates,
    ABD's student and the undefended one are distilled, the global model is ABD's."""
    seen = []
    strategy = datafree_kd(
        FedAvg(fraction_evaluate=0.0),
        UserNet,
        (1, 8, 8),
        distill=ZSKT(iterations=3, student_steps=1, batch_size=16, synthesizer_params=ZSKTParams(batch_size=16)),
        defense=defense_preset("abd", compare_baseline=True),
        device="cpu",
        on_round=seen.append,
    )
    assert isinstance(strategy, DataFreeKD) and strategy.arms == ("abd_student", "dfkd_student")
    assert strategy.mode == "multi_round"
    replies = []
    for node in (1, 2, 3):
        torch.manual_seed(node)
        instruction = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type=MessageType.TRAIN)
        content = RecordDict({"arrays": ArrayRecord(UserNet().state_dict()), "metrics": MetricRecord({"num-examples": 10 * node, "train-loss": 1.0})})
        replies.append(Message(content, reply_to=instruction))
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics["num-rejected"] == 0
    (outcome,) = seen
    assert sorted(outcome.students) == ["abd_student", "dfkd_student"] and len(outcome.teachers) == 3
    assert outcome.distill_results["abd_student"].defense_report  # ABD ran
    global_state = arrays.to_torch_state_dict()
    for key, value in outcome.students["abd_student"].state_dict().items():
        assert torch.equal(global_state[key], value), key


def test_generator_width_sizes_every_generator_and_is_ignored_without_one() -> None:
    from abd_fl.distill.settings import CMI, DENSE, OOD

    for cls in (ZSKT, DENSE, CMI):
        assert cls(generator_width=8).build_synthesizer().ngf == 8, cls.synthesizer
        assert cls().build_synthesizer().ngf == 64, cls.synthesizer  # the reference's width by default
    OOD(generator_width=8).build_synthesizer()  # no generator: nothing to size, no error
    assert compose_config(["experiment=mnist_central"])["distill"]["generator_width"] == 32
