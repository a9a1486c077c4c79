"""Which replies a robust Flower base would trust: the teachers of ``teachers="selected"``.

Krum, MultiKrum (Blanchard et al., 2017) and Bulyan (El Mhamdi et al., 2018) aggregate only
the updates their selection rule keeps; the data-free KD step can restrict its teachers to
the same replies, so a client the base refused cannot teach the student either (issue 15).
Bases without a selection (FedAvg, FedMedian, FedTrimmedAvg: they combine coordinate-wise)
keep every teacher.
"""

from __future__ import annotations

from typing import Sequence

from flwr.app import Message
from flwr.serverapp.strategy import Bulyan, MultiKrum, Strategy
from flwr.serverapp.strategy.multikrum import select_multikrum

from abd_fl.settings.strategy import KD_TEACHER_SETS as TEACHER_SETS  # all | selected


def base_selection(base: Strategy, replies: Sequence[Message]) -> list[int] | None:
    """Indices into ``replies`` that ``base``'s selection rule keeps, or None when the base
    has none (or would not aggregate this round, as Bulyan with fewer than 4 f + 3 replies).
    Reads the replies' arrays without changing them; call it before the base aggregates."""
    contents = [msg.content for msg in replies]
    if isinstance(base, MultiKrum):  # Krum is MultiKrum with one node
        kept = select_multikrum(contents, base.num_malicious_nodes, base.num_nodes_to_select)
    elif isinstance(base, Bulyan):
        f = base.num_malicious_nodes
        if len(contents) < 4 * f + 3:
            return None
        kept = base.selection_rule(contents, f, len(contents) - 2 * f)
    else:
        return None
    ids = {id(c) for c in kept}
    return [i for i, c in enumerate(contents) if id(c) in ids]
