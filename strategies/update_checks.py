"""Update checks beyond validity (issue 15, item 2): a reply out of line with the round's others.

A valid reply (:mod:`strategies.validation`) can still be hostile: a model-replacing attacker
scales its update (``attack.scale``) so that it dominates any average. Per round, each valid
reply's figure is computed,

- ``distance``: the L2 distance of its floating-point arrays from the global model the round
  sent (the update's norm; in one_shot mode the clients' common starting model), or
- ``norm``: the L2 norm of its floating-point arrays,

and its robust z-score against the round's replies, ``(figure - median) / (1.4826 * MAD)``.
A reply whose z-score exceeds ``threshold`` is flagged and logged with its node, figure and
z-score, then handled by ``action``: ``keep`` (logged only), ``reject`` (dropped, as an invalid
reply), or ``clip`` (its update scaled down so that its figure sits on the flag line,
``median + threshold * 1.4826 * MAD``). Only the large side is flagged (a tiny update harms no
average). With fewer than ``min_replies`` replies, or a MAD of zero, nothing is flagged.
Independently, a reply larger than ``max_reply_mb`` (all its records) is rejected before
anything reads its arrays.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, Message

from abd_fl.settings.strategy import UpdateCheckSettings

log = logging.getLogger("abd_fl")

MAD_SCALE = 1.4826  # MAD x this estimates the standard deviation of a normal sample


@dataclass
class UpdateFlag:
    """One flagged reply: its node, figure, robust z-score and what was done with it."""

    node_id: int
    figure: float
    z: float
    action: str

    def record(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "figure": round(self.figure, 6), "z": round(self.z, 3), "action": self.action}


@dataclass
class UpdateCheck:
    """What :func:`check_updates` decided for one round."""

    replies: list[Message]
    """The replies to use (flagged ones clipped under ``clip``; dropped under ``reject``)."""
    rejected: list[tuple[int, str]]
    """``(node id, reason)`` of the replies dropped (too large, or out of line under ``reject``)."""
    flags: list[UpdateFlag]
    """The replies out of line, and what was done with them."""
    figures: dict[int, tuple[float, float]]
    """Every checked reply's ``(figure, robust z)`` by node id, flagged or not (empty when
    nothing was computed: ``action=off``, too few replies; z is NaN when the MAD is zero)."""


def reply_bytes(msg: Message) -> int:
    """The bytes of every record in ``msg``'s content."""
    return int(sum(record.count_bytes() for record in msg.content.values()))


def _floats(arrays: ArrayRecord, keys: Sequence[str]) -> list[np.ndarray]:
    return [arrays[k].numpy().astype(np.float64, copy=False) for k in keys]


def _float_keys(arrays: ArrayRecord) -> list[str]:
    return [k for k in arrays.keys() if np.issubdtype(np.dtype(arrays[k].dtype), np.floating)]


def _figure(values: list[np.ndarray], reference: list[np.ndarray] | None) -> float:
    if reference is None:
        return float(np.sqrt(sum(float(np.sum(v * v)) for v in values)))
    return float(np.sqrt(sum(float(np.sum((v - r) ** 2)) for v, r in zip(values, reference))))


def check_updates(
    replies: list[Message], global_arrays: ArrayRecord | None, settings: UpdateCheckSettings, server_round: int
) -> UpdateCheck:
    """The replies to use, those rejected, the flags and every reply's figure for one round's
    valid replies (see the module doc). ``clip`` replaces a flagged reply's ArrayRecord by
    a scaled copy; the other replies are returned unchanged. ``global_arrays`` is the model
    the round sent (needed for ``metric="distance"``; without it the norm is used)."""
    rejected: list[tuple[int, str]] = []
    kept: list[Message] = []
    for msg in replies:  # the size cap first: a huge reply is not read
        size = reply_bytes(msg)
        if settings.max_reply_mb is not None and size > settings.max_reply_mb * 1e6:
            reason = f"reply of {size / 1e6:.1f} MB exceeds strategy.update_check.max_reply_mb={settings.max_reply_mb}"
            log.warning("round %d: rejected reply from node %s: %s", server_round, msg.metadata.src_node_id, reason)
            rejected.append((int(msg.metadata.src_node_id), reason))
        else:
            kept.append(msg)
    if settings.action == "off" or len(kept) < settings.min_replies:
        return UpdateCheck(kept, rejected, [], {})
    arrays = [next(iter(m.content.array_records.values())) for m in kept]
    keys = _float_keys(arrays[0])
    reference = None
    if settings.metric == "distance" and global_arrays is not None and set(keys) <= set(global_arrays.keys()):
        reference = _floats(global_arrays, keys)
    figures = np.array([_figure(_floats(a, keys), reference) for a in arrays])
    median = float(np.median(figures))
    spread = MAD_SCALE * float(np.median(np.abs(figures - median)))
    nodes = [int(m.metadata.src_node_id) for m in kept]
    if spread <= 0:
        return UpdateCheck(kept, rejected, [], {n: (float(f), math.nan) for n, f in zip(nodes, figures)})
    limit = median + settings.threshold * spread
    flags: list[UpdateFlag] = []
    out: list[Message] = []
    for msg, arr, fig in zip(kept, arrays, figures):
        z = (float(fig) - median) / spread
        if z <= settings.threshold:
            out.append(msg)
            continue
        node = int(msg.metadata.src_node_id)
        flags.append(UpdateFlag(node, float(fig), z, settings.action))
        what = {"keep": "kept", "reject": "rejected", "clip": f"clipped to {limit:.4g}"}[settings.action]
        log.warning(
            "round %d: node %s's update is out of line: %s %.4g, robust z %.1f > %.1f (median %.4g); %s",
            server_round, node, settings.metric if reference is not None else "norm", fig, z, settings.threshold, median, what,
        )
        if settings.action == "reject":
            rejected.append((node, f"update {settings.metric} {fig:.4g} out of line (robust z {z:.1f} > {settings.threshold})"))
            continue
        if settings.action == "clip":
            _clip(msg, arr, keys, reference, limit / float(fig))
        out.append(msg)
    return UpdateCheck(out, rejected, flags, {n: (float(f), (float(f) - median) / spread) for n, f in zip(nodes, figures)})


def _clip(msg: Message, arrays: ArrayRecord, keys: list[str], reference: list[np.ndarray] | None, factor: float) -> None:
    """Scale ``msg``'s update (its float arrays minus ``reference``, or the arrays themselves) by ``factor``."""
    values = _floats(arrays, keys)
    clipped = ArrayRecord()
    for key in arrays.keys():
        clipped[key] = arrays[key]
    for i, key in enumerate(keys):
        dtype = np.dtype(arrays[key].dtype)
        new = values[i] * factor if reference is None else reference[i] + factor * (values[i] - reference[i])
        clipped[key] = Array(np.ascontiguousarray(new.astype(dtype)))
    name = next(iter(msg.content.array_records.keys()))
    msg.content[name] = clipped
