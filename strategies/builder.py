"""``datafree_kd(...)``: :class:`~strategies.datafree_kd.DataFreeKD` with ABD around any
Flower Message-API strategy, built from a few keyword arguments, without Hydra.

For your own Flower app (``examples/abd-quickstart`` is one)::

    from flwr.serverapp.strategy import FedAvg
    from strategies.builder import datafree_kd

    strategy = datafree_kd(FedAvg(fraction_evaluate=0.0), Net, image_shape=(1, 8, 8), defense="abd", iterations=200)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(Net().state_dict()), num_rounds=3)

Every setting not given here is the project's default, read from the very files the Hydra
runs compose (``configs/distill/<distill>.yaml``, ``configs/defense/<defense>.yaml``), and
the KD step is the ServerApp's own (:func:`strategies.server_app.distill_fn_for_shape`).
A deliberately small helper; the Hydra experiments (``abd-fl``) expose every setting.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import yaml
from flwr.serverapp.strategy import Strategy
from torch import nn

from abd_fl.defense import DEFENSE_NAMES
from abd_fl.device import resolve_device
from abd_fl.distill import SYNTHESIZERS
from abd_fl.experiment import build_defense, build_synthesizer_from_config, distill_arms, distill_config
from abd_fl.paths import configs_dir
from strategies.datafree_kd import DataFreeKD, RoundOutcome
from strategies.server_app import distill_fn_for_shape


def _group(group: str, name: str) -> dict[str, Any]:
    """``configs/<group>/<name>.yaml`` with its ``defaults`` entries (files of the same group,
    e.g. ``sv.yaml``'s ``abd``) merged underneath, ``params`` merged key by key."""
    data = yaml.safe_load((configs_dir() / group / f"{name}.yaml").read_text()) or {}
    merged: dict[str, Any] = {}
    for entry in data.pop("defaults", None) or []:
        if entry != "_self_":
            merged = _group(group, str(entry))
    params = {**(merged.get("params") or {}), **(data.get("params") or {})}
    merged.update(data)
    if params:
        merged["params"] = params
    return merged


def datafree_kd_config(
    *,
    defense: str = "abd",
    compare_baseline: bool = False,
    distill: str = "zskt",
    iterations: int | None = None,
    student_steps: int | None = None,
    batch_size: int | None = None,
    shuffle_layers: int = 1,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """The plain config :func:`datafree_kd` distils with (the keys the Hydra config has for
    ``distill`` and ``defense``); see :func:`datafree_kd` for the arguments."""
    if defense not in DEFENSE_NAMES:
        raise ValueError(f"unknown defense '{defense}'; choose one of: {', '.join(DEFENSE_NAMES)}")
    if distill not in SYNTHESIZERS:
        raise ValueError(f"unknown distill '{distill}'; choose one of: {', '.join(SYNTHESIZERS)}")
    dcfg = _group("distill", distill)
    for key, value in (("iterations", iterations), ("student_steps", student_steps), ("batch_size", batch_size)):
        if value is not None:
            dcfg[key] = value
    if batch_size is not None and "batch_size" in (dcfg.get("synthesizer_params") or {}):
        dcfg["synthesizer_params"] = {**dcfg["synthesizer_params"], "batch_size": batch_size}
    defense_cfg = _group("defense", defense)
    defense_cfg["compare_baseline"] = bool(compare_baseline)
    defense_cfg["params"] = {**defense_cfg.get("params", {}), "num_layers": int(shuffle_layers)}  # abd.yaml: ${model.shuffle_layers}
    return {
        "seed": int(seed),
        "progress": bool(progress),
        "strategy": {"name": "datafree_kd", "base": "custom"},
        "distill": dcfg,
        "defense": defense_cfg,
    }


def datafree_kd(
    base: Strategy,
    model_fn: Callable[[], nn.Module],
    image_shape: Sequence[int],
    *,
    student_fn: Callable[[], nn.Module] | None = None,
    mode: str = "multi_round",
    defense: str = "abd",
    compare_baseline: bool = False,
    distill: str = "zskt",
    iterations: int | None = None,
    student_steps: int | None = None,
    batch_size: int | None = None,
    shuffle_layers: int = 1,
    seed: int = 0,
    device: str = "auto",
    progress: bool = False,
    on_round: Callable[[RoundOutcome], None] | None = None,
) -> DataFreeKD:
    """Wrap ``base`` (FedAvg, FedMedian, Krum, ...) in :class:`DataFreeKD` with a data-free KD
    step defended by ``defense``.

    - ``model_fn``: a fresh client model (the teachers' architecture; replies must match its
      state dict); ``student_fn`` the server's student (default ``model_fn``; ``multi_round``
      needs the same architecture). Any ``nn.Module`` taking images in [0, 1] of
      ``image_shape`` (C, H, W) and returning logits; the vaccine needs an ``nn.Conv2d``.
    - ``mode``: ``multi_round`` (default: every round the base aggregate is fine-tuned by KD,
      FedFTG-style, for any number of rounds) or ``one_shot`` (DENSE: one round, a fresh student).
    - ``defense``: ``abd`` (Shuffling Vaccine + Self-Retrospection), ``sv``, ``sr``, ``abd_ti``
      or ``none``; ``compare_baseline`` also distils an undefended ``dfkd_student`` from the
      same teachers each round (reported to ``on_round``, never sent to clients).
    - ``distill``: the synthesizer group (``zskt``, ``dense``, ``cmi``, ``ood``); ``iterations``,
      ``student_steps`` and ``batch_size`` (KD and synthesizer batch) override its file.
    - ``shuffle_layers``: how many of the model's last convs the vaccine shuffles (the last
      stage; 1 for a small CNN).
    - ``on_round(outcome)``: called after each round with the teachers, every arm's student
      and the defense's report (:class:`~strategies.datafree_kd.RoundOutcome`).

    Bad settings raise ``ValueError`` here, not in the first round.
    """
    cfg = datafree_kd_config(
        defense=defense,
        compare_baseline=compare_baseline,
        distill=distill,
        iterations=iterations,
        student_steps=student_steps,
        batch_size=batch_size,
        shuffle_layers=shuffle_layers,
        seed=seed,
        progress=progress,
    )
    shape = tuple(int(v) for v in image_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"image_shape must be (C, H, W) of positive sizes, got {tuple(image_shape)}")
    arms = distill_arms(cfg)
    # fail now on a bad setting, not inside the first round
    distill_config(cfg)
    build_synthesizer_from_config(cfg)
    for _arm, name in arms:
        build_defense(cfg, name, seed=int(seed))
    return DataFreeKD(
        base,
        model_fn,
        student_fn or model_fn,
        distill_fn_for_shape(cfg, shape, resolve_device(device)),  # type: ignore[arg-type]
        arms=tuple(arm for arm, _ in arms),
        mode=mode,
        on_round=on_round,
    )
