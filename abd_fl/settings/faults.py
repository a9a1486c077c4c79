"""Typed settings of ``fault``: broken or hostile replies injected on purpose (issue 15's fault
table, ``benchmarks/faults.py``). The injection itself is the ClientApp's
(``clients/faults.py``); the server sees what a real broken client would send."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

FAULT_KINDS = (
    "none", "nan", "inf", "wrong_shape", "wrong_dtype", "missing_array", "extra_array", "two_arrayrecords",
    "huge_norm", "raise",
)
"""``fault.kind``: ``nan`` / ``inf`` (one array's values), ``wrong_shape`` (one array
truncated), ``wrong_dtype`` (float64 arrays), ``missing_array`` / ``extra_array`` (a key
dropped / added), ``two_arrayrecords`` (a second ArrayRecord), ``huge_norm`` (every float
array x 1e6), ``raise`` (the client raises in train: an error reply)."""


@dataclass
class FaultSettings:
    """Which clients send a broken reply, when, and what kind."""

    kind: str = "none"
    """One of :data:`FAULT_KINDS` (``none``: no fault)."""
    partition_ids: List[int] = field(default_factory=list)
    """The faulty clients' partition ids ..."""
    fraction: float = 0.0
    """... or this share of the clients, drawn afresh each round from (seed, round)."""
    rounds: Optional[List[int]] = None
    """The rounds with faults (None = every round)."""

    def validate(self, num_clients: int) -> None:
        """Raise ``ValueError`` (one line) on a bad value."""
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault.kind '{self.kind}'; choose one of: {', '.join(FAULT_KINDS)}")
        bad = [p for p in self.partition_ids if not 0 <= p < num_clients]
        if bad:
            raise ValueError(f"fault.partition_ids must be partition ids in [0, {num_clients - 1}], got {bad}")
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"fault.fraction must be in [0, 1], got {self.fraction!r}")

    def faulty(self, partition_id: int, server_round: int, num_clients: int, seed: int) -> bool:
        """Whether client ``partition_id`` sends a broken reply in ``server_round``."""
        if self.kind == "none" or (self.rounds is not None and server_round not in self.rounds):
            return False
        if partition_id in self.partition_ids:
            return True
        if self.fraction <= 0:
            return False
        import random

        k = round(self.fraction * num_clients)
        return partition_id in random.Random(f"fault-{seed}-{server_round}").sample(range(num_clients), k)
