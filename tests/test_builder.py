"""``strategies.builder.datafree_kd``: DataFreeKD with a defense around a Flower strategy from
a few keyword arguments, without Hydra (the example app's ServerApp uses it)."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from torch import nn

from abd_fl.paths import compose_config
from strategies.builder import datafree_kd, datafree_kd_config
from strategies.datafree_kd import DataFreeKD


@pytest.fixture(autouse=True)
def server_task_identity(monkeypatch):
    """Messages need the identity Flower sets in a running ServerApp process."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value, raising=False)


class UserNet(nn.Module):
    """A user's own model (not from abd_fl's registry): two convs, BatchNorm, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean((2, 3)))


@pytest.mark.parametrize("defense", ["abd", "sv", "sr", "abd_ti", "none"])
def test_defaults_are_the_hydra_groups(defense: str) -> None:
    """Unset settings come from the same files the Hydra runs compose."""
    hydra = compose_config([f"defense={defense}"])
    ours = datafree_kd_config(defense=defense, shuffle_layers=hydra["model"]["shuffle_layers"], compare_baseline=True)
    assert ours["defense"] == hydra["defense"] and ours["distill"] == hydra["distill"]


@pytest.mark.parametrize("distill", ["dense", "cmi", "ood"])
def test_each_distill_group_is_its_file(distill: str) -> None:
    assert datafree_kd_config(distill=distill)["distill"] == compose_config([f"distill={distill}"])["distill"]


def test_keyword_overrides() -> None:
    cfg = datafree_kd_config(iterations=7, student_steps=3, batch_size=16, shuffle_layers=2, seed=5)
    assert (cfg["distill"]["iterations"], cfg["distill"]["student_steps"], cfg["distill"]["batch_size"]) == (7, 3, 16)
    assert cfg["distill"]["synthesizer_params"]["batch_size"] == 16
    assert cfg["defense"]["params"]["num_layers"] == 2 and cfg["seed"] == 5 and cfg["defense"]["compare_baseline"] is False


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"defense": "nope"}, "unknown defense 'nope'"),
        ({"distill": "nope"}, "unknown distill 'nope'"),
        ({"iterations": -1}, "distill.iterations"),
        ({"shuffle_layers": 0}, "defense.num_layers"),
        ({"image_shape": (8, 8)}, "image_shape"),
        ({"device": "tpu"}, "unknown device"),
        ({"mode": "often"}, "unknown DataFreeKD mode"),
    ],
)
def test_bad_settings_fail_when_built(kwargs: dict, message: str) -> None:
    args = {"image_shape": (1, 8, 8), **kwargs}
    with pytest.raises(ValueError, match=message):
        datafree_kd(FedAvg(), UserNet, **args)


def test_a_round_of_stock_replies_with_a_user_model(one_torch_thread) -> None:
    """Stock replies (arrays, num-examples, train-loss) of a user's model: FedAvg aggregates,
    ABD's student and the undefended one are distilled, the global model is ABD's."""
    seen = []
    strategy = datafree_kd(
        FedAvg(fraction_evaluate=0.0),
        UserNet,
        (1, 8, 8),
        compare_baseline=True,
        iterations=3,
        student_steps=1,
        batch_size=16,
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
