"""Peers: ``DataFreeKD(base)`` with a neutral KD step behaves as ``base`` alone.

For every Flower Message-API base we offer, the same real ``Message`` replies (as a stock
ClientApp sends them: arrays and ``num-examples``, no ``partition-id`` / ``malicious``) go
to the base alone and to ``DataFreeKD(base, ...)`` in multi_round mode, whose KD step is
the ServerApp's own (:func:`strategies.server_app.build_distill_fn`) made neutral through
the config: ``distill.iterations=0`` leaves the student as it starts, the base aggregate.

What may differ, by design:
- the wrapper's MetricRecord adds ``num-rejected`` (replies its validation dropped; an
  error reply counts there, where the base logs it as a failure);
- arrays come back in the global model's dtypes: an integer buffer (BatchNorm's
  ``num_batches_tracked``) that Flower's arithmetic turns into float64 returns as int64,
  truncated, exactly as a client's ``load_state_dict`` would read the base's float.
"""

from __future__ import annotations

import random
from typing import Any, Callable

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from abd_fl.experiment import build_bundle, build_named_model, distill_arms
from abd_fl.paths import compose_config
from strategies.datafree_kd import DataFreeKD, load_arrays, make_base_strategy, state_signature
from strategies.server_app import build_distill_fn

pytestmark = pytest.mark.usefixtures("server_task_identity")

BASE_PARAMS = {  # the presets' settings (configs/strategy/<name>.yaml)
    "fedavg": {},
    "fedmedian": {},
    "fedtrimmedavg": {"beta": 0.2},
    "krum": {"num_malicious_nodes": 2},
    "multikrum": {"num_malicious_nodes": 2, "num_nodes_to_select": 4},
    "bulyan": {"num_malicious_nodes": 1},  # aggregates from 4 * 1 + 3 = 7 replies on
}
NODES = list(range(1, 8))
EXTRA_METRICS = {"num-rejected"}


@pytest.fixture(scope="module")
def setup(one_torch_thread) -> dict[str, Any]:
    cfg = compose_config(
        ["distill.iterations=0", "defense=none", "model.client=cnn_small", "model.student=cnn_small", "progress=false"]
    )
    bundle = build_bundle(cfg)
    assert [arm for arm, _ in distill_arms(cfg)] == ["dfkd_student"]
    return {
        "model": lambda seed=None: build_named_model(cfg, bundle, "client", seed=seed),
        "distill_fn": build_distill_fn(cfg, bundle, "cpu"),
    }


def make_pair(setup: dict[str, Any], name: str) -> tuple[Any, DataFreeKD]:
    """The base alone and DataFreeKD around an identical second instance of it."""

    def base():
        return make_base_strategy(name, BASE_PARAMS[name], len(NODES), 1.0)

    model = setup["model"]
    return base(), DataFreeKD(base(), model, model, setup["distill_fn"], mode="multi_round")


def client_arrays(setup: dict[str, Any], node: int) -> ArrayRecord:
    state = setup["model"](seed=node).state_dict()
    for key in state:
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(3 * node)  # unequal counts: Flower averages them to floats
    return ArrayRecord(state)


def train_reply(setup: dict[str, Any], node: int) -> Message:
    instruction = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type=MessageType.TRAIN)
    metrics = MetricRecord({"num-examples": 10 * node, "train-loss": 0.1 * node})
    return Message(RecordDict({"arrays": client_arrays(setup, node), "metrics": metrics}), reply_to=instruction)


def error_reply(node: int) -> Message:
    instruction = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type=MessageType.TRAIN)
    return Message(Error(code=0, reason="ClientApp raised"), reply_to=instruction)


def assert_same_arrays(ours: ArrayRecord | None, theirs: ArrayRecord | None, reference: dict) -> None:
    assert (ours is None) == (theirs is None)
    if ours is None:
        return
    assert list(ours.keys()) == list(theirs.keys())
    for key in theirs.keys():
        a, b = ours[key].numpy(), theirs[key].numpy()
        assert a.dtype == reference[key][1], key  # the global model's dtype
        if np.issubdtype(a.dtype, np.floating):
            assert b.dtype == a.dtype, key
        np.testing.assert_array_equal(a, b.astype(a.dtype), err_msg=key)


def assert_same_metrics(ours: MetricRecord | None, theirs: MetricRecord | None) -> None:
    assert (ours is None) == (theirs is None)
    if ours is not None:
        assert {k: v for k, v in ours.items() if k not in EXTRA_METRICS} == dict(theirs)


@pytest.mark.parametrize("name", sorted(BASE_PARAMS))
def test_aggregate_train_matches_the_base_alone(setup, name: str) -> None:
    base, wrapped = make_pair(setup, name)
    replies: Callable[[], list[Message]] = lambda: [train_reply(setup, n) for n in NODES] + [error_reply(99)]
    theirs = base.aggregate_train(1, replies())
    ours = wrapped.aggregate_train(1, replies())
    assert theirs[0] is not None
    assert_same_arrays(ours[0], theirs[0], state_signature(setup["model"]()))
    assert_same_metrics(ours[1], theirs[1])
    assert ours[1]["num-rejected"] == 1  # the error reply


@pytest.mark.parametrize("name", sorted(BASE_PARAMS))
def test_a_round_of_error_replies_is_skipped_alike(setup, name: str) -> None:
    base, wrapped = make_pair(setup, name)
    assert base.aggregate_train(1, [error_reply(n) for n in NODES]) == (None, None)
    assert wrapped.aggregate_train(1, [error_reply(n) for n in NODES]) == (None, None)


def test_a_round_the_base_declines_to_aggregate_keeps_the_global_model(setup) -> None:
    """Bulyan skips a round with fewer than 4 f + 3 replies; the wrapper must not replace the
    global model by a freshly initialised student then."""
    base, wrapped = make_pair(setup, "bulyan")
    assert base.aggregate_train(1, [train_reply(setup, n) for n in NODES[:3]]) == (None, None)
    assert wrapped.aggregate_train(1, [train_reply(setup, n) for n in NODES[:3]]) == (None, None)


class InMemoryGrid:
    """A Grid whose nodes are functions: ``send_and_receive`` answers each message at once,
    the replies in node order (the order DataFreeKD adds stock replies in, whatever order
    they arrive in), so the base alone sums them in the same order."""

    def __init__(self, nodes: list[int], client: Callable[[Message], Message]) -> None:
        self.nodes, self.client = list(nodes), client

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Message]:
        return [self.client(msg) for msg in sorted(messages, key=lambda m: m.metadata.dst_node_id)]


@pytest.mark.parametrize("name", sorted(BASE_PARAMS))
def test_configure_train_sends_the_same_messages(setup, name: str) -> None:
    base, wrapped = make_pair(setup, name)
    grid, arrays = InMemoryGrid(NODES, lambda m: m), client_arrays(setup, 0)
    random.seed(3)
    theirs = list(base.configure_train(2, arrays, ConfigRecord({"lr": 0.1}), grid))
    random.seed(3)
    ours = list(wrapped.configure_train(2, arrays, ConfigRecord({"lr": 0.1}), grid))
    assert [m.metadata.dst_node_id for m in ours] == [m.metadata.dst_node_id for m in theirs]
    assert sorted(m.metadata.dst_node_id for m in ours) == NODES
    for a, b in zip(ours, theirs):
        assert a.metadata.message_type == b.metadata.message_type == MessageType.TRAIN
        assert set(a.content.keys()) == set(b.content.keys()) == {"arrays", "config"}
        assert dict(a.content["config"]) == dict(b.content["config"]) == {"lr": 0.1, "server-round": 2}
        assert_same_arrays(a.content["arrays"], b.content["arrays"], state_signature(setup["model"]()))


@pytest.mark.parametrize("name", sorted(BASE_PARAMS))
def test_start_gives_the_same_result(setup, name: str) -> None:
    model = setup["model"]

    def client(msg: Message) -> Message:
        """Local 'training' that a real ClientApp would do: load, move the weights, reply."""
        node, rnd = msg.metadata.dst_node_id, int(msg.content["config"]["server-round"])
        net = load_arrays(model(), msg.content["arrays"])
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.01 * node * rnd)
        for key, buf in net.named_buffers():
            if key.endswith("num_batches_tracked"):
                buf.add_(node)
        metrics = MetricRecord({"num-examples": 10 * node, "train-loss": 1.0 / (node * rnd)})
        return Message(RecordDict({"arrays": ArrayRecord(net.state_dict()), "metrics": metrics}), reply_to=msg)

    def evaluate_fn(rnd: int, arrays: ArrayRecord) -> MetricRecord:
        net = load_arrays(model(), arrays)
        return MetricRecord({"param-sum": float(sum(p.double().sum() for p in net.parameters()))})

    results = []
    for strategy in make_pair(setup, name):
        random.seed(0)
        results.append(
            strategy.start(
                InMemoryGrid(NODES, client),
                ArrayRecord(model(seed=0).state_dict()),
                num_rounds=2,
                train_config=ConfigRecord({"lr": 0.1}),
                evaluate_fn=evaluate_fn,
            )
        )
    theirs, ours = results
    assert_same_arrays(ours.arrays, theirs.arrays, state_signature(model()))
    assert sorted(ours.train_metrics_clientapp) == sorted(theirs.train_metrics_clientapp) == [1, 2]
    for rnd in (1, 2):
        assert_same_metrics(ours.train_metrics_clientapp[rnd], theirs.train_metrics_clientapp[rnd])
    assert ours.evaluate_metrics_clientapp == theirs.evaluate_metrics_clientapp == {}
    assert {r: dict(m) for r, m in ours.evaluate_metrics_serverapp.items()} == {
        r: dict(m) for r, m in theirs.evaluate_metrics_serverapp.items()
    }
