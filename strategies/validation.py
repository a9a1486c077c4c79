"""Validation of client replies before anything is aggregated or distilled.

A reply must carry exactly one ArrayRecord whose keys, shapes and dtypes match the
reference model's state dict and whose values are finite, and exactly one MetricRecord
with a positive ``num-examples``. A bad reply is dropped with a log line naming the node
and the reason; the round goes on with the others.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Iterable, Mapping

import numpy as np
from flwr.app import Message

log = logging.getLogger("abd_fl")

REQUIRED_METRICS = ("num-examples", "partition-id", "malicious")


def reply_problem(msg: Message, reference: Mapping[str, tuple[tuple[int, ...], np.dtype]]) -> str | None:
    """Why ``msg`` cannot be used (None when it is fine)."""
    if msg.has_error():
        return f"error reply: {msg.error.reason}"
    content = msg.content
    if len(content.array_records) != 1:
        return f"expected exactly 1 ArrayRecord, got {len(content.array_records)}"
    if len(content.metric_records) != 1:
        return f"expected exactly 1 MetricRecord, got {len(content.metric_records)}"
    arrays = next(iter(content.array_records.values()))
    metrics = next(iter(content.metric_records.values()))
    missing = [k for k in REQUIRED_METRICS if k not in metrics]
    if missing:
        return f"MetricRecord lacks {missing}"
    n = metrics["num-examples"]
    if isinstance(n, list) or not (isinstance(n, (int, float)) and math.isfinite(n) and n > 0):
        return f"num-examples must be a positive number, got {n!r}"
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
) -> tuple[list[Message], list[tuple[int, str]]]:
    """(valid replies, [(node id, reason) of rejected ones]); logs every rejection.

    ``extra_check`` (e.g. FedGen's label counts) runs on replies that pass the common checks."""
    valid, rejected = [], []
    for msg in replies:
        problem = reply_problem(msg, reference)
        if problem is None and extra_check is not None:
            problem = extra_check(msg)
        if problem is None:
            valid.append(msg)
        else:
            node = msg.metadata.src_node_id
            log.warning("round %d: rejected reply from node %s: %s", server_round, node, problem)
            rejected.append((node, problem))
    return valid, rejected
