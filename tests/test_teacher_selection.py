"""``DataFreeKD(teachers="selected")`` (issue 15, item 1): with Krum, MultiKrum or Bulyan as
the base, only the replies the base's selection keeps teach the student; real Messages."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from torch import nn

from abd_fl.distill import DistillResult
from strategies.datafree_kd import DataFreeKD, RoundOutcome, make_base_strategy
from strategies.selection import base_selection

pytestmark = pytest.mark.usefixtures("server_task_identity")

NODES = list(range(1, 8))
ATTACKERS = {6, 7}  # their updates are scaled x20: far from the others


def model() -> nn.Module:
    return nn.Linear(4, 3)


def state(node: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(100)
    base = model().state_dict()
    g = torch.Generator().manual_seed(node)
    scale = 20.0 if node in ATTACKERS else 1.0
    return {k: v + scale * 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}


def reply(node: int) -> Message:
    instruction = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type=MessageType.TRAIN)
    metrics = MetricRecord({"num-examples": 10, "partition-id": node - 1, "malicious": int(node in ATTACKERS)})
    return Message(RecordDict({"arrays": ArrayRecord(state(node)), "metrics": metrics}), reply_to=instruction)


def run_round(base_name: str, params: dict, teachers: str) -> tuple[list[int], RoundOutcome]:
    """One round through DataFreeKD; returns the partition ids that taught and the outcome."""
    taught: list[list[nn.Module]] = []

    def distill_fn(arm: str, ts: list[nn.Module], student: nn.Module, rnd: int) -> DistillResult:
        taught.append(ts)
        return DistillResult(wall_s=0.0, defense_s=0.0)

    outcomes: list[RoundOutcome] = []
    strategy = DataFreeKD(make_base_strategy(base_name, params, len(NODES), 1.0), model, model, distill_fn,
                          mode="multi_round", on_round=outcomes.append, teachers=teachers)
    arrays, _ = strategy.aggregate_train(1, [reply(n) for n in NODES])
    assert arrays is not None
    ids = []
    for t in taught[0]:
        match = [n for n in NODES if all(torch.equal(t.state_dict()[k], v) for k, v in state(n).items())]
        assert len(match) == 1
        ids.append(match[0])
    return ids, outcomes[0]


@pytest.mark.parametrize(
    "base_name, params, n_taught",
    [
        ("krum", {"num_malicious_nodes": 2}, 1),
        ("multikrum", {"num_malicious_nodes": 2, "num_nodes_to_select": 4}, 4),
        ("bulyan", {"num_malicious_nodes": 1}, 5),  # theta = 7 - 2 f
    ],
)
def test_selected_teachers_are_the_ones_the_base_keeps(base_name: str, params: dict, n_taught: int) -> None:
    ids, outcome = run_round(base_name, params, "selected")
    assert len(ids) == n_taught and not set(ids) & ATTACKERS
    assert [i["partition_id"] + 1 for i in outcome.teacher_info] == sorted(ids)
    excluded = {i["partition_id"] + 1 for i in outcome.excluded}
    assert ATTACKERS <= excluded and excluded | set(ids) == set(NODES)
    all_ids, all_outcome = run_round(base_name, params, "all")
    assert sorted(all_ids) == NODES and all_outcome.excluded == []


def test_a_base_without_a_selection_keeps_every_teacher() -> None:
    ids, outcome = run_round("fedavg", {}, "selected")
    assert sorted(ids) == NODES and outcome.excluded == []
    assert base_selection(make_base_strategy("fedmedian", {}, 7, 1.0), [reply(n) for n in NODES]) is None


def test_selection_leaves_the_replies_for_the_base() -> None:
    replies = [reply(n) for n in NODES]
    base = make_base_strategy("bulyan", {"num_malicious_nodes": 1}, 7, 1.0)
    before = [dict(next(iter(m.content.array_records.values())).to_torch_state_dict()) for m in replies]
    kept = base_selection(base, replies)
    assert kept is not None and not {n - 1 for n in ATTACKERS} & set(kept)
    after = [dict(next(iter(m.content.array_records.values())).to_torch_state_dict()) for m in replies]
    assert all(all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(before, after))


def test_an_unknown_teacher_set_is_a_one_line_error() -> None:
    with pytest.raises(ValueError, match=r"^unknown DataFreeKD teachers 'trusted'; choose one of: all, selected$"):
        DataFreeKD(make_base_strategy("krum", {"num_malicious_nodes": 2}, 7, 1.0), model, model,
                   lambda *a: None, teachers="trusted")  # type: ignore[arg-type, return-value]


def test_the_strategy_group_carries_the_teacher_set() -> None:
    from abd_fl.config import ConfigError, validate_config
    from abd_fl.paths import compose_config

    cfg = compose_config(["strategy=krum", "strategy.teachers=selected"])
    assert cfg["strategy"]["teachers"] == "selected" and compose_config([])["strategy"]["teachers"] == "all"
    with pytest.raises(ConfigError, match=r"^unknown strategy.teachers 'some'; choose one of: all, selected$"):
        validate_config(compose_config(["strategy.teachers=some"]))
