"""ABD, the Algorithm-2 pipeline, as a plug-in for the distillation loop's hooks.

Algorithm 2 (ABD paper Sec. 4.3): obtain surrogate samples ``D_s``; search a Shuffling
Vaccine (at most ``max_tries`` shuffles); if found, distil with SV until step lambda;
then, if Self-Retrospection is activated, distil with SR.

The defaults follow the reference's runs (illidanlab/ABD; DESIGN.md Sec. 4; the README's
"Design" section lists each value with its source):

- **Gating** (``search``). ``off`` (default; ``zskt/sweeps/cifar10_wrn_poi_defense.yml``:
  ``pseudo_test_batches: 0``): every teacher's shuffled ensemble is used from the first
  step, unverified (the paper's Table 4 / Fig. 7). ``verify`` (the GTSRB sweep,
  ``pseudo_test_batches: 50``): SV is off until a vaccine search on ``D_s`` accepts a
  shuffle; a teacher without a vaccine gets no SV.
- **Surrogate samples** ``D_s`` (``surrogate``). ``window`` (default, the reference's
  ``zskt/solver.py``): every batch the loop uses (the generator step's and each student
  step's) in iterations ``[surrogate_start, surrogate_stop)`` is cached, and the search
  (or, with ``search=off``, the report of the unverified vaccine's scores) runs at
  iteration ``surrogate_stop`` (reference: pseudo-batches 11-49, search at 50). The older
  modes ``first`` / ``latest`` cache ``surrogate_batches`` fresh/last student batches and
  search after ``warmup_fraction`` of the iterations.
- **SV on synthesis** (Sec. 4.1 (1)): the generator's loss gets, for every active teacher
  ``i``, ``-coef * mean_{phi_i} KL(T_i || T~_i)`` (class-averaged KL, as the reference),
  averaged over active teachers, each with its own shuffled copy.
- **SV on distillation** (Sec. 4.1 (2)): ``weights="auto"`` (default) weights the KD loss
  by the reference's ``mean(KL[~m]) - coef * mean(KL[m])`` on fixed (OOD / real) inputs
  only, as the reference, and not at all on generator samples (its ZSKT student KD is
  unweighted); ``paper`` / ``reference`` / ``off`` force one form.
- **SR** (Algorithm 1) in the last ``sr_fraction`` of iterations (or the last ``sr_steps``
  student steps) with a fresh student Adam at ``sr_lr``, cosine-annealed to 0 over that
  stage (``sr_schedule``), the SV regulariser still on: the reference's second stage,
  resumed from the SV-trained run near its end. ``sr="on"`` (default) always runs it;
  ``"auto"`` runs it only when the search found no vaccine (Algorithm 2's rule made
  data-free); ``"off"`` never.
- **Suspicion per client**: each teacher's tail ratio, mean score and tail-class share on
  ``D_s`` are reported (data-free; the server scores them against the ground truth with
  ROC AUC). ``downweight_suspicious`` multiplies the ensemble weight of vaccinated teachers.
- **Flag rate**: the share of generator samples that the vaccine flags, per iteration, and
  per teacher-predicted class over the run, in the report (``metrics.jsonl``). A sample is
  flagged (``phi = 1``) when a shuffled copy keeps the teacher's prediction. With
  ``sv_scope="each"`` (default; the reference has one teacher) every vaccinated teacher has
  its own term and mask, and the reported rate is their union (a sample any teacher flags);
  ``flag_rate_per_teacher`` gives each teacher's own rate, so the union can be read apart
  (a teacher without an active vaccine: ``None``).
- **Ensemble scope** (``sv_scope="ensemble"``, ours, for federations): one vaccine for the
  teacher ensemble. ``T`` is the vaccinated teachers combined by the ensemble's own rule
  (``distill.ensemble``, their ensemble weights renormalised), ``T~`` their shuffled copies
  combined by the same rule; a sample is flagged when the *ensemble's* prediction survives
  every teacher's shuffle, and the generator's term is Sec. 4.1 (1) on ``(T, T~)``. The
  per-teacher rates are still reported. Same passes as ``each``.

Our additions (off by default; on in ``defense=abd_ti``, README "Design"):

- **Targeted retrospection** (``inversion="on"``): at each share ``inversion_at`` of the
  iterations the student's backdoor is synthesised as a mask and pattern per class on the
  last ``inversion_batches`` synthetic batches (:mod:`abd_fl.defense.inversion`); the class
  that a mask of ``inversion_budget`` of the pixels flips most is the suspected target when
  it flips at least ``inversion_min_flip`` of the samples and ``inversion_min_ratio`` x the
  median class. Found: from then on every call of the teacher ensemble (the generator's
  step and the KD targets; not the SV terms, which call each teacher directly) sees its
  inputs *purified* (the pruned mask's pixels in-painted, ``purify_fill``; masks of later
  finds are added), so neither the generator nor the KD targets can use the trigger, and the
  student, still fed the raw samples, learns to ignore it. Not found: nothing is switched on. Each teacher's flip rate
  under the found trigger is its suspicion score.
- **Class balance** (``class_balance`` > 0): the generator's loss gets
  ``coef * sum_c pbar_c log pbar_c`` (minus the entropy of the teachers' mean prediction over
  the batch; DAFL's information-entropy term, Chen et al., ICCV 2019). On the 8x8 digits the
  ZSKT generator reaches the target class almost only through the trigger (a clean teacher's
  final generator: 2 of 1,024 samples labelled 0), so suppressing the trigger alone starves
  that class; the term makes the generator synthesise every class.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from abd_fl.defense.inversion import InvertedTrigger, purify, scan_classes, suspect_class, trigger_flip_rate
from abd_fl.defense.retrospection import SRConfig, add_sr_gradient
from abd_fl.defense.vaccine import (
    MASK_MODES,
    REGULARIZER_NORMS,
    VERIFY_RULES,
    ShuffledEnsemble,
    VaccineResult,
    score_vaccine,
    search_vaccine,
    vaccine_mask,
    vaccine_regularizer,
    weights_from_mask,
)
from abd_fl.distill.ensemble import combine_logits
from abd_fl.distill.hooks import DistillContext, NullDefense

log = logging.getLogger("abd_fl")

SR_MODES = ("auto", "on", "off")
SEARCH_MODES = ("off", "verify")
SURROGATE_MODES = ("window", "first", "latest")
WEIGHT_MODES = ("auto", "paper", "reference", "off")
SR_SCHEDULES = ("cosine", "constant")
INVERSION_MODES = ("off", "on")
PURIFY_FILLS = ("inpaint", "zero", "mean")
SV_SCOPES = ("each", "ensemble")
DEFENSE_NAMES = ("none", "abd", "sv", "sr", "abd_ti")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class ABDConfig:
    """Settings of ABD (defaults: the reference's runs, DESIGN.md Sec. 4; README "Design")."""

    use_sv: bool = True
    """Shuffling Vaccine on (the paper's SV; off in defense=abd_ti)."""
    search: str = "off"
    """off: SV from step 0, never verified (CIFAR-10 sweep, pseudo_test_batches 0) | verify: Algorithm 2's search (GTSRB sweep)"""
    verify_rule: str = "tail_ratio"
    """search=verify: tail_ratio (the paper's tau > threshold) | tail_class (our data-free test: the tail's class concentration)"""
    class_threshold: float = 0.6
    """tail_class: accept when this share of the low-score tail has one teacher label ..."""
    min_tail: int = 10
    """... and the tail holds at least this many samples"""
    surrogate: str = "window"
    """window: cache every batch of iterations [surrogate_start, surrogate_stop) (reference) | first | latest (older modes)"""
    surrogate_start: int = 11
    """the reference caches pseudo-batches 11-49 ..."""
    surrogate_stop: int = 50
    """... and searches at 50"""
    warmup_fraction: float = 0.05
    """first | latest: share of iterations before the search"""
    surrogate_batches: int = 20
    """first | latest: batches cached as D_s"""
    num_layers: int = 5
    """last conv layers whose input channels are shuffled (the last stage)"""
    num_shuffles: int = 3
    """shuffled copies averaged into T~"""
    threshold: float = 0.02
    """tail-ratio threshold of the vaccine search"""
    max_tries: int = 8
    """search=verify: shuffles tried before giving up."""
    generator_coef: float = 0.1
    """alpha of the generator regulariser (the reference's shuf_teacher)"""
    generator_kl: str = "mean"
    """the regulariser's KL averaged over classes (reference) | sum"""
    mask: str = "hard"
    """hard: phi = label match (paper) | soft: phi = p_T~(argmax T) (our calibration option)"""
    generator_norm: str = "flagged"
    """the regulariser's mean over the flagged samples (reference) | batch: sum over flagged / batch size (ours)"""
    sv_scope: str = "each"
    """each: one vaccine term and mask per teacher (the reference, one teacher) | ensemble: one for the combined teachers (ours)"""
    weights: str = "auto"
    """auto: reference weights on fixed (OOD/real) inputs, none on generator samples (reference) | paper | reference | off"""
    weight_alpha: float = 10.0
    """paper weights: flagged samples' loss divided by this"""
    weight_coef: float = 0.1
    """reference weights: -coef on flagged samples"""
    downweight_suspicious: bool = False
    """Our option: scale the KD loss of flagged samples by downweight_factor."""
    downweight_factor: float = 0.1
    sr: str = "on"
    """on: SR stage at the end, SV still on (the reference's second stage) | auto: only when no vaccine is found | off"""
    sr_fraction: float = 0.04
    """last share of iterations with SR (sr_steps, when set, overrides it)"""
    sr_steps: int | None = None
    """SR stage length in student steps (the reference: the last 400-600 of 80k pseudo-batches = 4-6k steps)"""
    sr_lr: float = 5e-4
    """the SR stage's fresh student Adam (reference sweep: 1e-4 or 5e-4) ..."""
    sr_schedule: str = "cosine"
    """... cosine-annealed to 0 over the stage (reference) | constant"""
    sr_every: int = 1
    """An SR hypergradient every this many student steps of the SR stage."""
    sr_config: SRConfig = field(default_factory=SRConfig)
    """Self-Retrospection's inner settings (:class:`~abd_fl.defense.retrospection.SRConfig`)."""
    class_balance: float = 0.0
    """Ours (abd_ti: 0.1): generator loss + coef * sum_c pbar_c log pbar_c (DAFL's information entropy)."""
    inversion: str = "off"
    """Ours (abd_ti: on): targeted retrospection, scan the student's classes for a trigger ..."""
    inversion_at: list[float] = field(default_factory=lambda: [0.3, 0.6])
    """... at these shares of the iterations ..."""
    inversion_batches: int = 8
    """... on the last this many synthetic batches"""
    inversion_steps: int = 150
    """Adam steps per class, 4 starts (one per quadrant), L1 weight annealed 0.01 -> 0.5 ..."""
    inversion_batch_size: int = 64
    """... on batches of this size"""
    inversion_keep: float = 0.8
    """pruning keeps >= this share of the binary mask's flip rate (the purified mask)"""
    inversion_follow: float = 0.1
    """once a class is suspected, rescan only it every this share of the run"""
    inversion_budget: float = 0.0625
    """a backdoor target is reached through this share of the pixels (4 at 8x8) ..."""
    inversion_min_flip: float = 0.6
    """... flipping at least this share of the samples ..."""
    inversion_min_ratio: float = 2.0
    """... and this many times the median class's rate"""
    purify_fill: str = "inpaint"
    """the mask's pixels take their unmasked neighbours' mean | zero | mean (the samples')"""
    seed: int = 0
    """Seed of the defense's own randomness (shuffles, SR portions, inversion starts)."""

    def __post_init__(self) -> None:
        choices = {
            "sr": SR_MODES, "search": SEARCH_MODES, "surrogate": SURROGATE_MODES, "weights": WEIGHT_MODES,
            "sr_schedule": SR_SCHEDULES, "verify_rule": VERIFY_RULES, "mask": MASK_MODES, "generator_kl": ("mean", "sum"),
            "generator_norm": REGULARIZER_NORMS, "inversion": INVERSION_MODES, "purify_fill": PURIFY_FILLS,
            "sv_scope": SV_SCOPES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown defense.{name} '{getattr(self, name)}'; choose one of: {', '.join(allowed)}")
        for name in ("warmup_fraction", "sr_fraction", "threshold", "downweight_factor", "class_threshold"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0):
                raise ValueError(f"defense.{name} must be in [0, 1], got {value!r}")
        for name in ("surrogate_batches", "num_layers", "num_shuffles", "max_tries", "sr_every", "surrogate_stop", "min_tail",
                     "inversion_batches", "inversion_steps", "inversion_batch_size"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"defense.{name} must be an integer >= 1, got {value!r}")
        if not _is_int(self.surrogate_start) or not 0 <= self.surrogate_start < self.surrogate_stop:
            raise ValueError(
                f"defense.surrogate_start must be an integer in [0, surrogate_stop={self.surrogate_stop}), got {self.surrogate_start!r}"
            )
        if self.sr_steps is not None and (not _is_int(self.sr_steps) or self.sr_steps < 1):
            raise ValueError(f"defense.sr_steps must be null or an integer >= 1, got {self.sr_steps!r}")
        if not (isinstance(self.sr_lr, (int, float)) and math.isfinite(self.sr_lr) and self.sr_lr > 0):
            raise ValueError(f"defense.sr_lr must be a finite number > 0, got {self.sr_lr!r}")
        for name in ("inversion_keep", "inversion_budget", "inversion_min_flip", "inversion_follow"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 < v <= 1.0):
                raise ValueError(f"defense.{name} must be in (0, 1], got {v!r}")
        if not isinstance(self.use_sv, bool):
            raise ValueError(f"defense.use_sv must be true or false, got {self.use_sv!r}")
        for name in ("class_balance", "inversion_min_ratio"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"defense.{name} must be a finite number >= 0, got {v!r}")
        at = self.inversion_at
        at = [at] if isinstance(at, (int, float)) and not isinstance(at, bool) else at
        at = list(at) if isinstance(at, Sequence) and not isinstance(at, str) else at  # a list, tuple or ListConfig
        if (not isinstance(at, list) or not at
                or not all(isinstance(a, (int, float)) and not isinstance(a, bool) and 0 < a < 1 for a in at)):
            raise ValueError(f"defense.inversion_at must be a list of fractions in (0, 1), got {self.inversion_at!r}")
        self.inversion_at = sorted(float(a) for a in at)


def abd_config_for(name: str, **overrides: Any) -> ABDConfig | None:
    """The config of a named defense variant: ``abd`` (SV + SR), ``sv`` (SV only), ``sr``
    (SR only, always on), ``abd_ti`` (the config's settings as given: its preset
    ``configs/defense/abd_ti.yaml`` sets targeted retrospection and class balance), ``none`` (None)."""
    if name not in DEFENSE_NAMES:
        raise ValueError(f"unknown defense '{name}'; choose one of: {', '.join(DEFENSE_NAMES)}")
    if name == "none":
        return None
    sr_cfg = overrides.pop("sr_config", None)
    cfg = ABDConfig(**overrides, sr_config=SRConfig(**sr_cfg) if isinstance(sr_cfg, dict) else (sr_cfg or SRConfig()))
    if name in ("sv", "sr"):  # the ablation arms are the paper's parts, also beside defense=abd_ti
        cfg.inversion, cfg.class_balance = "off", 0.0
    if name == "sv":
        cfg.use_sv, cfg.sr = True, "off"
    elif name == "sr":
        cfg.use_sv, cfg.sr = False, "on"
    return cfg


class ABDDefense(NullDefense):
    """ABD (SV + SR, Algorithm 2) behind the :class:`abd_fl.distill.DistillDefense` hooks."""

    def __init__(self, config: ABDConfig | None = None) -> None:
        self.cfg = config or ABDConfig()
        self.late_phase_fraction = 0.0
        self.late_phase_lr = self.cfg.sr_lr
        self.late_phase_schedule = self.cfg.sr_schedule
        self._cache: list[torch.Tensor] = []
        self._counts: list[int] = []
        self._vaccines: list[VaccineResult | None] = []
        self._searched = False
        self._cache_start = 0
        self._search_at = 0
        self._iteration = -1
        self._step = 0
        self._sr_logs: list[dict[str, float]] = []
        self._flag_rate: list[float] = []
        self._flag_iter: list[list[float]] = []
        # teacher index -> [flagged samples (a tensor on the device: no host sync per step), samples]
        self._teacher_flags: dict[int, list] = {}
        self._class_flagged: torch.Tensor | None = None
        self._class_seen: torch.Tensor | None = None
        self._weights_mode = self.cfg.weights
        self._recent: list[torch.Tensor] = []
        self._inversion_its: list[int] = []
        self._follow_its: set[int] = set()
        self._triggers: list[InvertedTrigger] = []
        self._purify_mask: torch.Tensor | None = None
        self._fill: torch.Tensor | float | str = "inpaint"
        self._scans: list[dict[str, Any]] = []
        self._flips: list[float] | None = None
        self.ctx: DistillContext | None = None

    # ---- set-up and the vaccine search ---------------------------------------------
    def on_distill_start(self, ctx: DistillContext) -> None:
        if self.ctx is not None:
            raise RuntimeError("an ABDDefense serves one distill() run; build a new one for the next run")
        self.ctx = ctx
        cfg = self.cfg
        if cfg.inversion == "on":
            total = ctx.total_iterations
            self._inversion_its = sorted({max(1, min(total - 1, math.ceil(a * total))) for a in cfg.inversion_at})
            step = max(1, math.ceil(cfg.inversion_follow * total))
            self._follow_its = set(range(self._inversion_its[0] + step, total, step))
        if cfg.weights == "auto":
            self._weights_mode = "reference" if ctx.fixed_inputs else "off"
        total = ctx.total_iterations
        if cfg.surrogate == "window":
            stop = min(cfg.surrogate_stop, max(1, total // 2))
            start = min(cfg.surrogate_start, stop - 1)
            if stop != cfg.surrogate_stop:
                log.info("ABD: a %d-iteration run caches D_s in iterations [%d, %d) (configured [%d, %d))",
                         total, start, stop, cfg.surrogate_start, cfg.surrogate_stop)
            self._cache_start, self._search_at = start, stop
        else:
            self._cache_start = 0
            self._search_at = int(math.ceil(cfg.warmup_fraction * total))
        if not cfg.use_sv:
            self._searched = True
            self._vaccines = [None] * len(ctx.teachers)
            self._decide_sr()
            return
        if cfg.search == "off":  # SV from the first step, unverified (the reference's CIFAR-10 runs)
            self._vaccines = [
                VaccineResult(True, ShuffledEnsemble(t, cfg.num_shuffles, cfg.num_layers, seed=cfg.seed * 1000 + i),
                              math.nan, math.nan, [], verified=False)
                for i, t in enumerate(ctx.teachers)
            ]
            self._searched = True
            self._decide_sr()
            return
        if self._search_at == 0:
            self._cache = [ctx.sample_surrogate().detach() for _ in range(cfg.surrogate_batches)]
            self._counts = [1] * len(self._cache)
            self._search()

    def on_iteration(self, iteration: int) -> None:
        self._iteration = iteration
        if self.ctx is not None and (iteration in self._inversion_its or (self._triggers and iteration in self._follow_its)):
            self._retrospect()
        if self.ctx is None or iteration < self._search_at:
            return
        if not self._searched:
            if self.cfg.surrogate != "window" and len(self._cache) < self.cfg.surrogate_batches:
                missing = self.cfg.surrogate_batches - len(self._cache)
                self._cache += [self.ctx.sample_surrogate().detach() for _ in range(missing)]
                self._counts += [1] * missing
            self._search()
        elif self._cache and self.cfg.use_sv:  # search=off: report the unverified vaccines' scores on D_s
            self._score_unverified()

    def _caching(self) -> bool:
        if not self.cfg.use_sv or self.cfg.surrogate != "window":
            return False
        return self._cache_start <= self._iteration < self._search_at

    def _cache_batch(self, x: torch.Tensor) -> None:
        x = x.detach()
        if self._cache and self._cache[-1].shape == x.shape and torch.equal(self._cache[-1], x.to(self._cache[-1].device)):
            self._counts[-1] += 1  # the same batch again (one z serves 1 + k steps): counted, stored once
            return
        self._cache.append(x.cpu())
        self._counts.append(1)

    def _search(self) -> None:
        assert self.ctx is not None
        cfg = self.cfg
        if not self._cache:
            self._cache, self._counts = [self.ctx.sample_surrogate().detach()], [1]
        device = self.ctx.device
        batches = [b.to(device) for b in self._cache]
        self._vaccines = []
        for i, teacher in enumerate(self.ctx.teachers):
            log.info("vaccine search for teacher %d on %d cached samples", i, sum(b.shape[0] * c for b, c in zip(batches, self._counts)))
            self._vaccines.append(
                search_vaccine(
                    teacher, batches, num_layers=cfg.num_layers, num_shuffles=cfg.num_shuffles, threshold=cfg.threshold,
                    max_tries=cfg.max_tries, seed=cfg.seed * 1000 + i, batch_counts=self._counts, rule=cfg.verify_rule,
                    class_threshold=cfg.class_threshold, min_tail=cfg.min_tail,
                )
            )
        self._searched = True
        self._cache, self._counts = [], []
        found = [v is not None and v.found for v in self._vaccines]
        if cfg.downweight_suspicious and any(found) and not all(found):
            weights = [cfg.downweight_factor if f else 1.0 for f in found]
            set_weights = getattr(self.ctx.ensemble, "set_weights", None)
            if callable(set_weights):
                set_weights(weights)
                log.info("ensemble weights after the vaccine search: %s", weights)
        self._decide_sr()

    def _score_unverified(self) -> None:
        assert self.ctx is not None
        batches = [b.to(self.ctx.device) for b in self._cache]
        for v, teacher in zip(self._vaccines, self.ctx.teachers):
            if v is None or v.shuffled is None:
                continue
            s = score_vaccine(teacher, v.shuffled, batches, self._counts)
            v.tail_ratio, v.mean_score = s["ratio"], s["mean_score"]
            v.tail_class_share, v.tail_class = s["tail_class_share"], s["tail_class"]
            v.tries = [{"try": 0, "seed": v.shuffled.seed, **s}]
        self._cache, self._counts = [], []

    def _remember(self, x: torch.Tensor) -> None:
        """Keep the last ``inversion_batches`` distinct synthetic batches (the inversion's samples)."""
        last = max([*self._inversion_its, *self._follow_its]) if self._triggers else (self._inversion_its or [-1])[-1]
        if not self._inversion_its or self._iteration >= last:
            return
        if self._recent and self._recent[-1].shape == x.shape and torch.equal(self._recent[-1], x):
            return
        self._recent.append(x.detach())
        del self._recent[: -self.cfg.inversion_batches]

    def _retrospect(self) -> None:
        """Targeted retrospection: scan every class of the student for a trigger; a suspected
        one's mask joins the purification mask of the teachers' inputs (see the module doc).
        Once a class is suspected, later scans (every ``inversion_follow`` of the run, and at
        the remaining ``inversion_at`` points) revisit only the suspected classes, adding each
        mask that still flips at least ``inversion_min_flip``: a trigger the first mask did
        not cover (a distributed watermark) is purified step by step."""
        assert self.ctx is not None
        cfg, ctx = self.cfg, self.ctx
        if not self._recent:
            self._recent = [ctx.sample_surrogate().detach()]
        samples = torch.cat(self._recent).to(ctx.device)
        self._recent = []
        student = ctx.student
        modes = [(m, m.training) for m in student.modules()]
        requires = [(p, p.requires_grad) for p in student.parameters()]
        student.eval()
        for p, _ in requires:
            p.requires_grad_(False)
        try:
            with torch.no_grad():
                num_classes = int(student(samples[:1]).shape[1])
            budget = max(1, round(cfg.inversion_budget * samples.shape[-2] * samples.shape[-1]))
            follow_up = bool(self._triggers)
            classes = sorted({t.target for t in self._triggers}) if follow_up else range(num_classes)
            scans = scan_classes(student, samples, classes, keep=cfg.inversion_keep, budget=budget,
                                 seed=cfg.seed + 7 * len(self._scans), steps=cfg.inversion_steps,
                                 batch_size=cfg.inversion_batch_size)
            if follow_up:  # a suspected class whose trigger still flips: its new mask is added
                still = [t for t in scans if t.flip_at_budget >= cfg.inversion_min_flip]
                trigger, ratio = (max(still, key=lambda t: t.flip_at_budget) if still else None), math.nan
            else:
                trigger, ratio = suspect_class(scans, cfg.inversion_min_flip, cfg.inversion_min_ratio)
        finally:
            for m, training in modes:
                m.training = training
            for p, flag in requires:
                p.requires_grad_(flag)
        scan: dict[str, Any] = {
            "iteration": self._iteration, "samples": int(samples.shape[0]), "budget_pixels": budget, "follow_up": follow_up,
            "ratio": ratio if math.isfinite(ratio) else None, "classes": [t.summary() for t in scans], "suspect": None,
        }
        if trigger is not None:
            self._triggers.append(trigger)
            mask = trigger.mask.to(ctx.device)
            self._purify_mask = mask if self._purify_mask is None else torch.maximum(self._purify_mask, mask)
            if cfg.purify_fill == "zero":
                self._fill = 0.0
            elif cfg.purify_fill == "mean":
                self._fill = samples.mean(0, keepdim=True)
            scan["suspect"] = trigger.target
            scan["mask"] = trigger.mask[0, 0].nonzero().tolist()
            flips = [trigger_flip_rate(t, samples, trigger) for t in ctx.teachers]
            self._flips = flips if self._flips is None else [max(a, b) for a, b in zip(self._flips, flips)]
            scan["teacher_flip"] = flips
            log.info("ABD: student trigger for class %d (%d pixels, %.2f x the median class): teachers' inputs "
                     "purified from iteration %d", trigger.target, trigger.pixels, ratio, self._iteration)
        else:
            log.info("ABD: no student trigger at iteration %d (best class %.2f x the median): nothing switched on",
                     self._iteration, ratio)
        self._scans.append(scan)

    def teacher_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the teachers see of ``x``: purified once a trigger is found, else ``x``."""
        if self._purify_mask is None:
            return x
        return purify(x, self._purify_mask, self._fill)

    def _decide_sr(self) -> None:
        found_any = any(v is not None and v.found for v in self._vaccines)
        sr_on = self.cfg.sr == "on" or (self.cfg.sr == "auto" and not found_any)
        total = self.ctx.total_iterations if self.ctx is not None else 0
        if not sr_on:
            self.late_phase_fraction = 0.0
        elif self.cfg.sr_steps is not None and total > 0:
            steps = self.ctx.student_steps if self.ctx is not None else 1
            self.late_phase_fraction = min(1.0, math.ceil(self.cfg.sr_steps / max(1, steps)) / total)
        else:
            self.late_phase_fraction = self.cfg.sr_fraction
        log.info("ABD: vaccine %s for %d/%d teachers; SR %s",
                 "used unverified" if self.cfg.search == "off" and self.cfg.use_sv else "found",
                 sum(v is not None and v.found for v in self._vaccines), len(self._vaccines), "on" if sr_on else "off")

    def _teacher_flag_rates(self) -> list[float | None] | None:
        """Each teacher's own flag rate over the run (``None`` where its vaccine never acted);
        ``None`` when SV never acted."""
        if self.ctx is None or not self._teacher_flags:
            return None
        counts = [self._teacher_flags.get(i) for i in range(len(self.ctx.teachers))]
        return [float(c[0]) / c[1] if c is not None and c[1] > 0 else None for c in counts]

    def _active_indexed(self) -> list[tuple[int, nn.Module, nn.Module]]:
        """The vaccinated teachers with their index among the context's teachers, and their shuffled copies."""
        if not self._searched or self.ctx is None:
            return []
        return [(i, t, v.shuffled) for i, (t, v) in enumerate(zip(self.ctx.teachers, self._vaccines))
                if v is not None and v.found and v.shuffled is not None]

    # ---- the hooks -------------------------------------------------------------------
    def _balance_term(self, x: torch.Tensor) -> torch.Tensor | None:
        """``coef * sum_c pbar_c log pbar_c`` over the teachers' mean prediction on ``x``."""
        if self.cfg.class_balance <= 0 or self.ctx is None:
            return None
        mean = torch.softmax(self.ctx.ensemble(x), dim=1).mean(0)
        return self.cfg.class_balance * (mean * mean.clamp_min(1e-12).log()).sum()

    def generator_loss_term(self, x: torch.Tensor) -> torch.Tensor | None:
        if self._caching():
            self._cache_batch(x)
        balance = self._balance_term(x)
        sv = self._sv_term(x)
        if sv is None or balance is None:
            return sv if balance is None else balance
        return sv + balance

    def _regularizer(self, t_logits: torch.Tensor, s_logits: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        return vaccine_regularizer(t_logits, s_logits, cfg.generator_coef, cfg.generator_kl, cfg.mask, cfg.generator_norm)

    def _combined(self, indices: Sequence[int], logits: Sequence[torch.Tensor]) -> torch.Tensor:
        """The logits of teachers ``indices`` combined by the context ensemble's rule and
        weights (renormalised over them); ``mean_probs`` with equal weights for an ensemble
        module that has no rule."""
        ens = self.ctx.ensemble if self.ctx is not None else None
        all_weights = getattr(ens, "weights", None)
        if isinstance(all_weights, torch.Tensor) and all_weights.numel() == len(self.ctx.teachers):
            w = all_weights.detach()[list(indices)].float()
            w = w / w.sum() if float(w.sum()) > 0 else torch.full((len(indices),), 1.0 / len(indices))
        else:
            w = torch.full((len(indices),), 1.0 / len(indices))
        return combine_logits(torch.stack(list(logits)), w, getattr(ens, "rule", "mean_probs"), getattr(ens, "trim", 0.2))

    def _sv_term(self, x: torch.Tensor) -> torch.Tensor | None:
        active = self._active_indexed()
        if not active:
            return None
        terms, t_all, s_all = [], [], []
        flagged = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for i, t, s in active:
            t_logits, s_logits = t(x), s(x)
            mine = vaccine_mask(t_logits.detach(), s_logits.detach())
            counts = self._teacher_flags.setdefault(i, [0, 0])
            counts[0] = counts[0] + mine.sum()
            counts[1] += mine.numel()
            if self.cfg.sv_scope == "each":
                terms.append(self._regularizer(t_logits, s_logits))
                flagged |= mine
            t_all.append(t_logits)
            s_all.append(s_logits)
        labels = t_all[0].detach().argmax(1)  # the first active teacher's classes
        if self.cfg.sv_scope == "ensemble":
            indices = [i for i, _, _ in active]
            t_comb, s_comb = self._combined(indices, t_all), self._combined(indices, s_all)
            terms.append(self._regularizer(t_comb, s_comb))
            flagged = vaccine_mask(t_comb.detach(), s_comb.detach())
            labels = t_comb.detach().argmax(1)  # the ensemble's classes
        self._record_flags(flagged, labels)
        return torch.stack(terms).mean()

    def _record_flags(self, flagged: torch.Tensor, labels: torch.Tensor) -> None:
        """Flag rate of this batch (per iteration) and per teacher-predicted class (over the run)."""
        rate = float(flagged.float().mean())
        self._flag_rate.append(rate)
        self._flag_iter.append([float(self._iteration), rate])
        k = int(labels.max()) + 1 if labels.numel() else 1
        if self._class_seen is None or self._class_seen.numel() < k:
            size = max(k, 0 if self._class_seen is None else self._class_seen.numel())
            seen, flg = torch.zeros(size), torch.zeros(size)
            if self._class_seen is not None:
                seen[: self._class_seen.numel()] = self._class_seen
                flg[: self._class_flagged.numel()] = self._class_flagged
            self._class_seen, self._class_flagged = seen, flg
        labels = labels.cpu()
        self._class_seen += torch.bincount(labels, minlength=self._class_seen.numel()).float()
        self._class_flagged += torch.bincount(labels[flagged.cpu()], minlength=self._class_seen.numel()).float()

    def kd_sample_weights(self, x: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor | None:
        if self._caching():
            self._cache_batch(x)
        self._remember(x)
        if not self._searched:
            if self.cfg.surrogate == "latest" or (self.cfg.surrogate == "first" and len(self._cache) < self.cfg.surrogate_batches):
                self._cache.append(x.detach())
                self._counts.append(1)
                del self._cache[: -self.cfg.surrogate_batches]  # latest: a window of the last batches
                del self._counts[: -self.cfg.surrogate_batches]
            return None
        active = self._active_indexed()
        if not active or self._weights_mode == "off":
            return None
        with torch.no_grad():
            if self.cfg.sv_scope == "ensemble":
                indices = [i for i, _, _ in active]
                flagged = vaccine_mask(self._combined(indices, [t(x) for _, t, _ in active]),
                                       self._combined(indices, [s(x) for _, _, s in active]))
            else:
                flagged = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
                for _, t, s in active:
                    flagged |= vaccine_mask(t(x), s(x))
            self._flag_rate.append(float(flagged.float().mean()))
        return weights_from_mask(flagged, self._weights_mode, self.cfg.weight_alpha, self.cfg.weight_coef).to(x.device)

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
        def num(value: float) -> float | None:
            return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None

        teachers = []
        flips = self._flips
        for v in self._vaccines:
            if v is None:
                teachers.append({"searched": False})
            else:
                teachers.append({
                    "searched": v.verified, "verified": v.verified, "found": v.found, "tail_ratio": num(v.tail_ratio),
                    "mean_score": num(v.mean_score), "tries": len(v.tries),
                    "tail_class_share": num(v.tail_class_share), "tail_class": v.tail_class,
                })
        if self.ctx is not None and self.cfg.inversion == "on":
            if not teachers:
                teachers = [{"searched": False} for _ in self.ctx.teachers]
            for i, t in enumerate(teachers):  # the student trigger's flip rate on each teacher (0 when none was found)
                t["trigger_flip"] = float(flips[i]) if flips else (0.0 if self._scans else None)
        sr = self._sr_logs
        per_class = None
        if self._class_seen is not None:
            per_class = [
                {"class": c, "samples": int(n), "flag_rate": float(f / n) if n > 0 else None}
                for c, (n, f) in enumerate(zip(self._class_seen.tolist(), self._class_flagged.tolist()))
            ]
        return {
            "config": {k: v for k, v in asdict(self.cfg).items() if k != "sr_config"},
            "weights_mode": self._weights_mode,
            "teachers": teachers,
            "vaccines_found": sum(1 for t in teachers if t.get("found")),
            "sr_active": self.late_phase_fraction > 0,
            "sr_steps": len(sr),
            "sr_kl_mean": float(sum(d["sr_kl"] for d in sr) / len(sr)) if sr else None,
            "sr_scale_mean": float(sum(d["sr_scale"] for d in sr) / len(sr)) if sr else None,
            "flagged_share": float(sum(self._flag_rate) / len(self._flag_rate)) if self._flag_rate else None,
            "flag_rate_per_iteration": self._flag_iter,
            "flag_rate_per_class": per_class,
            "flag_rate_per_teacher": self._teacher_flag_rates(),
            "inversion": {
                "scans": self._scans, "suspects": [t.target for t in self._triggers],
                "purify_pixels": None if self._purify_mask is None else int(self._purify_mask.sum()),
            } if self._scans else None,
        }
