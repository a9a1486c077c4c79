"""Typed settings of the ``attack`` group: the trigger, who poisons how much, and when.

:func:`abd_fl.config_store.register_configs` stores :class:`AttackSettings` as the schema
``attack/attack_schema`` that every ``configs/attack/<name>.yaml`` extends, so OmegaConf
refuses an unknown key or a wrong type (``attack.single_shot=maybe``) when the config is
composed. The defaults are ``attack=badnets_square`` (2 malicious clients poisoning half of
their data, all-to-one target 0); every file names its trigger, ``attack=none`` sets no
poisoning. Ranges, known names and cross-key rules (ids within ``simulation.num_clients``,
``malicious_ids`` xor ``malicious_fraction``, ...) are checked by
:func:`abd_fl.config.validate_config`; the attack's timing lives in
:mod:`abd_fl.attacks.schedule`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

from abd_fl.attacks.schedule import AttackSchedule, schedule_from_config


@dataclass
class AttackSettings:
    """The ``attack`` group (:func:`abd_fl.attacks.trigger_names` lists the triggers:
    ``badnets_grid``, ``badnets_square``, ``blend``, ``cl``, ``l0_inv``, ``l2_inv``, ``sig``,
    ``trojan_3x3``, ``trojan_8x8``, ``trojan_wm``)."""

    trigger: str = "badnets_square"
    """The backdoor trigger stamped on poisoned images (with no malicious client, ``attack=none``,
    it still makes the poisoned test set the ASR is measured on)."""
    trigger_params: Dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the trigger's class (:func:`abd_fl.attacks.build_trigger`), e.g.
    ``+attack.trigger_params.alpha=0.2`` for ``blend``; {} = the trigger's defaults."""
    poison_rate: float = 0.5
    """Share of each malicious client's local data that is poisoned, in [0, 1]; for the
    clean-label triggers (``cl``, ``sig``) the share of its target-class images (labels kept)."""
    target_label: int = 0
    """The all-to-one target class, in [0, number of classes - 1]."""
    num_malicious: int = 2
    """How many clients are malicious (>= 0, at most ``simulation.num_clients``), drawn with the seed ..."""
    malicious_ids: Optional[List[int]] = None
    """... or an explicit list of distinct partition ids in [0, num_clients - 1] (overrides the
    count; needs ``attacker_pool=fixed`` and no ``malicious_fraction``)."""
    malicious_fraction: Optional[float] = None
    """Share in [0, 1] of ``simulation.num_clients`` that is malicious (rounded, halves up;
    overrides ``num_malicious``)."""
    attacker_pool: str = "fixed"
    """``fixed``: one set drawn once with the seed | ``per_round``: drawn afresh each round (seed, round)."""
    start_round: int = 1
    """Attack window: the first round (>= 1, at most ``simulation.rounds``) in which malicious clients attack ..."""
    every: int = 1
    """... then every k-th round after it (>= 1) ..."""
    single_shot: bool = False
    """... or only in ``start_round``; outside the window they train on clean data."""
    local_epochs: Optional[int] = None
    """Attackers' own local epochs (>= 0; None = ``simulation.local_epochs``)."""
    local_lr: Optional[float] = None
    """Attackers' own local learning rate (> 0; None = ``simulation.local_lr``)."""
    scale: float = 1.0
    """Model replacement: an attacker sends ``w_global + scale * (w_local - w_global)``
    (finite, > 0; 1 = no scaling)."""
    teacher_checkpoints: Any = None
    """Attack with pretrained teachers: ``{partition id: file}`` or a folder of
    ``client_<id>.pt|.pth|.safetensors`` files (``runner=federated`` only; None = train them)."""

    def schedule(self, num_clients: int, seed: int) -> AttackSchedule:
        """Who attacks in which round (:func:`abd_fl.attacks.schedule.schedule_from_config`)."""
        return schedule_from_config(asdict(self), num_clients, seed)
