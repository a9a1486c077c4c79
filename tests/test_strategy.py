"""DataFreeKD: reply validation (malformed / hostile replies are dropped, the round goes
on) and the data-free KD step after the base aggregation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from abd_fl.distill import DistillConfig, ZSKTSynthesizer, distill
from abd_fl.models import build_model
from strategies.datafree_kd import DataFreeKD, make_base_strategy, state_signature
from strategies.validation import reply_problem

SHAPE = (1, 8, 8)


@pytest.fixture(autouse=True)
def server_task_identity(monkeypatch):
    """Messages need the identity Flower sets in a running ServerApp process."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1, raising=False)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1, raising=False)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0, raising=False)


def model(seed: int = 0, name: str = "cnn_small"):
    torch.manual_seed(seed)
    return build_model(name, 10, 1, (0.3,), (0.4,))


def reply(node_id: int, arrays: ArrayRecord, metrics: dict | None = None, extra: dict | None = None) -> Message:
    instruction = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node_id, message_type="train")
    m = {"num-examples": 100, "partition-id": node_id, "malicious": 0} if metrics is None else metrics
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord(m), **(extra or {})})
    return Message(content, reply_to=instruction)


def good_arrays(seed: int) -> ArrayRecord:
    return ArrayRecord(model(seed).state_dict())


def with_array(seed: int, key: str, value: np.ndarray) -> ArrayRecord:
    rec = good_arrays(seed)
    rec[key] = Array(value)
    return rec


REF = state_signature(model())
FIRST_WEIGHT = next(k for k in REF if k.endswith("weight"))


def test_a_well_formed_reply_passes() -> None:
    assert reply_problem(reply(1, good_arrays(1)), REF) is None


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda: reply(1, with_array(1, FIRST_WEIGHT, np.full(REF[FIRST_WEIGHT][0], np.nan, np.float32))), "non-finite"),
        (lambda: reply(1, with_array(1, FIRST_WEIGHT, np.zeros((3, 3), np.float32))), "has shape"),
        (lambda: reply(1, with_array(1, FIRST_WEIGHT, np.zeros(REF[FIRST_WEIGHT][0], np.float64))), "dtype"),
        (lambda: reply(1, with_array(1, "backdoor.extra", np.zeros(2, np.float32))), "keys differ"),
        (lambda: reply(1, good_arrays(1), {"num-examples": 10}), "lacks"),
        (lambda: reply(1, good_arrays(1), {"num-examples": -5, "partition-id": 1, "malicious": 0}), "num-examples"),
        (lambda: reply(1, good_arrays(1), {"num-examples": float("inf"), "partition-id": 1, "malicious": 0}), "num-examples"),
        (lambda: reply(1, good_arrays(1), extra={"second": good_arrays(2)}), "exactly 1 ArrayRecord"),
    ],
)
def test_malformed_replies_are_rejected_with_a_reason(make, reason) -> None:
    problem = reply_problem(make(), REF)
    assert problem is not None and reason in problem


def _distill_fn(arm, teachers, student, server_round):
    return distill(
        teachers,
        student,
        ZSKTSynthesizer(batch_size=16),
        config=DistillConfig(iterations=2, student_steps=1, batch_size=16),
        image_shape=SHAPE,
    )


def test_bad_replies_are_dropped_and_the_round_goes_on(caplog) -> None:
    seen = []
    strategy = DataFreeKD(
        FedAvg(fraction_evaluate=0.0), lambda: model(0), lambda: model(0), _distill_fn, mode="one_shot", on_round=seen.append
    )
    replies = [
        reply(11, good_arrays(1)),
        reply(12, with_array(2, FIRST_WEIGHT, np.full(REF[FIRST_WEIGHT][0], np.inf, np.float32))),
        reply(13, good_arrays(3), {"num-examples": 50, "partition-id": 13, "malicious": 1}),
        reply(14, with_array(4, FIRST_WEIGHT, np.zeros((1,), np.float32))),
    ]
    with caplog.at_level("WARNING", logger="abd_fl"):
        arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and set(arrays.keys()) == set(REF)
    assert metrics["num-rejected"] == 2
    outcome = seen[0]
    assert [i["node_id"] for i in outcome.teacher_info] == [11, 13]
    assert [i["malicious"] for i in outcome.teacher_info] == [False, True]
    assert [n for n, _ in outcome.rejected] == [12, 14]
    assert "node 12" in caplog.text and "node 14" in caplog.text
    assert outcome.aggregated is not None and set(outcome.students) == {"dfkd_student"}


def test_a_round_with_only_bad_replies_keeps_the_global_model() -> None:
    strategy = DataFreeKD(FedAvg(fraction_evaluate=0.0), lambda: model(0), lambda: model(0), _distill_fn)
    bad = reply(5, with_array(1, FIRST_WEIGHT, np.zeros((2,), np.float32)))
    assert strategy.aggregate_train(1, [bad]) == (None, None)


def test_multi_round_student_starts_from_the_aggregate() -> None:
    starts = []

    def record_start(arm, teachers, student, rnd):
        starts.append({k: v.clone() for k, v in student.state_dict().items()})
        return _distill_fn(arm, teachers, student, rnd)

    strategy = DataFreeKD(FedAvg(fraction_evaluate=0.0), lambda: model(0), lambda: model(0), record_start, mode="multi_round")
    replies = [reply(1, good_arrays(1)), reply(2, good_arrays(2))]
    strategy.aggregate_train(1, replies)
    mean = (model(1).state_dict()[FIRST_WEIGHT] + model(2).state_dict()[FIRST_WEIGHT]) / 2
    assert torch.allclose(starts[0][FIRST_WEIGHT], mean, atol=1e-6)


def test_modes_and_base_strategies_are_validated() -> None:
    with pytest.raises(ValueError, match="unknown DataFreeKD mode 'two_shot'"):
        DataFreeKD(FedAvg(), lambda: model(0), lambda: model(0), _distill_fn, mode="two_shot")
    with pytest.raises(ValueError, match="student and client architectures must match"):
        DataFreeKD(FedAvg(), lambda: model(0), lambda: model(0, "cnn"), _distill_fn, mode="multi_round")
    with pytest.raises(ValueError, match="unknown strategy.base 'fedsgd'"):
        make_base_strategy("fedsgd", {}, 4, 1.0)
    for name in ("fedavg", "fedmedian", "fedtrimmedavg", "krum"):
        assert make_base_strategy(name, {}, 4, 1.0).fraction_evaluate == 0.0


# ---- every shipped base strategy, both modes (issue 14) -------------------------------
# FedMedian and FedTrimmedAvg pop the arrays out of the replies while they aggregate,
# Bulyan empties them too: the teachers must still be the clients' models.

BASE_PARAMS = {
    "fedavg": {},
    "fedmedian": {},
    "fedtrimmedavg": {"beta": 0.2},
    "krum": {"num_malicious_nodes": 2},
    "multikrum": {"num_malicious_nodes": 2, "num_nodes_to_select": 4},
    "bulyan": {"num_malicious_nodes": 1},  # needs 4 * 1 + 3 = 7 replies
}
NODES = list(range(1, 8))


@pytest.mark.parametrize("mode", ["one_shot", "multi_round"])
@pytest.mark.parametrize("base", sorted(BASE_PARAMS))
def test_every_base_strategy_aggregates_and_the_teachers_stay_the_client_models(base: str, mode: str) -> None:
    from abd_fl.distill import DistillResult

    seen, starts = [], []

    def record_start(arm, teachers, student, rnd):
        starts.append({k: v.clone() for k, v in student.state_dict().items()})
        return DistillResult(wall_s=0.0, defense_s=0.0)

    strategy = DataFreeKD(
        make_base_strategy(base, BASE_PARAMS[base], len(NODES), 1.0),
        lambda: model(0),
        lambda: model(0),
        record_start,
        mode=mode,
        on_round=seen.append,
    )
    arrays, metrics = strategy.aggregate_train(1, [reply(n, good_arrays(n)) for n in NODES])
    assert arrays is not None and metrics["num-rejected"] == 0
    outcome = seen[0]
    assert [i["node_id"] for i in outcome.teacher_info] == NODES
    for node, teacher in zip(NODES, outcome.teachers):
        for key, value in model(node).state_dict().items():
            assert torch.equal(teacher.state_dict()[key], value), (node, key)
    assert outcome.aggregated is not None
    stacked = np.stack([model(n).state_dict()[FIRST_WEIGHT].numpy() for n in NODES])
    if base == "fedmedian":
        assert np.allclose(outcome.aggregated.state_dict()[FIRST_WEIGHT].numpy(), np.median(stacked, axis=0))
    if mode == "multi_round":
        assert torch.equal(starts[0][FIRST_WEIGHT], outcome.aggregated.state_dict()[FIRST_WEIGHT])
