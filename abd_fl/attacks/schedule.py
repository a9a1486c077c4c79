"""Who attacks when, and how the attacker's update is scaled: the pure decision logic of
the malicious clients (no Flower, no data).

- **Who**: a count of malicious clients (or a fraction of ``num_clients``, or explicit
  partition ids). ``attacker_pool="fixed"`` draws the set once from the seed (the same
  draw as before the schedule existed); ``"per_round"`` draws ``count`` attackers afresh
  every round among all clients, from the seed and the round number.
- **When**: the attack window. A malicious client attacks in round ``r`` when
  ``r >= start_round`` and ``(r - start_round) % every == 0``; with ``single_shot`` only
  in ``start_round``. Outside the window it behaves like a benign client.
- **How much**: model replacement (Bagdasaryan et al., *How To Backdoor Federated
  Learning*, AISTATS 2020): the attacker sends
  ``w_global + scale * (w_local - w_global)`` instead of ``w_local``.

Rounds are numbered from 1, as Flower's ``server-round``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

__all__ = ["ATTACKER_POOLS", "AttackSchedule", "malicious_count", "schedule_from_config", "scale_update"]

ATTACKER_POOLS: tuple[str, ...] = ("fixed", "per_round")
_SALT = 7919  # keeps the attacker draw independent of the other seeded draws of a run


def malicious_count(num_clients: int, num_malicious: int | None = None, fraction: float | None = None) -> int:
    """How many clients are malicious: ``round(fraction * num_clients)`` (halves round up)
    when ``fraction`` is given, else ``num_malicious``."""
    if fraction is not None:
        if not 0.0 <= float(fraction) <= 1.0:
            raise ValueError(f"malicious fraction must be in [0, 1], got {fraction}")
        return int(math.floor(float(fraction) * num_clients + 0.5))
    count = int(num_malicious or 0)
    if not 0 <= count <= num_clients:
        raise ValueError(f"number of malicious clients must be in [0, {num_clients}], got {count}")
    return count


@dataclass(frozen=True)
class AttackSchedule:
    """Which clients attack in which round (see the module doc)."""

    num_clients: int
    count: int = 0
    ids: tuple[int, ...] | None = None  # explicit malicious partition ids (fixed pool only)
    attacker_pool: str = "fixed"
    seed: int = 0
    start_round: int = 1
    every: int = 1
    single_shot: bool = False

    def __post_init__(self) -> None:
        if self.attacker_pool not in ATTACKER_POOLS:
            raise ValueError(f"unknown attacker pool '{self.attacker_pool}'; choose one of: {', '.join(ATTACKER_POOLS)}")
        if self.ids is not None:
            ids = tuple(sorted(int(i) for i in self.ids))
            if len(set(ids)) != len(ids) or any(not 0 <= i < self.num_clients for i in ids):
                raise ValueError(f"malicious ids must be distinct partition ids in [0, {self.num_clients - 1}], got {list(self.ids)}")
            if self.attacker_pool != "fixed":
                raise ValueError("explicit malicious ids need the fixed attacker pool")
            object.__setattr__(self, "ids", ids)
            object.__setattr__(self, "count", len(ids))
        if not 0 <= self.count <= self.num_clients:
            raise ValueError(f"number of malicious clients must be in [0, {self.num_clients}], got {self.count}")
        if self.start_round < 1 or self.every < 1:
            raise ValueError(f"start_round and every must be >= 1, got {self.start_round} and {self.every}")

    def in_window(self, server_round: int) -> bool:
        """Whether malicious clients attack in ``server_round``."""
        if server_round < self.start_round:
            return False
        if self.single_shot:
            return server_round == self.start_round
        return (server_round - self.start_round) % self.every == 0

    def candidates(self, server_round: int) -> list[int]:
        """The malicious clients of ``server_round``, window aside (sorted partition ids)."""
        if self.ids is not None:
            return list(self.ids)
        if self.attacker_pool == "fixed":
            rng = np.random.default_rng(self.seed + _SALT)  # the pre-schedule draw, kept as is
        else:
            rng = np.random.default_rng([self.seed, _SALT, server_round])
        return sorted(int(i) for i in rng.choice(self.num_clients, size=self.count, replace=False))

    def attackers(self, server_round: int) -> list[int]:
        """The clients that attack in ``server_round`` (empty outside the window)."""
        return self.candidates(server_round) if self.in_window(server_round) else []

    def attacks(self, partition_id: int, server_round: int) -> bool:
        """Is client ``partition_id`` malicious (poisoned training, scaled update) in ``server_round``?"""
        return partition_id in self.attackers(server_round)

    def attack_rounds(self, num_rounds: int) -> list[int]:
        """The rounds of ``1..num_rounds`` inside the window."""
        return [r for r in range(1, num_rounds + 1) if self.in_window(r)]

    def by_round(self, num_rounds: int) -> dict[int, list[int]]:
        """``{round: attackers}`` for every round of ``1..num_rounds``."""
        return {r: self.attackers(r) for r in range(1, num_rounds + 1)}

    def ever_malicious(self, num_rounds: int) -> list[int]:
        """The fixed pool; for ``per_round``, every client that attacks in ``1..num_rounds``."""
        if self.attacker_pool == "fixed":
            return self.candidates(1)
        return sorted({i for r in self.attack_rounds(num_rounds) for i in self.candidates(r)})


def schedule_from_config(attack: Mapping[str, Any], num_clients: int, seed: int) -> AttackSchedule:
    """The schedule of an ``attack`` config group; absent keys take their defaults
    (``attacker_pool: fixed``, ``start_round: 1``, ``every: 1``, ``single_shot: false``).
    Explicit ``malicious_ids`` win over ``malicious_fraction``, which wins over ``num_malicious``."""
    ids = attack.get("malicious_ids")
    count = 0 if ids is not None else malicious_count(num_clients, attack.get("num_malicious", 0), attack.get("malicious_fraction"))
    return AttackSchedule(
        num_clients=num_clients,
        count=count,
        ids=None if ids is None else tuple(int(i) for i in ids),
        attacker_pool=str(attack.get("attacker_pool", "fixed")),
        seed=int(seed),
        start_round=int(attack.get("start_round", 1)),
        every=int(attack.get("every", 1)),
        single_shot=bool(attack.get("single_shot", False)),
    )


def scale_update(
    global_state: Mapping[str, torch.Tensor],
    local_state: Mapping[str, torch.Tensor],
    scale: float,
    keys: Iterable[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Model replacement: ``global + scale * (local - global)`` for every floating-point
    entry in ``keys`` (default: all floating-point entries); other entries are the local
    ones. ``scale == 1`` returns the local tensors unchanged (bit for bit)."""
    if set(global_state) != set(local_state):
        missing = sorted(set(local_state) ^ set(global_state))
        raise ValueError(f"global and local state dicts differ in keys {missing[:3]}")
    if not math.isfinite(float(scale)):
        raise ValueError(f"scale must be a finite number, got {scale}")
    chosen: Sequence[str] | set[str] = set(local_state) if keys is None else set(keys)
    unknown = sorted(set(chosen) - set(local_state))
    if unknown:
        raise ValueError(f"keys not in the state dict: {unknown[:3]}")
    out: dict[str, torch.Tensor] = {}
    for key, local in local_state.items():
        g = global_state[key]
        if scale == 1.0 or key not in chosen or not torch.is_floating_point(local):
            out[key] = local
            continue
        if tuple(g.shape) != tuple(local.shape):
            raise ValueError(f"'{key}' has shape {tuple(g.shape)} globally and {tuple(local.shape)} locally")
        g = g.to(device=local.device, dtype=local.dtype)
        out[key] = g + float(scale) * (local - g)
    return out
