"""Validation of client replies before anything is aggregated or distilled.

A reply must carry exactly one ArrayRecord whose keys, shapes and dtypes match the
reference model's state dict and whose values are finite, and exactly one MetricRecord
with a positive weight under the base strategy's ``weighted_by_key`` (``num-examples``
for Flower's strategies unless set otherwise). ``partition-id`` and ``malicious`` (our
ClientApp's ground truth, used to order the teachers and to score detection) are
optional, as every stock ClientApp sends neither; when present they must be numbers. A
bad reply is dropped with a log line naming the node and the reason; the round goes on
with the others.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Iterable, Mapping

import numpy as np
from flwr.app import Message

log = logging.getLogger("abd_fl")

DEFAULT_WEIGHT_KEY = "num-examples"
OPTIONAL_METRICS = ("partition-id", "malicious")


def _is_number(value: object) -> bool:
    return not isinstance(value, (list, bool)) and isinstance(value, (int, float)) and math.isfinite(value)


def reply_problem(
    msg: Message, reference: Mapping[str, tuple[tuple[int, ...], np.dtype]], weight_key: str = DEFAULT_WEIGHT_KEY
) -> str | None:
    """Why ``msg`` cannot be used (None when it is fine); ``weight_key`` is the key the base
    strategy weighs replies by (its ``weighted_by_key``)."""
    if msg.has_error():
        return f"error reply: {msg.error.reason}"
    content = msg.content
    if len(content.array_records) != 1:
        return f"expected exactly 1 ArrayRecord, got {len(content.array_records)}"
    if len(content.metric_records) != 1:
        return f"expected exactly 1 MetricRecord, got {len(content.metric_records)}"
    arrays = next(iter(content.array_records.values()))
    metrics = next(iter(content.metric_records.values()))
    if weight_key not in metrics:
        return f"MetricRecord lacks '{weight_key}' (the key the base strategy weighs replies by)"
    n = metrics[weight_key]
    if not (_is_number(n) and n > 0):
        return f"{weight_key} must be a positive number, got {n!r:.80}"
    for key in OPTIONAL_METRICS:
        if key in metrics and not _is_number(metrics[key]):
            return f"{key} must be a number when sent, got {metrics[key]!r:.80}"
    keys = set(arrays.keys())
    if keys != set(reference):
        extra, lacking = sorted(keys - set(reference)), sorted(set(reference) - keys)
        return f"array keys differ from the global model (unexpected {extra[:3]}, missing {lacking[:3]})"
    for key, (shape, dtype) in reference.items():
        arr = arrays[key]
        if tuple(arr.shape) != shape:
            return f"array '{key}' has shape {tuple(arr.shape)}, expected {shape}"
        if np.dtype(arr.dtype) != dtype:
            return f"array '{key}' has dtype {arr.dtype}, expected {dtype}"
        values = arr.numpy()
        if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
            return f"array '{key}' has non-finite values"
    return None


def split_valid_replies(
    replies: Iterable[Message],
    reference: Mapping[str, tuple[tuple[int, ...], np.dtype]],
    server_round: int,
    extra_check: Callable[[Message], str | None] | None = None,
    weight_key: str = DEFAULT_WEIGHT_KEY,
) -> tuple[list[Message], list[tuple[int, str]]]:
    """(valid replies, [(node id, reason) of rejected ones]); logs every rejection.

    ``extra_check`` (e.g. FedGen's label counts) runs on replies that pass the common checks."""
    valid, rejected = [], []
    for msg in replies:
        problem = reply_problem(msg, reference, weight_key)
        if problem is None and extra_check is not None:
            problem = extra_check(msg)
        if problem is None:
            valid.append(msg)
        else:
            node = msg.metadata.src_node_id
            log.warning("round %d: rejected reply from node %s: %s", server_round, node, problem)
            rejected.append((node, problem))
    return valid, rejected
