"""ABD, the Algorithm-2 pipeline, as a plug-in for the distillation loop's hooks.

Algorithm 2 (ABD paper Sec. 4.3): obtain surrogate samples ``D_s``; search a Shuffling
Vaccine (at most ``max_tries`` shuffles); if found, distil with SV until step lambda;
then, if Self-Retrospection is activated, distil with SR.

Here, for a data-free *federated* server (one vaccine per client teacher):

- **Surrogate samples** (the paper: "we first run data-free KD to cache some surrogate
  data"): ``surrogate_batches`` of the loop's own distillation inputs are cached, and at
  the end of the warm-up (``warmup_fraction`` of the iterations) every teacher gets its
  own vaccine search (:func:`abd_fl.defense.vaccine.search_vaccine`). Which inputs:
  ``surrogate="first"`` (default), the first ones the loop sees, as the reference code
  (its ZSKT caches pseudo-batches 11-50 of 80k); ``"latest"``, the last ones before the
  search, i.e. samples of the generator as the warm-up has trained it.
- **SV on synthesis** (Sec. 4.1 (1)): the generator's loss gets, for every vaccinated
  teacher ``i``, ``-coef * mean_{phi_i} KL(T_i || T~_i)`` (averaged over vaccinated
  teachers), each teacher with its own shuffled copy.
- **SV on distillation** (Sec. 4.1 (2)): a sample flagged by any vaccinated teacher gets
  the paper's weight ``1 - phi + phi/alpha`` (or the reference code's variant).
- **Suspicion per client**: each teacher's tail ratio and mean score are reported (a
  data-free suspicion score; the server scores it against the ground truth with ROC
  AUC). ``downweight_suspicious`` multiplies the ensemble weight of vaccinated teachers.
- **SR** (Algorithm 1) in the last ``sr_fraction`` of iterations with a fresh student
  optimizer at ``sr_lr``. The paper switches SR on when clean accuracy drops, which a
  data-free server cannot see. Our data-free rule (``sr="auto"``): SR runs when the
  search found no vaccine for any teacher (the backdoor, if any, is invisible to SV, as
  for blend-like triggers), and ``sr="on"`` forces it (``"off"`` disables it).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from abd_fl.defense.retrospection import SRConfig, add_sr_gradient
from abd_fl.defense.vaccine import VaccineResult, search_vaccine, vaccine_mask, vaccine_regularizer, weights_from_mask
from abd_fl.distill.hooks import DistillContext, NullDefense

log = logging.getLogger("abd_fl")

SR_MODES = ("auto", "on", "off")
SURROGATE_MODES = ("first", "latest")
WEIGHT_MODES = ("paper", "reference", "off")
DEFENSE_NAMES = ("none", "abd", "sv", "sr")


@dataclass
class ABDConfig:
    """Settings of ABD (defaults: the paper's and the reference code's, DESIGN.md Sec. 4)."""

    use_sv: bool = True
    sr: str = "auto"
    warmup_fraction: float = 0.05
    surrogate_batches: int = 20
    surrogate: str = "first"
    num_layers: int = 5
    num_shuffles: int = 3
    threshold: float = 0.02
    max_tries: int = 8
    generator_coef: float = 0.1
    weights: str = "paper"
    weight_alpha: float = 10.0
    weight_coef: float = 0.1
    downweight_suspicious: bool = False
    downweight_factor: float = 0.1
    sr_fraction: float = 0.04
    sr_lr: float = 2e-4
    sr_every: int = 1
    sr_config: SRConfig = field(default_factory=SRConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.sr not in SR_MODES:
            raise ValueError(f"unknown defense.sr '{self.sr}'; choose one of: {', '.join(SR_MODES)}")
        if self.surrogate not in SURROGATE_MODES:
            raise ValueError(f"unknown defense.surrogate '{self.surrogate}'; choose one of: {', '.join(SURROGATE_MODES)}")
        if self.weights not in WEIGHT_MODES:
            raise ValueError(f"unknown defense.weights '{self.weights}'; choose one of: {', '.join(WEIGHT_MODES)}")
        for name in ("warmup_fraction", "sr_fraction", "threshold", "downweight_factor"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ValueError(f"defense.{name} must be in [0, 1], got {value!r}")
        for name in ("surrogate_batches", "num_layers", "num_shuffles", "max_tries", "sr_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"defense.{name} must be an integer >= 1, got {value!r}")
        if not self.sr_lr > 0:
            raise ValueError(f"defense.sr_lr must be > 0, got {self.sr_lr}")


def abd_config_for(name: str, **overrides: Any) -> ABDConfig | None:
    """The config of a named defense variant: ``abd`` (SV + SR by Algorithm 2), ``sv`` (SV
    only), ``sr`` (SR only, always on), ``none`` (None)."""
    if name not in DEFENSE_NAMES:
        raise ValueError(f"unknown defense '{name}'; choose one of: {', '.join(DEFENSE_NAMES)}")
    if name == "none":
        return None
    sr_cfg = overrides.pop("sr_config", None)
    cfg = ABDConfig(**overrides, sr_config=SRConfig(**sr_cfg) if isinstance(sr_cfg, dict) else (sr_cfg or SRConfig()))
    if name == "sv":
        cfg.sr = "off"
    elif name == "sr":
        cfg.use_sv, cfg.sr = False, "on"
    return cfg


class ABDDefense(NullDefense):
    """ABD (SV + SR, Algorithm 2) behind the :class:`abd_fl.distill.DistillDefense` hooks."""

    def __init__(self, config: ABDConfig | None = None) -> None:
        self.cfg = config or ABDConfig()
        self.late_phase_fraction = 0.0
        self.late_phase_lr = self.cfg.sr_lr
        self._cache: list[torch.Tensor] = []
        self._vaccines: list[VaccineResult | None] = []
        self._searched = False
        self._warmup_end = 0
        self._step = 0
        self._sr_logs: list[dict[str, float]] = []
        self._flag_rate: list[float] = []
        self.ctx: DistillContext | None = None

    # ---- set-up and the vaccine search ---------------------------------------------
    def on_distill_start(self, ctx: DistillContext) -> None:
        self.ctx = ctx
        self._warmup_end = int(math.ceil(self.cfg.warmup_fraction * ctx.total_iterations)) if self.cfg.use_sv else 0
        if not self.cfg.use_sv:
            self._searched = True
            self._vaccines = [None] * len(ctx.teachers)
            self._decide_sr()
        elif self._warmup_end == 0:
            self._cache = [ctx.sample_surrogate().detach() for _ in range(self.cfg.surrogate_batches)]
            self._search()

    def on_iteration(self, iteration: int) -> None:
        if not self._searched and iteration >= self._warmup_end:
            if len(self._cache) < self.cfg.surrogate_batches and self.ctx is not None:
                self._cache += [
                    self.ctx.sample_surrogate().detach() for _ in range(self.cfg.surrogate_batches - len(self._cache))
                ]
            self._search()

    def _search(self) -> None:
        assert self.ctx is not None
        self._vaccines = []
        for i, teacher in enumerate(self.ctx.teachers):
            log.info("vaccine search for teacher %d", i)
            self._vaccines.append(
                search_vaccine(
                    teacher,
                    self._cache,
                    num_layers=self.cfg.num_layers,
                    num_shuffles=self.cfg.num_shuffles,
                    threshold=self.cfg.threshold,
                    max_tries=self.cfg.max_tries,
                    seed=self.cfg.seed * 1000 + i,
                )
            )
        self._searched = True
        self._cache = []
        found = [v is not None and v.found for v in self._vaccines]
        if self.cfg.downweight_suspicious and any(found) and not all(found):
            weights = [self.cfg.downweight_factor if f else 1.0 for f in found]
            set_weights = getattr(self.ctx.ensemble, "set_weights", None)
            if callable(set_weights):
                set_weights(weights)
                log.info("ensemble weights after the vaccine search: %s", weights)
        self._decide_sr()

    def _decide_sr(self) -> None:
        found_any = any(v is not None and v.found for v in self._vaccines)
        sr_on = self.cfg.sr == "on" or (self.cfg.sr == "auto" and not found_any)
        self.late_phase_fraction = self.cfg.sr_fraction if sr_on else 0.0
        log.info("ABD: vaccine found for %d/%d teachers; SR %s", sum(v is not None and v.found for v in self._vaccines), len(self._vaccines), "on" if sr_on else "off")

    def _active(self) -> list[tuple[nn.Module, nn.Module]]:
        if not self._searched or self.ctx is None:
            return []
        return [(t, v.shuffled) for t, v in zip(self.ctx.teachers, self._vaccines) if v is not None and v.found and v.shuffled is not None]

    # ---- the hooks -------------------------------------------------------------------
    def generator_loss_term(self, x: torch.Tensor) -> torch.Tensor | None:
        active = self._active()
        if not active:
            return None
        terms = [vaccine_regularizer(t(x), s(x), self.cfg.generator_coef) for t, s in active]
        return torch.stack(terms).mean()

    def kd_sample_weights(self, x: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor | None:
        if not self._searched:
            if self.cfg.surrogate == "latest" or len(self._cache) < self.cfg.surrogate_batches:
                self._cache.append(x.detach())
                del self._cache[: -self.cfg.surrogate_batches]  # latest: a window of the last batches
            return None
        active = self._active()
        if not active or self.cfg.weights == "off":
            return None
        with torch.no_grad():
            flagged = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
            for t, s in active:
                flagged |= vaccine_mask(t(x), s(x))
            self._flag_rate.append(float(flagged.float().mean()))
        return weights_from_mask(flagged, self.cfg.weights, self.cfg.weight_alpha, self.cfg.weight_coef).to(x.device)

    def add_student_gradient(self, student: nn.Module, x: torch.Tensor) -> None:
        self._step += 1
        if (self._step - 1) % self.cfg.sr_every:
            return
        self._sr_logs.append(add_sr_gradient(
            student, x, self.cfg.sr_config, seed=self.cfg.seed * 7919 + self._step,
            teacher=self.ctx.ensemble if self.ctx is not None else None,
        ))

    # ---- what happened ---------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        teachers = []
        for v in self._vaccines:
            if v is None:
                teachers.append({"searched": False})
            else:
                teachers.append(
                    {"searched": True, "found": v.found, "tail_ratio": v.tail_ratio, "mean_score": v.mean_score, "tries": len(v.tries)}
                )
        sr = self._sr_logs
        return {
            "config": {k: v for k, v in asdict(self.cfg).items() if k != "sr_config"},
            "teachers": teachers,
            "vaccines_found": sum(1 for t in teachers if t.get("found")),
            "sr_active": self.late_phase_fraction > 0,
            "sr_steps": len(sr),
            "sr_kl_mean": float(sum(d["sr_kl"] for d in sr) / len(sr)) if sr else None,
            "sr_scale_mean": float(sum(d["sr_scale"] for d in sr) / len(sr)) if sr else None,
            "flagged_share": float(sum(self._flag_rate) / len(self._flag_rate)) if self._flag_rate else None,
        }
