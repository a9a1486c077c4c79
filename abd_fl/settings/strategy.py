"""Typed settings of the ``strategy`` group: the Flower strategy that aggregates the client
models (named by a string; ``strategies/`` builds it) and how the server's student relates to
the aggregate.

The shipped presets (:data:`STRATEGY_PRESETS`) are the single source of the values
``configs/strategy/<name>.yaml`` ships: :func:`abd_fl.config_store.register_configs` stores
each as the schema ``strategy/<name>_schema`` the file extends, so OmegaConf refuses an
unknown key or a wrong type (``strategy.fraction_train=all``) when the config is composed.
The files of ``dense``, ``fedftg`` and ``feddf`` also choose the distill group (Hydra's
defaults list: ``dense``, ``dense``, ``ood``). Known names, ranges and the preset's mode are
checked by :func:`abd_fl.config.validate_config`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields, replace
from typing import Any, Dict, Optional

from abd_fl.distill.fedgen import FedGenConfig

BASE_STRATEGIES = ("fedavg", "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")
"""``strategy.base``: the Flower Message-API strategies (FedAvg, FedMedian, FedTrimmedAvg,
Krum, MultiKrum, Bulyan), each also a preset of its own name."""
MODES = ("one_shot", "multi_round")
"""``strategy.mode``: ``one_shot`` (DENSE: one round, a fresh student) | ``multi_round``
(FedFTG-style: every round the student starts from the aggregate)."""
KD_TEACHER_SETS = ("all", "selected")
"""``strategy.teachers``: every valid reply teaches, or only those the base's selection keeps."""
PRESET_MODES = {"dense": "one_shot", "fedftg": "multi_round", "feddf": "multi_round", "fedgen": "multi_round"}
"""The FL algorithms offered as ``strategy=<name>`` presets, each with the mode it is defined by."""
STRATEGY_NAMES = BASE_STRATEGIES + tuple(PRESET_MODES)
"""``strategy.name``: every preset."""


UPDATE_ACTIONS = ("off", "keep", "reject", "clip")
"""``strategy.update_check.action``: what happens to a reply whose update is out of line."""
UPDATE_METRICS = ("distance", "norm")
"""``strategy.update_check.metric``: the figure judged (distance from the global model, or norm)."""


@dataclass
class UpdateCheckSettings:
    """Checks of each round's valid replies against each other (``strategies/update_checks.py``):
    a reply whose figure's robust z-score, ``(figure - median) / (1.4826 * MAD)`` over the
    round's replies, exceeds ``threshold`` is flagged and logged, then handled by ``action``."""

    action: str = "keep"
    """``off`` (not computed) | ``keep`` (flagged and logged only) | ``reject`` (dropped, as an
    invalid reply) | ``clip`` (its update scaled onto the flag line)."""
    metric: str = "distance"
    """``distance``: L2 distance of the reply's float arrays from the model the round sent (the
    update's norm) | ``norm``: the L2 norm of the arrays themselves."""
    threshold: float = 3.5
    """Robust z-score above which a reply is flagged (3.5: Iglewicz and Hoaglin's outlier rule)."""
    min_replies: int = 3
    """Fewer valid replies than this: nothing is flagged (a median of two says nothing)."""
    max_reply_mb: Optional[float] = 256.0
    """A reply larger than this (all its records, MB) is rejected unread; null = no cap."""

    def validate(self) -> None:
        """Raise ``ValueError`` (one line: key, value, what is allowed) on a bad value."""
        if self.action not in UPDATE_ACTIONS:
            raise ValueError(f"unknown strategy.update_check.action '{self.action}'; choose one of: {', '.join(UPDATE_ACTIONS)}")
        if self.metric not in UPDATE_METRICS:
            raise ValueError(f"unknown strategy.update_check.metric '{self.metric}'; choose one of: {', '.join(UPDATE_METRICS)}")
        if not self.threshold > 0:
            raise ValueError(f"strategy.update_check.threshold must be > 0, got {self.threshold!r}")
        if self.min_replies < 3:
            raise ValueError(f"strategy.update_check.min_replies must be an integer >= 3, got {self.min_replies!r}")
        if self.max_reply_mb is not None and not self.max_reply_mb > 0:
            raise ValueError(f"strategy.update_check.max_reply_mb must be null or > 0, got {self.max_reply_mb!r}")


@dataclass
class StrategySettings:
    """The ``strategy`` group."""

    name: str = "fedavg"
    """The preset's name (``strategy=<name>``): a base strategy's name (:data:`BASE_STRATEGIES`)
    or an FL algorithm: ``dense``, ``fedftg``, ``feddf``, ``fedgen``."""
    base: str = "fedavg"
    """The Flower Message-API strategy that aggregates the client models: ``fedavg`` |
    ``fedmedian`` | ``fedtrimmedavg`` | ``krum`` | ``multikrum`` | ``bulyan``."""
    base_params: Dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the base's Flower class (``beta`` of FedTrimmedAvg,
    ``num_malicious_nodes`` of Krum / MultiKrum / Bulyan, ...); {} = Flower's defaults."""
    mode: str = "one_shot"
    """``one_shot`` (DENSE: exactly one round, a fresh student) | ``multi_round`` (FedFTG-style:
    the student starts from the aggregate every round; ``model.student`` must equal
    ``model.client``). An FL algorithm's preset is defined by its mode (:data:`PRESET_MODES`)."""
    fraction_train: float = 1.0
    """Share of the clients sampled for training each round, in (0, 1]."""
    teachers: str = "all"
    """Which client models teach the data-free KD step: ``all`` (every valid reply) |
    ``selected`` (only the replies the base's selection keeps: Krum, MultiKrum, Bulyan;
    every reply for the other bases). How they are combined is ``distill.ensemble``."""
    update_check: UpdateCheckSettings = field(default_factory=UpdateCheckSettings)
    """Each round's valid replies checked against each other (out-of-line updates; a size cap)."""


@dataclass
class FedGenStrategySettings(StrategySettings):
    """``strategy=fedgen`` (Zhu et al., ICML 2021): the FedAvg aggregate is the global model; the
    server learns a label-conditioned generator in feature space from the clients' heads and
    sends it with the next round's model; each client adds FedGen's regulariser. With
    ``defense=abd|sv|sr`` the server repairs the aggregate by a short data-free distillation
    (the distill group); the undefended arm is the aggregate itself (README, design)."""

    name: str = "fedgen"
    mode: str = "multi_round"
    fedgen: FedGenConfig = field(default_factory=FedGenConfig)
    """FedGen's generator, its server-side training and the clients' regulariser
    (:class:`abd_fl.distill.fedgen.FedGenConfig`, which checks the ranges)."""


STRATEGY_PRESETS: dict[str, StrategySettings] = {
    "fedavg": StrategySettings(),
    "fedmedian": StrategySettings(name="fedmedian", base="fedmedian"),
    "fedtrimmedavg": StrategySettings(name="fedtrimmedavg", base="fedtrimmedavg", base_params={"beta": 0.2}),
    "krum": StrategySettings(name="krum", base="krum", base_params={"num_malicious_nodes": 2}),
    # averages the 4 best-scored models (n - f of the default 6 clients)
    "multikrum": StrategySettings(name="multikrum", base="multikrum", base_params={"num_malicious_nodes": 2, "num_nodes_to_select": 4}),
    # Bulyan needs >= 4 f + 3 replies a round: 7 clients (simulation.num_clients=7) for f = 1
    "bulyan": StrategySettings(name="bulyan", base="bulyan", base_params={"num_malicious_nodes": 1}),
    # DENSE (Zhang et al., NeurIPS 2022): one round, the ensemble distilled into a fresh student
    # (the aggregate is reported as role fedavg; the global model is the student)
    "dense": StrategySettings(name="dense"),
    # FedFTG (Zhang et al., CVPR 2022): every round the aggregate is fine-tuned by data-free KD
    "fedftg": StrategySettings(name="fedftg", mode="multi_round"),
    # FedDF (Lin et al., NeurIPS 2020): every round the aggregate is distilled on unlabeled OOD data
    "feddf": StrategySettings(name="feddf", mode="multi_round"),
    "fedgen": FedGenStrategySettings(),
}
"""``strategy=<name>``: the shipped settings of each group file."""


def strategy_preset(name: str, **changes: Any) -> StrategySettings:
    """``configs/strategy/<name>.yaml`` as an object (a fresh copy), with ``changes`` to its
    fields (e.g. ``strategy_preset("krum", base_params={"num_malicious_nodes": 1})``).
    Raises ``ValueError`` on an unknown preset or field."""
    if name not in STRATEGY_PRESETS:
        raise ValueError(f"unknown strategy '{name}'; choose one of: {', '.join(STRATEGY_PRESETS)}")
    preset = copy.deepcopy(STRATEGY_PRESETS[name])
    known = [f.name for f in fields(preset)]
    unknown = sorted(set(changes) - set(known))
    if unknown:
        raise ValueError(f"unknown strategy setting(s) {unknown} for '{name}'; known: {', '.join(known)}")
    return replace(preset, **changes)
