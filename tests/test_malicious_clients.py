"""Malicious clients: who attacks in which round (count / fraction / ids, fixed or per-round
pool, attack window), model-replacement scaling, the attackers' own training settings,
their config validation, and the ClientApp's reply (``malicious`` per round)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from abd_fl.attacks.schedule import AttackSchedule, malicious_count, scale_update, schedule_from_config
from abd_fl.config import ConfigError, validate_config
from abd_fl.experiment import (
    attack_schedule,
    attackers,
    build_bundle,
    build_named_model,
    client_partitions,
    malicious_ids,
)
from abd_fl.local_update import client_train_data, client_update
from abd_fl.paths import compose_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- the schedule (pure logic) ------------------------------------------------------
def test_window_start_every_and_single_shot() -> None:
    base = dict(num_clients=5, ids=(1, 3))
    assert AttackSchedule(**base).attack_rounds(4) == [1, 2, 3, 4]
    every = AttackSchedule(**base, start_round=3, every=2)
    assert every.attack_rounds(10) == [3, 5, 7, 9]
    assert every.attackers(5) == [1, 3] and every.attackers(4) == [] and every.attackers(1) == []
    assert not every.attacks(1, 2) and every.attacks(3, 7) and not every.attacks(0, 7)
    single = AttackSchedule(**base, start_round=2, every=3, single_shot=True)
    assert single.attack_rounds(10) == [2]
    assert single.by_round(3) == {1: [], 2: [1, 3], 3: []}


def test_fixed_pool_is_the_seeded_draw_every_round() -> None:
    sched = AttackSchedule(num_clients=10, count=3, seed=4)
    legacy = sorted(int(i) for i in np.random.default_rng(4 + 7919).choice(10, size=3, replace=False))
    assert all(sched.attackers(r) == legacy for r in range(1, 6))
    assert sched.ever_malicious(5) == legacy


def test_per_round_pool_is_seeded_and_changes_across_rounds() -> None:
    sched = AttackSchedule(num_clients=10, count=3, attacker_pool="per_round", seed=0)
    draws = [tuple(sched.attackers(r)) for r in range(1, 11)]
    assert all(len(d) == 3 and len(set(d)) == 3 and all(0 <= i < 10 for i in d) for d in draws)
    assert len(set(draws)) > 1  # re-sampled per round
    again = AttackSchedule(num_clients=10, count=3, attacker_pool="per_round", seed=0)
    assert [tuple(again.attackers(r)) for r in range(1, 11)] == draws  # seeded by (seed, round)
    other = AttackSchedule(num_clients=10, count=3, attacker_pool="per_round", seed=1)
    assert [tuple(other.attackers(r)) for r in range(1, 11)] != draws
    assert sched.ever_malicious(10) == sorted({i for d in draws for i in d})
    windowed = AttackSchedule(num_clients=10, count=3, attacker_pool="per_round", seed=0, start_round=2, every=3)
    assert windowed.attackers(1) == [] and windowed.attackers(2) == list(draws[1]) and windowed.attackers(5) == list(draws[4])


def test_count_fraction_and_ids() -> None:
    assert malicious_count(10, 4) == 4
    assert malicious_count(10, 4, fraction=0.25) == 3  # 2.5 rounds up; the fraction wins over the count
    assert malicious_count(6, 2, fraction=0.0) == 0 and malicious_count(6, 0, fraction=1.0) == 6
    with pytest.raises(ValueError):
        malicious_count(4, 5)
    assert schedule_from_config({"num_malicious": 1, "malicious_fraction": 0.5}, 6, 0).count == 3
    assert schedule_from_config({"num_malicious": 1, "malicious_ids": [5, 2]}, 6, 0).attackers(1) == [2, 5]
    assert schedule_from_config({"num_malicious": 2}, 6, 0).attacker_pool == "fixed"  # absent keys: defaults

    assert len(malicious_ids(compose_config(["attack.malicious_fraction=0.5"]))) == 3
    assert malicious_ids(compose_config(["attack.malicious_ids=[4,1]"])) == [1, 4]
    cfg = compose_config(["attack.attacker_pool=per_round", "strategy.mode=multi_round", "simulation.rounds=4"])
    per_round = [attackers(cfg, r) for r in range(1, 5)]
    assert all(len(a) == 2 for a in per_round) and malicious_ids(cfg) == sorted({i for a in per_round for i in a})


def test_default_config_keeps_the_previous_malicious_set() -> None:
    cfg = compose_config(["seed=3"])
    legacy = sorted(int(i) for i in np.random.default_rng(3 + 7919).choice(6, size=2, replace=False))
    assert malicious_ids(cfg) == legacy and attackers(cfg, 1) == legacy
    sched = attack_schedule(cfg)
    assert (sched.start_round, sched.every, sched.single_shot, sched.attacker_pool) == (1, 1, False, "fixed")


# ---- scaling ------------------------------------------------------------------------
def test_scale_update_is_model_replacement() -> None:
    g = {"w": torch.tensor([1.0, -2.0]), "b": torch.tensor([0.5]), "n": torch.tensor(3)}
    l = {"w": torch.tensor([3.0, 0.0]), "b": torch.tensor([1.5]), "n": torch.tensor(7)}
    out = scale_update(g, l, 5.0)
    assert torch.equal(out["w"], torch.tensor([11.0, 8.0]))  # 1 + 5*(3-1), -2 + 5*(0+2)
    assert torch.equal(out["b"], torch.tensor([5.5]))
    assert torch.equal(out["n"], torch.tensor(7))  # integer entries: the local value
    only_w = scale_update(g, l, 5.0, keys=["w"])
    assert torch.equal(only_w["b"], l["b"]) and torch.equal(only_w["w"], out["w"])
    same = scale_update(g, l, 1.0)
    assert all(same[k] is l[k] for k in l)  # scale 1: the local tensors, bit for bit
    assert torch.allclose(scale_update(g, l, 0.5)["w"], torch.tensor([2.0, -1.0]))
    with pytest.raises(ValueError, match="differ in keys"):
        scale_update(g, {"w": l["w"]}, 2.0)


# ---- config validation --------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["attack.attacker_pool=sometimes"], "unknown attack.attacker_pool 'sometimes'; choose one of: fixed, per_round"),
        (["attack.malicious_fraction=1.5"], "attack.malicious_fraction must be in [0.0, 1.0], got 1.5"),
        (["attack.malicious_fraction=0.5", "attack.malicious_ids=[1]"], "set attack.malicious_ids or attack.malicious_fraction, not both"),
        (["attack.attacker_pool=per_round", "attack.malicious_ids=[1]"], "explicit attack.malicious_ids need attacker_pool=fixed"),
        (["attack.start_round=0"], "attack.start_round must be in [1, inf], got 0"),
        (["attack.start_round=2"], "attack.start_round=2 is after the last round (simulation.rounds=1)"),
        (["attack.every=0"], "attack.every must be in [1, inf], got 0"),
        (["attack.local_epochs=-1"], "attack.local_epochs must be in [0, inf], got -1"),
        (["attack.local_lr=0"], "attack.local_lr must be a finite number > 0 or null"),
        (["attack.scale=0"], "attack.scale must be a finite number > 0 (1 = no scaling), got 0"),
        (["runner=train_teachers", "teachers.which=clients", "attack=none"], "teachers.which=clients trains one teacher per malicious client"),
        (["teachers.which=all"], "unknown teachers.which 'all'; choose one of: central, clients, both"),
        (["teachers.format=onnx"], "unknown teachers.format 'onnx'; choose one of: pt, safetensors"),
    ],
)
def test_bad_attacker_settings_fail_with_one_line(overrides: list[str], message: str) -> None:
    cfg = compose_config(overrides)
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "override, message",
    [
        ("attack.single_shot=maybe", "Value 'maybe' is not a valid bool"),
        ("attack.local_epochs=1.5", "Value '1.5' of type 'float' could not be converted to Integer"),
        ("attack.scale=big", "Value 'big' of type 'str' could not be converted to Float"),
        ("attack.malicious_ids=[1,x]", "Value 'x' of type 'str' could not be converted to Integer"),
    ],
)
def test_attacker_settings_of_a_wrong_type_are_refused_when_composing(override: str, message: str) -> None:
    """The attack group's types are its schema's (abd_fl/attacks/settings.py): one line, naming the override."""
    with pytest.raises(ConfigError) as err:
        compose_config([override])
    assert message in str(err.value) and override in str(err.value) and "\n" not in str(err.value)


def test_good_attacker_settings_pass() -> None:
    for overrides in (
        ["attack.malicious_fraction=0.5", "attack.attacker_pool=per_round"],
        ["strategy.mode=multi_round", "simulation.rounds=5", "attack.start_round=2", "attack.every=2"],
        ["strategy.mode=multi_round", "simulation.rounds=5", "attack.start_round=5", "attack.single_shot=true"],
        ["attack.local_epochs=5", "attack.local_lr=0.01", "attack.scale=6"],
        ["runner=train_teachers", "teachers.format=safetensors"],
    ):
        validate_config(compose_config(overrides))


def test_absent_attack_keys_take_their_defaults() -> None:
    """An attack config written before these keys existed still validates and runs."""
    cfg = compose_config()
    for key in ("malicious_fraction", "attacker_pool", "start_round", "every", "single_shot", "local_epochs", "local_lr", "scale", "teacher_checkpoints"):
        cfg["attack"].pop(key)
    validate_config(cfg)
    assert attackers(cfg, 1) == malicious_ids(compose_config())


# ---- the client's round of work (no Flower) -----------------------------------------
def _cfg(*extra: str) -> dict:
    return compose_config(
        ["experiment=tiny", "strategy.mode=multi_round", "simulation.rounds=3", "attack.malicious_ids=[1]", "attack.start_round=2", *extra]
    )


def test_outside_the_window_a_malicious_client_trains_on_clean_data() -> None:
    cfg = _cfg()
    bundle = build_bundle(cfg)
    clean_labels = bundle.train.labels[torch.as_tensor(client_partitions(cfg, bundle)[1])]
    data1, attacking1 = client_train_data(cfg, 1, server_round=1)
    data2, attacking2 = client_train_data(cfg, 1, server_round=2)
    assert not attacking1 and torch.equal(data1.labels, clean_labels)
    assert attacking2 and not torch.equal(data2.labels, clean_labels) and (data2.labels == 0).float().mean() > 0.4
    assert not client_train_data(cfg, 0, server_round=2)[1]


def test_attackers_own_epochs_and_scaling() -> None:
    global_state = build_named_model(_cfg(), build_bundle(_cfg()), "client").state_dict()
    params = [k for k, _ in build_named_model(_cfg(), build_bundle(_cfg()), "client").named_parameters()]

    # attack.local_epochs=0: the attacker sends the global model (even scaled), a benign client trains
    frozen = client_update(_cfg("attack.local_epochs=0", "attack.scale=4"), 1, 2, global_state)
    assert frozen.malicious and all(torch.equal(frozen.model.state_dict()[k], global_state[k]) for k in params)
    benign = client_update(_cfg("attack.local_epochs=0"), 0, 2, global_state)
    assert not benign.malicious and not torch.equal(benign.model.state_dict()[params[0]], global_state[params[0]])

    plain = client_update(_cfg(), 1, 2, global_state).model.state_dict()
    scaled = client_update(_cfg("attack.scale=3"), 1, 2, global_state).model.state_dict()
    for k in params:  # w_global + 3 * (w_local - w_global)
        assert torch.allclose(scaled[k], global_state[k] + 3 * (plain[k] - global_state[k]), atol=1e-5)
    buffers = [k for k in plain if k not in params]
    assert buffers and all(torch.equal(scaled[k], plain[k]) for k in buffers)  # BN statistics sent as they are
    outside = client_update(_cfg("attack.scale=3"), 1, 1, global_state)  # round 1: outside the window, no scaling
    assert not outside.malicious
    assert torch.equal(outside.model.state_dict()[params[0]], client_update(_cfg(), 1, 1, global_state).model.state_dict()[params[0]])


# ---- the ClientApp's reply ----------------------------------------------------------
@pytest.fixture
def task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1, raising=False)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1, raising=False)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0, raising=False)


def test_client_app_reports_malicious_per_round_and_replies_validate(task_identity) -> None:
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

    from clients.client_app import train
    from strategies.datafree_kd import state_signature
    from strategies.validation import reply_problem

    cfg = _cfg("attack.local_epochs=0", "simulation.local_epochs=0", "attack.scale=2")
    model = build_named_model(cfg, build_bundle(cfg), "client")
    flags = {}
    for server_round in (1, 2, 3):
        msg = Message(
            RecordDict(
                {
                    "arrays": ArrayRecord(model.state_dict()),
                    "config": ConfigRecord({"abd-config": json.dumps(cfg), "server-round": server_round}),
                }
            ),
            dst_node_id=7,
            message_type="train",
        )
        context = Context(run_id=1, node_id=7, node_config={"partition-id": 1}, state=RecordDict(), run_config={})
        reply = train(msg, context)
        assert reply_problem(reply, state_signature(model)) is None
        flags[server_round] = reply.content["metrics"]["malicious"]
    assert flags == {1: 0, 2: 1, 3: 1}
