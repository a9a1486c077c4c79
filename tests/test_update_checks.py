"""Update checks (issue 15, item 2): an update out of line with the round's others is flagged,
logged with its node and figure, and kept, rejected or clipped per config; a size cap on a
reply. Real Messages through ``DataFreeKD.aggregate_train``."""

from __future__ import annotations

import math

import logging

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from torch import nn

from abd_fl.config import ConfigError, validate_config
from abd_fl.distill import DistillResult
from abd_fl.paths import compose_config
from abd_fl.settings.strategy import UpdateCheckSettings
from strategies.datafree_kd import DataFreeKD, RoundOutcome, make_base_strategy
from strategies.update_checks import check_updates

pytestmark = pytest.mark.usefixtures("server_task_identity")

NODES = list(range(1, 7))
SCALED = 6  # node 6 sends w_global + 20 x its update (model replacement)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))


def global_state() -> dict[str, torch.Tensor]:
    return model().state_dict()


def update(node: int) -> dict[str, torch.Tensor]:
    """The global model plus a random direction of norm 0.2 x (1 + 0.05 node): benign updates
    of similar size, and the scaled node's 20 x larger."""
    g = torch.Generator().manual_seed(node)
    ref = global_state()
    noise = {k: torch.randn(v.shape, generator=g) for k, v in ref.items() if v.is_floating_point()}
    norm = float(sum((n ** 2).sum() for n in noise.values()) ** 0.5)
    size = 0.2 * (1 + 0.05 * node) * (20.0 if node == SCALED else 1.0)
    return {k: v + size / norm * noise[k] if k in noise else v for k, v in ref.items()}


def reply(node: int, extra_metric: list[float] | None = None) -> Message:
    instruction = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type=MessageType.TRAIN)
    metrics = {"num-examples": 10}
    if extra_metric is not None:
        metrics["padding"] = extra_metric
    return Message(RecordDict({"arrays": ArrayRecord(update(node)), "metrics": MetricRecord(metrics)}), reply_to=instruction)


def distance(state: dict[str, torch.Tensor]) -> float:
    ref = global_state()
    return float(sum(((state[k] - ref[k]).double() ** 2).sum() for k in ref if ref[k].is_floating_point()) ** 0.5)


def one_round(settings: UpdateCheckSettings, replies: list[Message] | None = None) -> tuple[list[dict], RoundOutcome]:
    taught: list[list[nn.Module]] = []

    def distill_fn(arm: str, ts: list[nn.Module], student: nn.Module, rnd: int) -> DistillResult:
        taught.append(ts)
        return DistillResult(wall_s=0.0, defense_s=0.0)

    outcomes: list[RoundOutcome] = []
    strategy = DataFreeKD(make_base_strategy("fedavg", {}, len(NODES), 1.0), model, model, distill_fn, mode="multi_round",
                          on_round=outcomes.append, update_check=settings)

    class FakeGrid:  # configure_train only needs the nodes; the round's global model is what we pass
        def get_node_ids(self):
            return NODES

    strategy.configure_train(1, ArrayRecord(global_state()), ConfigRecord(), FakeGrid())  # type: ignore[arg-type]
    strategy.aggregate_train(1, replies if replies is not None else [reply(n) for n in NODES])
    return [t.state_dict() for t in taught[0]], outcomes[0]


def test_a_scaled_update_is_flagged_and_logged_with_its_node_and_figure(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="abd_fl"):
        states, outcome = one_round(UpdateCheckSettings(action="keep"))
    assert [f.node_id for f in outcome.update_flags] == [SCALED] and outcome.update_flags[0].action == "keep"
    assert outcome.update_flags[0].figure == pytest.approx(distance(update(SCALED)), rel=1e-5)
    assert outcome.update_flags[0].z > 3.5 and len(states) == len(NODES) and outcome.rejected == []
    # every teacher's facts carry its figure and z-score (teacher_info in metrics.jsonl)
    by_node = {i["node_id"]: i for i in outcome.teacher_info}
    assert by_node[SCALED]["update_z"] == pytest.approx(outcome.update_flags[0].z, abs=1e-3)
    assert all("update_figure" in i and i["update_z"] <= 3.5 for n, i in by_node.items() if n != SCALED)
    assert any(f"node {SCALED}'s update is out of line: distance" in r.message and "kept" in r.message for r in caplog.records)


def test_reject_drops_it_and_the_round_goes_on() -> None:
    states, outcome = one_round(UpdateCheckSettings(action="reject"))
    assert len(states) == len(NODES) - 1 and [n for n, _ in outcome.rejected] == [SCALED]
    assert "out of line (robust z" in outcome.rejected[0][1]
    assert all(distance(s) < 0.5 * distance(update(SCALED)) for s in states)


def test_clip_puts_the_update_on_the_flag_line_and_keeps_its_direction() -> None:
    states, outcome = one_round(UpdateCheckSettings(action="clip"))
    figures = sorted(distance(update(n)) for n in NODES)
    median = float(np.median(figures))
    mad = float(np.median(np.abs(np.array(figures) - median)))
    clipped = [s for s in states if distance(s) > max(distance(update(n)) for n in NODES if n != SCALED)]
    assert len(states) == len(NODES) and len(clipped) == 1
    assert distance(clipped[0]) == pytest.approx(median + 3.5 * 1.4826 * mad, rel=1e-4)
    ref, raw = global_state(), update(SCALED)
    for k in ref:  # the same direction, shorter
        if ref[k].is_floating_point():
            d_new, d_old = (clipped[0][k] - ref[k]).flatten(), (raw[k] - ref[k]).flatten()
            assert torch.nn.functional.cosine_similarity(d_new, d_old, dim=0) > 0.999
        else:
            assert torch.equal(clipped[0][k], raw[k])  # integer buffers untouched


def test_no_flag_without_an_outlier_or_with_too_few_replies() -> None:
    replies = [reply(n) for n in NODES if n != SCALED]
    _, outcome = one_round(UpdateCheckSettings(action="reject"), replies)
    assert outcome.update_flags == [] and outcome.rejected == []
    checked = check_updates([reply(1), reply(SCALED)], ArrayRecord(global_state()), UpdateCheckSettings(action="reject"), 1)
    assert len(checked.replies) == 2 and checked.rejected == [] and checked.flags == [] and checked.figures == {}


def test_the_norm_metric_flags_by_the_arrays_own_norm() -> None:
    replies = [reply(n) for n in NODES]
    checked = check_updates(replies, None, UpdateCheckSettings(action="keep", metric="norm"), 1)
    kept, flags = checked.replies, checked.flags
    assert len(kept) == len(NODES) and [f.node_id for f in flags] == [SCALED]
    norm = float(sum((v.double() ** 2).sum() for v in update(SCALED).values() if v.is_floating_point()) ** 0.5)
    assert flags[0].figure == pytest.approx(norm, rel=1e-5)
    # every reply's figure and z-score is reported, flagged or not; only the scaled one is over the line
    assert set(checked.figures) == set(NODES) and checked.figures[SCALED] == pytest.approx((flags[0].figure, flags[0].z), rel=1e-5)
    assert all(z <= 3.5 for node, (_, z) in checked.figures.items() if node != SCALED)


def test_a_reply_over_the_size_cap_is_rejected_unread() -> None:
    big = reply(3, extra_metric=[0.0] * 200_000)  # ~1.6 MB of metrics
    replies = [reply(n) for n in NODES if n != 3] + [big]
    _, outcome = one_round(UpdateCheckSettings(action="keep", max_reply_mb=1.0), replies)
    assert [n for n, _ in outcome.rejected] == [3] and "exceeds strategy.update_check.max_reply_mb=1.0" in outcome.rejected[0][1]


@pytest.mark.parametrize(
    "override, message",
    [
        ("strategy.update_check.action=drop", "unknown strategy.update_check.action 'drop'; choose one of: off, keep, reject, clip"),
        ("strategy.update_check.metric=cosine", "unknown strategy.update_check.metric 'cosine'; choose one of: distance, norm"),
        ("strategy.update_check.threshold=0", "strategy.update_check.threshold must be > 0, got 0.0"),
        ("strategy.update_check.min_replies=2", "strategy.update_check.min_replies must be an integer >= 3, got 2"),
        ("strategy.update_check.max_reply_mb=-1", "strategy.update_check.max_reply_mb must be null or > 0, got -1.0"),
    ],
)
def test_bad_update_check_settings_are_one_line_errors(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.") + "$"):
        validate_config(compose_config([override]))


def test_replies_of_equal_size_flag_nothing_and_report_a_null_z() -> None:
    """A MAD of zero (every update the same size, here none at all) flags nothing; the figures
    are still reported, with z NaN (written as null in metrics.jsonl)."""
    def same(node: int) -> Message:
        instruction = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type=MessageType.TRAIN)
        return Message(RecordDict({"arrays": ArrayRecord(global_state()), "metrics": MetricRecord({"num-examples": 10})}),
                       reply_to=instruction)

    checked = check_updates([same(n) for n in NODES], ArrayRecord(global_state()), UpdateCheckSettings(action="reject"), 1)
    assert len(checked.replies) == len(NODES) and checked.flags == [] and checked.rejected == []
    assert set(checked.figures) == set(NODES)
    assert all(fig == 0.0 and math.isnan(z) for fig, z in checked.figures.values())
