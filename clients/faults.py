"""Broken replies on purpose (``fault.kind``; :class:`abd_fl.settings.faults.FaultSettings`):
what a buggy or hostile client could send, for the server's fault table (issue 15)."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict


def _first_float(arrays: ArrayRecord) -> str:
    return next(k for k in arrays.keys() if np.issubdtype(np.dtype(arrays[k].dtype), np.floating))


def break_reply(content: RecordDict, kind: str) -> RecordDict:
    """``content`` (one ArrayRecord ``arrays`` and a MetricRecord) broken as ``kind`` says.
    ``raise`` is not a reply: the ClientApp raises before it builds one."""
    name = next(iter(content.array_records.keys()))
    arrays = content.array_records[name]
    broken = ArrayRecord()
    for key in arrays.keys():
        broken[key] = arrays[key]
    key = _first_float(arrays)
    values = arrays[key].numpy()
    if kind in ("nan", "inf"):
        bad = values.copy()
        bad.flat[0] = np.nan if kind == "nan" else np.inf
        broken[key] = Array(bad)
    elif kind == "wrong_shape":
        broken[key] = Array(np.ascontiguousarray(values.reshape(-1)[:-1]))
    elif kind == "wrong_dtype":
        for k in arrays.keys():
            if np.issubdtype(np.dtype(arrays[k].dtype), np.floating):
                broken[k] = Array(arrays[k].numpy().astype(np.float64))
    elif kind == "missing_array":
        del broken[key]
    elif kind == "extra_array":
        broken["injected.extra"] = Array(np.zeros(3, dtype=np.float32))
    elif kind == "huge_norm":
        for k in arrays.keys():
            if np.issubdtype(np.dtype(arrays[k].dtype), np.floating):
                broken[k] = Array((arrays[k].numpy() * 1e6).astype(arrays[k].numpy().dtype))
    elif kind == "two_arrayrecords":
        content["arrays-2"] = ArrayRecord({key: Array(values.copy())})
        return content
    else:
        raise ValueError(f"unknown fault.kind '{kind}' for a reply")
    content[name] = broken
    return content
