"""The Python API: server-side data-free KD with ABD around any Flower Message-API strategy,
in your own ServerApp, without Hydra. Everything a user needs is exported here::

    from flwr.serverapp.strategy import FedAvg
    from strategies.api import ZSKT, datafree_kd, defense_preset

    strategy = datafree_kd(
        FedAvg(fraction_evaluate=0.0),
        Net,                                  # the clients' model (the teachers' architecture)
        image_shape=(1, 8, 8),
        distill=ZSKT(iterations=200),         # the synthesizer and KD budgets (distill group)
        defense=defense_preset("abd_ti"),     # the defense of each student (defense group)
    )
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(Net().state_dict()), num_rounds=3)

The settings are the typed dataclasses Hydra's groups extend (every ``configs/<group>/*.yaml``;
:mod:`abd_fl.config_store`), so a keyword argument here and a Hydra override check the same
fields and share the same defaults:

- ``distill``: :class:`ZSKT`, :class:`DENSE`, :class:`CMI`, :class:`OOD` (synthesizer
  parameters in :class:`ZSKTParams`, ... ; loop budgets as fields), or a group name;
- ``defense``: :class:`DefenseSettings` (``name``, ``compare_baseline``, ``ablation``,
  ``params``: :class:`ABDConfig` with :class:`SRConfig`), most easily from
  :func:`defense_preset` (``abd``, ``sv``, ``sr``, ``abd_ti``, ``none``), or a preset name;
- ``strategy``: :class:`StrategySettings` (:class:`FedGenStrategySettings` with
  :class:`FedGenConfig` for ``fedgen``), most easily from :func:`strategy_preset`;
  :func:`base_strategy` builds its Flower strategy, the ``base`` of :func:`datafree_kd`;
- ``dataset``: :class:`DatasetSettings` (``.load(seed)``); ``model``: :class:`ModelSettings`
  (``.build(role, ...)``); ``attack``: :class:`AttackSettings` (``.schedule(num_clients,
  seed)``); ``simulation``: :class:`SimulationSettings` with :class:`ClientResources`; the
  top-level keys: :class:`RunSettings` with :class:`TeachersSettings` and
  :class:`CleanKDReferenceSettings`. These describe a Hydra experiment (``abd-fl``) as
  objects; :func:`datafree_kd` itself needs none of them.

:class:`DataFreeKD` itself takes any ``distill_fn(arm, teachers, student, round)``;
:func:`make_distill_fn` builds the one above from the typed settings.
"""

from __future__ import annotations

from typing import Callable, Sequence

from flwr.serverapp.strategy import Strategy
from torch import nn

from abd_fl.attacks.settings import AttackSettings
from abd_fl.data.settings import DatasetSettings
from abd_fl.defense import ABDConfig, SRConfig
from abd_fl.defense.settings import ABD_TI_PARAMS, DEFENSE_PRESETS, DefenseSettings, defense_preset
from abd_fl.device import resolve_device
from abd_fl.distill.settings import (
    CMI,
    DENSE,
    DISTILL_PRESETS,
    OOD,
    ZSKT,
    CMIParams,
    DENSEParams,
    DistillSettings,
    OODParams,
    ZSKTParams,
)
from abd_fl.distill.fedgen import FedGenConfig
from abd_fl.models.settings import ModelSettings
from abd_fl.settings.run import CleanKDReferenceSettings, RunSettings, TeachersSettings
from abd_fl.settings.simulation import ClientResources, SimulationSettings
from abd_fl.settings.strategy import (
    STRATEGY_PRESETS,
    FedGenStrategySettings,
    StrategySettings,
    UpdateCheckSettings,
    strategy_preset,
)
from strategies.datafree_kd import MODES, DataFreeKD, RoundOutcome, make_base_strategy
from strategies.server_app import make_distill_fn

__all__ = [
    "DataFreeKD",
    "RoundOutcome",
    "datafree_kd",
    "make_distill_fn",
    "DistillSettings",
    "ZSKT",
    "DENSE",
    "CMI",
    "OOD",
    "ZSKTParams",
    "DENSEParams",
    "CMIParams",
    "OODParams",
    "DISTILL_PRESETS",
    "DefenseSettings",
    "ABDConfig",
    "SRConfig",
    "ABD_TI_PARAMS",
    "DEFENSE_PRESETS",
    "defense_preset",
    "StrategySettings",
    "FedGenStrategySettings",
    "UpdateCheckSettings",
    "FedGenConfig",
    "STRATEGY_PRESETS",
    "strategy_preset",
    "base_strategy",
    "DatasetSettings",
    "ModelSettings",
    "AttackSettings",
    "SimulationSettings",
    "ClientResources",
    "RunSettings",
    "TeachersSettings",
    "CleanKDReferenceSettings",
]


def _distill(value: DistillSettings | str) -> DistillSettings:
    if isinstance(value, DistillSettings):
        return value
    if value not in DISTILL_PRESETS:
        raise ValueError(f"unknown distill '{value}'; choose one of: {', '.join(DISTILL_PRESETS)}")
    return DISTILL_PRESETS[value]()


def base_strategy(settings: StrategySettings | str, num_clients: int) -> Strategy:
    """The Flower strategy of a ``strategy`` setting (or preset name): its ``base`` class
    (FedAvg, FedMedian, FedTrimmedAvg, Krum, MultiKrum, Bulyan) with ``base_params`` and
    ``fraction_train``, client-side evaluation off, waiting for ``num_clients`` nodes, as
    ``abd-fl`` builds it. Pass it to :func:`datafree_kd` with ``mode=settings.mode``."""
    if isinstance(settings, str):
        settings = strategy_preset(settings)
    return make_base_strategy(settings.base, settings.base_params, int(num_clients), float(settings.fraction_train))


def _defense(value: DefenseSettings | str) -> DefenseSettings:
    return value if isinstance(value, DefenseSettings) else defense_preset(value)


def datafree_kd(
    base: Strategy,
    model_fn: Callable[[], nn.Module],
    image_shape: Sequence[int],
    *,
    distill: DistillSettings | str = "zskt",
    defense: DefenseSettings | str = "abd",
    student_fn: Callable[[], nn.Module] | None = None,
    mode: str = "multi_round",
    seed: int = 0,
    device: str = "auto",
    progress: bool = False,
    on_round: Callable[[RoundOutcome], None] | None = None,
    teachers: str = "all",
    update_check: UpdateCheckSettings | None = None,
) -> DataFreeKD:
    """Wrap ``base`` (FedAvg, FedMedian, Krum, ...) in :class:`DataFreeKD` with a data-free KD
    step (Algorithm 1's loop) defended by ``defense`` (ABD, Algorithm 2).

    - ``model_fn``: a fresh client model (the teachers' architecture; replies must match its
      state dict); ``student_fn`` the server's student (default ``model_fn``; ``multi_round``
      needs the same architecture). Any ``nn.Module`` taking images in [0, 1] of
      ``image_shape`` (C, H, W) and returning logits; the vaccine needs an ``nn.Conv2d``.
    - ``distill``: :class:`ZSKT` (default), :class:`DENSE`, :class:`CMI`, :class:`OOD` or a
      group name (``zskt``, ...), each with the shipped ``configs/distill/<name>.yaml`` values.
    - ``defense``: a :class:`DefenseSettings` (:func:`defense_preset` builds the shipped ones,
      e.g. ``defense_preset("abd", compare_baseline=False, num_layers=2)``) or a preset name.
      With ``compare_baseline`` (the presets' default) an undefended ``dfkd_student`` is also
      distilled from the same teachers each round (reported to ``on_round``, never sent).
    - ``mode``: ``multi_round`` (default: every round the base aggregate is fine-tuned by KD,
      FedFTG-style, for any number of rounds) or ``one_shot`` (DENSE: one round, a fresh student).
    - ``teachers``: ``all`` (every valid reply teaches) or ``selected`` (only the replies the
      base's selection rule keeps: Krum, MultiKrum, Bulyan; every reply for other bases).
      How several teachers are combined is the distill settings' ``ensemble`` rule.
    - ``update_check``: :class:`UpdateCheckSettings` (default: out-of-line updates flagged and
      logged, kept; a 256 MB cap on a reply); ``action="reject"`` or ``"clip"`` acts on them.
    - ``on_round(outcome)``: called after each round with the teachers, every arm's student
      and the defense's report (:class:`RoundOutcome`).

    Bad settings raise ``ValueError`` here (one line, naming the value), not in the first round.
    """
    if mode not in MODES:
        raise ValueError(f"unknown DataFreeKD mode '{mode}'; choose one of: {', '.join(MODES)}")
    distill_cfg, defense_cfg = _distill(distill), _defense(defense)
    shape = tuple(int(v) for v in image_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"image_shape must be (C, H, W) of positive sizes, got {tuple(image_shape)}")
    # fail now on a bad setting, not inside the first round
    distill_cfg.loop_config(seed=int(seed))
    distill_cfg.build_synthesizer()
    defense_cfg.validate()
    return DataFreeKD(
        base,
        model_fn,
        student_fn or model_fn,
        make_distill_fn(distill_cfg, defense_cfg, shape, resolve_device(device), seed=int(seed), progress=progress),  # type: ignore[arg-type]
        arms=tuple(arm for arm, _ in defense_cfg.arms()),
        mode=mode,
        on_round=on_round,
        teachers=teachers,
        update_check=update_check,
    )
