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

pytestmark = pytest.mark.usefixtures("server_task_identity")

SHAPE = (1, 8, 8)


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
        (lambda: reply(1, good_arrays(1), {"partition-id": 1, "malicious": 0}), "lacks 'num-examples'"),
        (lambda: reply(1, good_arrays(1), {"num-examples": 10, "partition-id": [1]}), "partition-id must be a number"),
        (lambda: reply(1, good_arrays(1), {"num-examples": 10, "malicious": [0, 1]}), "malicious must be a number"),
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


def test_the_aggregate_and_the_teachers_do_not_depend_on_the_replies_arrival_order() -> None:
    """A resumed run must add the replies in the same order as an uninterrupted one: the
    base's weighted sum is taken in partition order, so it is bit-identical either way."""
    seen: list = []

    def record(arm, teachers, student, rnd):
        seen.append(({k: v.clone() for k, v in student.state_dict().items()}, [t.state_dict()[FIRST_WEIGHT] for t in teachers]))
        return _distill_fn(arm, teachers, student, rnd)

    strategy = DataFreeKD(FedAvg(fraction_evaluate=0.0), lambda: model(0), lambda: model(0), record, mode="multi_round")
    # node ids in another order than partition ids; partition 2 claimed by two nodes (ordered by node id)
    nodes = {0: 50, 1: 7, 2: 33, 3: 2, 4: 41, 5: 19, 6: 12}
    parts = {0: 0, 1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 2}
    made = {k: reply(nodes[k], good_arrays(k + 1), {"num-examples": 7 + 13 * k, "partition-id": parts[k], "malicious": 0})
            for k in nodes}
    for order in ([0, 1, 2, 3, 4, 5, 6], [5, 3, 6, 1, 4, 0, 2], [6, 2, 4, 0, 5, 1, 3]):
        strategy.aggregate_train(1, [made[k] for k in order])
    (first, first_teachers), *others = seen
    for start, teachers in others:
        assert all(torch.equal(start[k], first[k]) for k in first)
        assert all(torch.equal(a, b) for a, b in zip(teachers, first_teachers))


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


# ---- stock client replies (issue 14) --------------------------------------------------


def _no_distill(arm, teachers, student, rnd):
    from abd_fl.distill import DistillResult

    return DistillResult(wall_s=0.0, defense_s=0.0)


def test_stock_replies_without_partition_id_or_malicious_are_used(caplog) -> None:
    """Every stock ClientApp replies with its arrays and ``num-examples`` only."""
    seen = []
    strategy = DataFreeKD(FedAvg(fraction_evaluate=0.0), lambda: model(0), lambda: model(0), _no_distill, on_round=seen.append)
    replies = [reply(n, good_arrays(n), {"num-examples": 10 * n, "train-loss": 0.5}) for n in (3, 1, 2)]
    with caplog.at_level("INFO", logger="abd_fl"):
        arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics["num-rejected"] == 0
    info = seen[0].teacher_info
    assert [i["node_id"] for i in info] == [1, 2, 3]  # no partition ids: ordered by node id
    assert all(i["partition_id"] is None and i["malicious"] is None for i in info)
    assert [i["num_examples"] for i in info] == [10, 20, 30]
    notes = [r for r in caplog.records if "partition-id" in r.getMessage() or "malicious" in r.getMessage()]
    assert len(notes) == 1, [r.getMessage() for r in caplog.records]  # one line for the round, not one per reply


def test_detection_auc_is_reported_only_when_every_reply_says_whether_it_was_malicious() -> None:
    from abd_fl.distill import DistillResult
    from strategies.server_app import detection_report

    teachers = [{"tail_ratio": r, "mean_score": -r, "tail_class_share": 0.5, "found": False} for r in (0.1, 0.5, 0.2)]
    results = {"abd_student": DistillResult(wall_s=0.0, defense_s=0.0, defense_report={"teachers": teachers})}
    known = detection_report(results, [False, True, False])
    assert known["abd_student"]["auc_tail_ratio"] == 1.0 and known["abd_student"]["tail_ratio"] == [0.1, 0.5, 0.2]
    unknown = detection_report(results, [None, True, False])
    assert unknown["abd_student"]["tail_ratio"] == [0.1, 0.5, 0.2]
    assert all(unknown["abd_student"][k] is None for k in ("auc_tail_ratio", "auc_neg_mean_score", "auc_tail_class_share"))


def test_the_base_strategys_weight_key_is_required_instead_of_num_examples() -> None:
    seen = []
    base = FedAvg(fraction_evaluate=0.0, weighted_by_key="n-samples")
    strategy = DataFreeKD(base, lambda: model(0), lambda: model(0), _no_distill, mode="multi_round", on_round=seen.append)
    replies = [
        reply(1, good_arrays(1), {"n-samples": 1.0}),
        reply(2, good_arrays(2), {"n-samples": 3.0}),
        reply(3, good_arrays(3), {"num-examples": 10}),  # lacks the base's weight
        reply(4, good_arrays(4), {"n-samples": 0.0}),  # weight must be positive
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics["num-rejected"] == 2
    reasons = dict(seen[0].rejected)
    assert "n-samples" in reasons[3] and "n-samples" in reasons[4]
    expected = (model(1).state_dict()[FIRST_WEIGHT] * 1 + model(2).state_dict()[FIRST_WEIGHT] * 3) / 4
    assert torch.allclose(seen[0].aggregated.state_dict()[FIRST_WEIGHT], expected, atol=1e-6)
    assert reply_problem(reply(1, good_arrays(1), {"n-samples": 2}), REF, weight_key="n-samples") is None
    assert "num-examples" in reply_problem(reply(1, good_arrays(1), {"n-samples": 2}), REF)


# ---- delegation to the base (issue 14) ------------------------------------------------


class NodesGrid:
    """The part of a Grid that the strategies' configure_* use: the connected node ids."""

    def __init__(self, nodes) -> None:
        self.nodes = list(nodes)

    def get_node_ids(self):
        return list(self.nodes)


def test_client_side_evaluation_is_delegated_to_the_base() -> None:
    import random

    from flwr.app import MessageType

    def base():
        return FedAvg(fraction_evaluate=1.0, min_evaluate_nodes=1, min_available_nodes=1)

    strategy = DataFreeKD(base(), lambda: model(0), lambda: model(0), _no_distill, mode="multi_round")
    grid, arrays = NodesGrid([4, 5, 6]), good_arrays(0)
    random.seed(0)
    ours = list(strategy.configure_evaluate(2, arrays, ConfigRecord({"k": 1}), grid))
    random.seed(0)
    theirs = list(base().configure_evaluate(2, arrays, ConfigRecord({"k": 1}), grid))
    assert [m.metadata.dst_node_id for m in ours] == [m.metadata.dst_node_id for m in theirs] and len(ours) == 3
    assert all(m.metadata.message_type == MessageType.EVALUATE for m in ours)
    assert dict(ours[0].content["config"]) == {"k": 1, "server-round": 2}
    replies = [
        Message(RecordDict({"metrics": MetricRecord({"num-examples": 10 * n, "eval-acc": 0.1 * n})}), reply_to=m)
        for n, m in enumerate(ours, 1)
    ]
    aggregated = strategy.aggregate_evaluate(2, replies)
    assert aggregated is not None and dict(aggregated) == dict(base().aggregate_evaluate(2, replies))
    # the bases the runs build evaluate on the server only
    off = DataFreeKD(make_base_strategy("fedavg", {}, 3, 1.0), lambda: model(0), lambda: model(0), _no_distill)
    assert list(off.configure_evaluate(1, arrays, ConfigRecord(), grid)) == [] and off.aggregate_evaluate(1, []) is None


def test_summary_is_delegated_to_the_base() -> None:
    calls = []
    base = FedAvg(fraction_evaluate=0.0)
    base.summary = lambda: calls.append("base")
    DataFreeKD(base, lambda: model(0), lambda: model(0), _no_distill).summary()
    assert calls == ["base"]


def test_stock_replies_through_the_server_app(tmp_path) -> None:
    """The real ServerApp (``run_server``) and ClientApp (``train``) on an in-memory grid, the
    replies stripped of ``partition-id`` / ``malicious`` as a stock ClientApp sends them: the
    round is recorded, without the malicious / benign roles and with None detection AUCs."""
    import json
    import random

    from flwr.app import Context

    from abd_fl.paths import compose_config
    from clients.client_app import train
    from strategies.server_app import run_server

    class Grid(NodesGrid):
        def send_and_receive(self, messages, *, timeout=None):
            replies = []
            for msg in messages:
                node = msg.metadata.dst_node_id
                context = Context(run_id=1, node_id=node, node_config={"partition-id": node - 10}, state=RecordDict(), run_config={})
                out = train(msg, context)
                metrics = out.content["metrics"]
                out.content["metrics"] = MetricRecord({k: v for k, v in metrics.items() if k not in ("partition-id", "malicious")})
                replies.append(out)
            return replies

    cfg = compose_config(["experiment=tiny", "strategy=fedmedian", "clean_kd_reference.enabled=false", f"output_dir={tmp_path}"])
    random.seed(0)
    summary = run_server(Grid([10, 11, 12]), cfg)
    assert {"abd_student", "dfkd_student", "ensemble", "fedavg"} <= set(summary)
    assert "malicious_teacher" not in summary and "benign_teachers" not in summary
    rec = json.loads((tmp_path / "latest" / "metrics.jsonl").read_text().splitlines()[0])
    assert rec["round"] == 1 and rec["rejected"] == [] and rec["attackers"] is None
    assert [i["node_id"] for i in rec["teacher_info"]] == [10, 11, 12]
    detection = rec["detection"]["abd_student"]
    assert len(detection["tail_ratio"]) == 3 and detection["auc_tail_ratio"] is None
