"""Injected faults (issue 15, item 3): each broken reply a client can send is what the server
rejects (or flags), with real Messages; a run where half the clients fail every round completes."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from torch import nn

from abd_fl.config import ConfigError, validate_config
from abd_fl.paths import compose_config
from abd_fl.settings.faults import FAULT_KINDS, FaultSettings
from abd_fl.settings.strategy import UpdateCheckSettings
from clients.faults import break_reply
from strategies.datafree_kd import state_signature
from strategies.update_checks import check_updates
from strategies.validation import split_valid_replies
from tests.process_cleanup import run_simulation_cli

pytestmark = pytest.mark.usefixtures("server_task_identity")


def model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))


def reply(node: int, kind: str | None = None) -> Message:
    instruction = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type=MessageType.TRAIN)
    content = RecordDict({"arrays": ArrayRecord(model(node).state_dict()), "metrics": MetricRecord({"num-examples": 10})})
    if kind is not None:
        content = break_reply(content, kind)
    return Message(content, reply_to=instruction)


@pytest.mark.parametrize("kind, reason", [
    ("nan", "non-finite values"),
    ("inf", "non-finite values"),
    ("wrong_shape", "has shape"),
    ("wrong_dtype", "has dtype float64, expected float32"),
    ("missing_array", "missing ['0.weight']"),
    ("extra_array", "unexpected ['injected.extra']"),
    ("two_arrayrecords", "expected exactly 1 ArrayRecord, got 2"),
])
def test_each_broken_reply_is_rejected_with_its_reason(kind: str, reason: str) -> None:
    replies = [reply(1), reply(2, kind), reply(3)]
    valid, rejected = split_valid_replies(replies, state_signature(model()), 1)
    assert len(valid) == 2 and [n for n, _ in rejected] == [2] and reason in rejected[0][1]


def test_a_huge_norm_reply_is_valid_but_out_of_line() -> None:
    replies = [reply(n) for n in range(1, 6)] + [reply(6, "huge_norm")]
    valid, rejected = split_valid_replies(replies, state_signature(model()), 1)
    assert len(valid) == 6 and rejected == []
    checked = check_updates(valid, None, UpdateCheckSettings(action="reject", metric="norm"), 1)
    kept, out, flags = checked.replies, checked.rejected, checked.flags
    assert [f.node_id for f in flags] == [6] and [n for n, _ in out] == [6] and len(kept) == 5


def test_who_is_faulty() -> None:
    every = FaultSettings(kind="nan", partition_ids=[1])
    assert every.faulty(1, 3, 6, 0) and not every.faulty(0, 3, 6, 0)
    assert not FaultSettings(kind="nan", partition_ids=[1], rounds=[2]).faulty(1, 3, 6, 0)
    half = FaultSettings(kind="raise", fraction=0.5)
    for rnd in (1, 2, 3):
        chosen = [p for p in range(6) if half.faulty(p, rnd, 6, seed=0)]
        assert len(chosen) == 3 and chosen == [p for p in range(6) if half.faulty(p, rnd, 6, seed=0)]
    assert not FaultSettings().faulty(0, 1, 6, 0) and set(FAULT_KINDS) >= {"none", "raise", "huge_norm"}


@pytest.mark.parametrize("override, message", [
    ("fault.kind=explode", "unknown fault.kind 'explode'; choose one of: none, nan"),
    ("fault.partition_ids=[9]", "fault.partition_ids must be partition ids in [0, 5], got [9]"),
    ("fault.fraction=2", "fault.fraction must be in [0, 1], got 2.0"),
])
def test_bad_fault_settings_are_one_line_errors(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate_config(compose_config([override]))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_run_with_half_the_clients_failing_every_round_completes(tmp_path) -> None:
    run = run_simulation_cli(
        ["experiment=tiny", "simulation.num_clients=4", "strategy.mode=multi_round", "simulation.rounds=2",
         "defense=none", "clean_kd_reference.enabled=false", "fault.kind=raise", "fault.fraction=0.5"],
        tmp_path / "out",
    )
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rounds = [r for r in records if "round" in r]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert len(r["teacher_info"]) == 2  # the two clients that did not fail taught
        assert 0.0 <= r["dfkd_student"]["acc"] <= 1.0


@pytest.fixture(scope="module")
def faults_bench():
    from tests.benchmark_modules import benchmark_module

    yield from benchmark_module("faults")


def test_every_fault_table_case_is_a_valid_config(faults_bench) -> None:
    assert {"nan", "inf", "wrong_shape", "wrong_dtype", "missing_array", "extra_array", "two_arrayrecords", "huge_norm",
            "raise_one", "raise_half", "scaled_x5"} <= set(faults_bench.CASES)
    for case, overrides in faults_bench.CASES.items():
        validate_config(compose_config([*faults_bench.BASE, *overrides]))
