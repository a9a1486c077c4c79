"""``DataFreeKD``: server-side data-free knowledge distillation around any Flower strategy.

A wrapper in the style of Flower's differential-privacy wrappers: it delegates
configuration, aggregation, client-side evaluation and ``summary`` to ``base`` (FedAvg,
FedMedian, FedTrimmedAvg, Krum, MultiKrum, Bulyan, ...) and then distils the clients'
models (the teachers) into the global student on the server, with no training data:

- ``one_shot`` (DENSE, Zhang et al. 2022): one round; the student starts fresh.
- ``multi_round`` (FedFTG-style, Zhang et al. 2022): every round the base aggregate is the
  student's starting point and data-free KD fine-tunes it.

The distillation itself is a callable ``distill_fn(arm, teachers, student, round)``; the
caller decides the synthesizer and the defense of each *arm*. An optional
:class:`ServerExtension` adds what an FL algorithm needs beyond that (FedGen,
:mod:`strategies.fedgen`: a generator sent with the global model, label counts checked
in every reply, the generator trained after the aggregation). The first arm produces the
global model; further arms (e.g. ``abd_student``) are distilled from the same teachers
and the same starting point, side by side, for comparison. Every reply is validated
first (:mod:`strategies.validation`); a bad one is dropped and the round goes on. Stock
ClientApps' replies (arrays and the base's weight, no ``partition-id`` / ``malicious``)
are accepted. The teachers are read before the base aggregates (some bases empty the
replies' ArrayRecords). With a neutral KD step (``distill.iterations=0``, multi_round) the
wrapper returns what the base alone returns (``tests/test_strategy_peers.py``).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch import nn

from abd_fl.distill import DistillResult
from abd_fl.settings.strategy import UpdateCheckSettings
from strategies.selection import TEACHER_SETS, base_selection
from strategies.update_checks import UpdateFlag, check_updates
from strategies.validation import DEFAULT_WEIGHT_KEY, split_valid_replies

log = logging.getLogger("abd_fl")

MODES = ("one_shot", "multi_round")
DistillFn = Callable[[str, list[nn.Module], nn.Module, int], DistillResult]


@dataclass
class RoundOutcome:
    """Everything one round produced, handed to the ``on_round`` callback."""

    server_round: int
    teachers: list[nn.Module]
    teacher_info: list[dict[str, Any]]
    aggregated: nn.Module | None
    students: dict[str, nn.Module]
    distill_results: dict[str, DistillResult]
    rejected: list[tuple[int, str]]
    timings: dict[str, float] = field(default_factory=dict)
    extension: dict[str, Any] = field(default_factory=dict)
    """What the server extension reported this round (e.g. FedGen's generator training)."""
    excluded: list[dict[str, Any]] = field(default_factory=list)
    """``teachers="selected"``: the facts (``teacher_info``) of the valid replies the base's
    selection left out, which did not teach this round."""
    update_flags: list[UpdateFlag] = field(default_factory=list)
    """Replies whose update was out of line with the round's others, and what was done
    (:mod:`strategies.update_checks`)."""


class ServerExtension(Protocol):
    """Hooks of an FL algorithm on top of the base strategy and the distillation arms."""

    name: str

    def configure_train(self, server_round: int, messages: list[Message]) -> list[Message]:
        """Add the algorithm's payload to this round's train messages."""

    def reply_problem(self, msg: Message) -> str | None:
        """Why a reply that passed the common checks is still unusable (None = fine)."""

    def reply_info(self, msg: Message) -> dict[str, Any]:
        """Extra per-teacher facts from a valid reply, merged into its ``teacher_info``."""

    def after_aggregate(
        self, server_round: int, teachers: list[nn.Module], teacher_info: list[dict[str, Any]], aggregated: nn.Module | None
    ) -> dict[str, Any]:
        """Server work after the base aggregation, before the arms; returns JSON-able logs."""


def state_signature(model: nn.Module) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Key -> (shape, dtype) of a model's state dict, the reference for reply validation."""
    return {k: (tuple(v.shape), np.dtype(str(v.dtype).replace("torch.", ""))) for k, v in model.state_dict().items()}


def load_arrays(model: nn.Module, arrays: ArrayRecord) -> nn.Module:
    model.load_state_dict(arrays.to_torch_state_dict(), strict=True)
    return model


class DataFreeKD(Strategy):
    """Wrap ``base`` and replace its aggregate by a data-free-KD student (see module doc)."""

    def __init__(
        self,
        base: Strategy,
        client_model_fn: Callable[[], nn.Module],
        student_model_fn: Callable[[], nn.Module],
        distill_fn: DistillFn,
        arms: Sequence[str] = ("dfkd_student",),
        mode: str = "one_shot",
        on_round: Callable[[RoundOutcome], None] | None = None,
        extension: ServerExtension | None = None,
        teachers: str = "all",
        update_check: UpdateCheckSettings | None = None,
        first_round: int = 1,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown DataFreeKD mode '{mode}'; choose one of: {', '.join(MODES)}")
        if teachers not in TEACHER_SETS:
            raise ValueError(f"unknown DataFreeKD teachers '{teachers}'; choose one of: {', '.join(TEACHER_SETS)}")
        if not arms:
            raise ValueError("DataFreeKD needs at least one distillation arm, got none")
        self.base = base
        self.client_model_fn = client_model_fn
        self.student_model_fn = student_model_fn
        self.distill_fn = distill_fn
        self.arms = tuple(arms)
        self.mode = mode
        self.on_round = on_round
        self.extension = extension
        self.teachers = teachers
        if isinstance(first_round, bool) or not isinstance(first_round, int) or first_round < 1:
            raise ValueError(f"DataFreeKD first_round must be an integer >= 1, got {first_round!r}")
        self.first_round = first_round
        """Round number of Flower's round 1 (> 1 when a run resumes): every hook sees the run's round."""
        self.update_check = update_check or UpdateCheckSettings()
        self.update_check.validate()
        self._global: ArrayRecord | None = None  # the model the last configure_train sent
        self._sent_at: float | None = None  # when the last configure_train handed its messages to Flower
        self._reference = state_signature(client_model_fn())
        if mode == "multi_round" and state_signature(student_model_fn()) != self._reference:
            raise ValueError("multi_round mode distils into the aggregated model: student and client architectures must match")

    def run_round(self, flower_round: int) -> int:
        """The run's round number of Flower's ``flower_round`` (they differ after a resume)."""
        return flower_round + self.first_round - 1

    # ---- delegation -------------------------------------------------------------
    def summary(self) -> None:
        extra = f", extension={self.extension.name}" if self.extension is not None else ""
        log.info("DataFreeKD(mode=%s, arms=%s%s) around %s", self.mode, ", ".join(self.arms), extra, type(self.base).__name__)
        self.base.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        server_round = self.run_round(server_round)
        if self.mode == "one_shot" and server_round > 1:
            log.warning("one_shot mode: round %d skipped (clients train once)", server_round)
            return []
        if self.mode == "one_shot":
            arrays = ArrayRecord(self.client_model_fn().state_dict())  # clients start from the client architecture
        config["server-round"] = server_round  # clients' attack schedules need it, whatever the base strategy sends
        self._global = arrays
        messages = list(self.base.configure_train(server_round, arrays, config, grid))
        if self.extension is not None:
            messages = self.extension.configure_train(server_round, messages)
        self._sent_at = time.perf_counter()
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """The base's client-side evaluation of the global model (the student), unchanged.

        The bases :func:`make_base_strategy` builds have ``fraction_evaluate=0`` (our runs
        evaluate on the server, ``evaluate_fn``), so they send nothing. In one_shot mode
        with a student architecture unlike the clients', a client would get arrays its
        model does not fit."""
        return self.base.configure_evaluate(self.run_round(server_round), arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The base's aggregation of the clients' evaluation metrics, unchanged."""
        return self.base.aggregate_evaluate(self.run_round(server_round), replies)

    # ---- the data-free KD step --------------------------------------------------
    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round = self.run_round(server_round)
        t0 = time.perf_counter()
        extra_check = self.extension.reply_problem if self.extension is not None else None
        weight_key = str(getattr(self.base, "weighted_by_key", DEFAULT_WEIGHT_KEY))
        valid, rejected = split_valid_replies(list(replies), self._reference, server_round, extra_check, weight_key)
        valid = in_partition_order(valid)  # arrival order varies run to run; sums over replies must not
        checked = check_updates(valid, self._global, self.update_check, server_round)
        valid, flags = checked.replies, checked.flags
        rejected += checked.rejected
        if not valid:
            log.warning("round %d: no valid replies; the global model is unchanged", server_round)
            return None, None
        # The teachers are read before the base aggregates: FedMedian, FedTrimmedAvg and
        # Bulyan empty the replies' ArrayRecords while they aggregate.
        teachers, info = self._read_teachers(server_round, valid)
        for facts in info:  # the update check's figure of every teacher, flagged or not (before any clip; z null: MAD 0)
            if (figure := checked.figures.get(facts["node_id"])) is not None:
                facts["update_figure"], facts["update_z"] = round(figure[0], 6), round(figure[1], 3)
        excluded: list[dict[str, Any]] = []
        if self.teachers == "selected":
            teachers, info, excluded = self._selected(server_round, valid, teachers, info)
        t_read = time.perf_counter()
        agg_arrays, agg_metrics = self.base.aggregate_train(server_round, valid)
        t_agg = time.perf_counter()
        if agg_arrays is None and self.mode == "multi_round":
            # the base declined this round (e.g. Bulyan with fewer than 4 f + 3 replies): the
            # student would start from a fresh initialisation, so the global model stays, as the base's would
            log.warning(
                "round %d: %s did not aggregate; multi_round mode keeps the global model unchanged (no distillation)",
                server_round,
                type(self.base).__name__,
            )
            return None, None
        aggregated = load_arrays(self.client_model_fn(), agg_arrays).eval() if agg_arrays is not None else None

        students: dict[str, nn.Module] = {}
        results: dict[str, DistillResult] = {}
        timings = {"aggregate_s": t_agg - t_read, "read_replies_s": t_read - t0}
        if self._sent_at is not None:  # Flower + Ray + the clients' work, from the messages' hand-over to the replies'
            timings["replies_wait_s"] = t0 - self._sent_at
        extension_logs: dict[str, Any] = {}
        if self.extension is not None:
            t_ext = time.perf_counter()
            extension_logs = self.extension.after_aggregate(server_round, teachers, info, aggregated)
            timings[f"{self.extension.name}_s"] = time.perf_counter() - t_ext
        for arm in self.arms:
            student = self.student_model_fn()
            if self.mode == "multi_round" and aggregated is not None:
                student.load_state_dict(aggregated.state_dict())
            t_arm = time.perf_counter()
            results[arm] = self.distill_fn(arm, teachers, student, server_round)
            timings[f"{arm}_s"] = time.perf_counter() - t_arm
            students[arm] = student

        if self.on_round is not None:
            self.on_round(
                RoundOutcome(
                    server_round, teachers, info, aggregated, students, results, rejected, timings, extension_logs, excluded, flags
                )
            )
        primary = students[self.arms[0]]
        metrics = MetricRecord(dict(agg_metrics)) if agg_metrics is not None else MetricRecord()
        metrics["num-rejected"] = len(rejected)
        return ArrayRecord(primary.state_dict()), metrics

    def _selected(
        self, server_round: int, valid: list[Message], teachers: list[nn.Module], info: list[dict[str, Any]]
    ) -> tuple[list[nn.Module], list[dict[str, Any]], list[dict[str, Any]]]:
        """The teachers the base's selection keeps (:func:`strategies.selection.base_selection`),
        their facts, and the facts of those left out; every teacher where the base selects none."""
        kept = base_selection(self.base, valid)
        if kept is None:
            log.info("round %d: %s selects no subset of the replies; every teacher teaches", server_round, type(self.base).__name__)
            return teachers, info, []
        nodes = {int(valid[i].metadata.src_node_id) for i in kept}
        keep = [i["node_id"] in nodes for i in info]
        excluded = [i for i, k in zip(info, keep) if not k]
        log.info(
            "round %d: %d of %d teachers selected by %s; left out: %s",
            server_round, sum(keep), len(info), type(self.base).__name__,
            ", ".join(f"node {i['node_id']}" + (f" (partition {i['partition_id']})" if i["partition_id"] is not None else "")
                      for i in excluded) or "none",
        )
        return [t for t, k in zip(teachers, keep) if k], [i for i, k in zip(info, keep) if k], excluded

    def _read_teachers(self, server_round: int, valid: list[Message]) -> tuple[list[nn.Module], list[dict[str, Any]]]:
        """The client models of the valid replies and their per-teacher facts, in the replies'
        order (:func:`in_partition_order`)."""
        teachers, info = [], []
        for msg in valid:
            arrays = next(iter(msg.content.array_records.values()))
            metrics = next(iter(msg.content.metric_records.values()))
            teachers.append(load_arrays(self.client_model_fn(), arrays).eval())
            info.append(
                {
                    "node_id": int(msg.metadata.src_node_id),
                    "partition_id": int(metrics["partition-id"]) if "partition-id" in metrics else None,
                    "malicious": bool(metrics["malicious"]) if "malicious" in metrics else None,
                    # validated only when it is the base's weight: read it when it is a number
                    "num_examples": int(n) if isinstance(n := metrics.get("num-examples"), (int, float)) and math.isfinite(n) else None,
                    **({"train_s": float(s)} if isinstance(s := metrics.get("train-s"), (int, float)) and math.isfinite(s) else {}),
                    **({"label_counts": [int(c) for c in metrics["label-counts"]]} if "label-counts" in metrics else {}),
                    **(self.extension.reply_info(msg) if self.extension is not None else {}),
                }
            )
        lacking = [key for key in ("partition_id", "malicious") if any(i[key] is None for i in info)]
        if lacking:  # one line a round, however many replies lack them
            n = sum(any(i[key] is None for key in lacking) for i in info)
            log.info(
                "round %d: %d of %d replies carry no %s (stock ClientApps send neither)%s%s",
                server_round,
                n,
                len(info),
                " / ".join(k.replace("_", "-") for k in lacking),
                "; teachers ordered by node id" if "partition_id" in lacking else "",
                "; per-client detection AUC not reported" if "malicious" in lacking else "",
            )
        return teachers, info


def _partition_id(msg: Message) -> float | None:
    metrics = next(iter(msg.content.metric_records.values()), None)
    value = metrics.get("partition-id") if metrics is not None else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def in_partition_order(replies: list[Message]) -> list[Message]:
    """``replies`` ordered by (partition id, node id), or by node id alone when some reply
    carries no partition id (as stock ClientApps do), so that the teachers' order and the
    base's sums over replies do not depend on which client answered first. Partition ids are
    fixed by the federation's config, so a resumed or repeated run adds in the same order, bit
    for bit; Flower draws a simulation's node ids afresh at each start, so for stock replies
    the order holds within one run only."""
    parts = [_partition_id(m) for m in replies]
    if any(p is None for p in parts):
        return sorted(replies, key=lambda m: int(m.metadata.src_node_id))
    keyed = sorted(zip(parts, (int(m.metadata.src_node_id) for m in replies), range(len(replies))))
    return [replies[i] for _, _, i in keyed]


def make_base_strategy(name: str, params: Mapping[str, Any] | None, num_clients: int, fraction_train: float) -> Strategy:
    """Build a Flower Message-API strategy by config name (client-side evaluation off)."""
    from flwr.serverapp import strategy as fs

    bases = {
        "fedavg": fs.FedAvg,
        "fedmedian": fs.FedMedian,
        "fedtrimmedavg": fs.FedTrimmedAvg,
        "krum": fs.Krum,
        "multikrum": fs.MultiKrum,
        "bulyan": fs.Bulyan,
    }
    if name not in bases:
        raise ValueError(f"unknown strategy.base '{name}'; choose one of: {', '.join(bases)}")
    min_nodes = max(1, int(round(fraction_train * num_clients)))
    kwargs: dict[str, Any] = dict(
        fraction_train=fraction_train,
        fraction_evaluate=0.0,
        min_train_nodes=min_nodes,
        min_evaluate_nodes=0,
        min_available_nodes=num_clients,
        train_metrics_aggr_fn=_aggregate_scalar_metrics,
    )
    kwargs.update(dict(params or {}))
    try:
        return bases[name](**kwargs)
    except TypeError as err:
        raise ValueError(f"bad strategy.base_params for '{name}': {err}") from None


def _aggregate_scalar_metrics(records: list, weighted_by_key: str) -> MetricRecord:
    """Weighted mean of the scalar training metrics (list-valued ones such as label counts are summed)."""
    total = sum(float(next(iter(r.metric_records.values()))[weighted_by_key]) for r in records)
    out: dict[str, Any] = {}
    for rec in records:
        m = next(iter(rec.metric_records.values()))
        w = float(m[weighted_by_key]) / total
        for key, value in m.items():
            if key in ("partition-id", "malicious"):
                continue
            if key == weighted_by_key:
                out[key] = out.get(key, 0) + value
            elif isinstance(value, list):
                prev = out.get(key, [0] * len(value))
                out[key] = [a + b for a, b in zip(prev, value)]
            else:
                out[key] = out.get(key, 0.0) + w * float(value)
    return MetricRecord(out)
