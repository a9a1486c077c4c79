"""The Shuffling Vaccine (SV) of ABD (Hong et al., ICML 2023, Sec. 4.1 and 4.3).

A *shuffled teacher* ``T~`` is a copy of the teacher ``T`` whose last few conv layers have
their input channels permuted (Channel Shuffling, Cai et al., 2022). Clean images rely on
many channels, so their prediction path is ruined by the shuffle; backdoor triggers light a
few channels strongly and tend to survive it. Hence the per-sample score (Sec. 4.1)

    S(x; T~) = log KL(T(x) || T~(x))

is *low* for suspicious (triggered) inputs. Following the reference code (DESIGN.md Sec. 4),
the teacher is the target distribution and the KL is averaged (not summed) over classes;
the paper writes ``KL(T~ || T)``.

What this module offers:

* :func:`conv_layers`, :func:`shuffled_copy`, :class:`ShuffledEnsemble` -- the shuffled
  teacher ``T~``; the paper uses "an ensemble of three shuffled teachers" (Sec. 4.1 (1)).
* :func:`shuffle_scores`, :func:`score_batches`, :func:`tail_ratio` -- ``S(x)`` and the
  tail ratio ``tau`` of Sec. 4.3.
* :func:`search_vaccine` -- vaccine verification and search (Sec. 4.3, Algorithm 2):
  re-shuffle up to 8 times until ``tau > 0.02`` on cached surrogate samples.
* :func:`vaccine_mask`, :func:`vaccine_regularizer` -- ``phi`` and the generator
  regulariser ``R`` (Sec. 4.1 (1)).
* :func:`kd_weights` -- per-sample distillation weights (Sec. 4.1 (2)), paper or reference form.
* :func:`suspicion_auc`, :func:`detection_auc` -- ROC AUCs (e.g. the paper's Fig. 4a).
"""

from __future__ import annotations

import copy
import logging
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "KL_FLOOR",
    "KD_WEIGHT_MODES",
    "ShuffledEnsemble",
    "VaccineResult",
    "conv_layers",
    "detection_auc",
    "kd_weights",
    "score_batches",
    "search_vaccine",
    "shuffle_scores",
    "shuffled_copy",
    "suspicion_auc",
    "score_vaccine",
    "soft_vaccine_mask",
    "tail_class_share",
    "tail_ratio",
    "teacher_labels",
    "vaccine_mask",
    "vaccine_regularizer",
]

KL_FLOOR: float = 1e-30
"""The class-averaged KL is clamped to at least this before the log, so ``S(x)`` stays finite
(a sample whose output the shuffle leaves unchanged scores ``log(KL_FLOOR)`` ~ -69.1)."""

KD_WEIGHT_MODES: tuple[str, ...] = ("paper", "reference")

_LOG = logging.getLogger("abd_fl")


# --------------------------------------------------------------------------------------
# Shuffled teachers (Sec. 4.1)
# --------------------------------------------------------------------------------------


def conv_layers(model: nn.Module) -> list[nn.Conv2d]:
    """All ``nn.Conv2d`` modules of ``model`` in registration order (``model.modules()``).

    For the networks of :mod:`abd_fl.models` this is forward order, stem first, and equals
    the state-dict order the reference code shuffles by (a shared module is listed once).
    """
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def shuffled_copy(model: nn.Module, num_layers: int = 5, seed: int = 0) -> nn.Module:
    """A deep copy of ``model`` with the last ``num_layers`` convs' input channels shuffled.

    Channel Shuffling (Sec. 4.1; reference: DESIGN.md Sec. 4): each of the last
    ``num_layers`` conv layers of :func:`conv_layers` gets its weight permuted along dim 1
    (input channels; for a grouped conv that is ``in_channels / groups``, so the permutation
    stays inside each group's slice) by its own random permutation, drawn in layer order
    from one ``torch.Generator`` seeded with ``seed``. Conv biases, all other convs, BN,
    linear layers and buffers are left bitwise equal. The reference shuffles 5 layers, the
    last stage of a WRN.

    If the model has fewer than ``num_layers`` convs, all of them are shuffled (e.g. the
    3-conv ``cnn``/``cnn_small``, whose first conv has a single input channel on grey
    images and is therefore unchanged). The copy is in eval mode with ``requires_grad``
    False on every parameter; gradients still flow to its inputs. ``model`` is not modified.
    """
    num_layers = _check_int("num_layers", num_layers, 1)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an int, got {seed!r}")
    shuffled = copy.deepcopy(model)
    shuffled.eval()
    for p in shuffled.parameters():
        p.requires_grad_(False)
    convs = conv_layers(shuffled)
    if not convs:
        raise ValueError(f"{type(model).__name__} has no nn.Conv2d layer to shuffle")
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for conv in convs[-num_layers:]:
            weight = conv.weight
            perm = torch.randperm(weight.shape[1], generator=gen).to(weight.device)
            weight.copy_(weight.index_select(1, perm))
    return shuffled


def _member_seeds(seed: int, count: int) -> list[int]:
    """``count`` well-mixed 32-bit seeds derived from ``seed`` (numpy SeedSequence)."""
    return [int(s) for s in np.random.SeedSequence(seed).generate_state(count)]


class ShuffledEnsemble(nn.Module):
    """``T~``: ``num_shuffles`` shuffled copies of ``teacher``, forward = their averaged logits.

    The paper uses "an ensemble of three shuffled teachers" (Sec. 4.1 (1)); the reference
    averages logits. Member ``j`` is ``shuffled_copy(teacher, num_layers, seeds[j])`` with
    ``seeds`` derived from ``seed`` (non-negative int) through ``numpy.random.SeedSequence``,
    so equal arguments give identical ensembles. The ensemble always stays in eval mode
    (``train()`` is a no-op) and has no trainable parameters.
    """

    def __init__(self, teacher: nn.Module, num_shuffles: int = 3, num_layers: int = 5, seed: int = 0) -> None:
        super().__init__()
        num_shuffles = _check_int("num_shuffles", num_shuffles, 1)
        seed = _check_int("seed", seed, 0)
        self.seed = seed
        self.num_layers = _check_int("num_layers", num_layers, 1)
        self.seeds: list[int] = _member_seeds(seed, num_shuffles)
        self.members = nn.ModuleList(shuffled_copy(teacher, self.num_layers, s) for s in self.seeds)
        super().train(False)

    def train(self, mode: bool = True) -> "ShuffledEnsemble":
        """Kept in eval mode: the shuffled teachers' BN statistics must never change."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(dim=0)


# --------------------------------------------------------------------------------------
# Scores and the tail ratio (Sec. 4.1, 4.3)
# --------------------------------------------------------------------------------------


def _check_logits(teacher_logits: torch.Tensor, shuffled_logits: torch.Tensor) -> None:
    if teacher_logits.ndim != 2 or teacher_logits.shape != shuffled_logits.shape:
        raise ValueError(
            "teacher and shuffled logits must both have shape (N, K), got "
            f"{tuple(teacher_logits.shape)} and {tuple(shuffled_logits.shape)}"
        )


def _kl_terms(teacher_logits: torch.Tensor, shuffled_logits: torch.Tensor) -> torch.Tensor:
    """Elementwise ``p_T * (log p_T - log p_T~)``, shape (N, K) (teacher as target)."""
    _check_logits(teacher_logits, shuffled_logits)
    log_p_t = F.log_softmax(teacher_logits, dim=1)
    log_p_s = F.log_softmax(shuffled_logits, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True)


def shuffle_scores(teacher_logits: torch.Tensor, shuffled_logits: torch.Tensor) -> torch.Tensor:
    """``S(x) = log(mean_k p_T,k (log p_T,k - log p_T~,k))`` per sample, shape (N,).

    Sec. 4.1's score with the reference code's conventions (teacher as the KL target, mean
    over the K classes, i.e. ``KL(T || T~) / K``). The class-averaged KL is clamped at
    :data:`KL_FLOOR` before the log. Low score = the shuffle barely changed the output =
    suspicious. Differentiable; detach the inputs when only the values are needed.
    """
    kl = _kl_terms(teacher_logits, shuffled_logits).mean(dim=1)
    return kl.clamp_min(KL_FLOOR).log()


def tail_ratio(scores: torch.Tensor | Sequence[float]) -> float:
    """``tau``: the fraction of scores strictly below ``mean - 3 * std`` (Sec. 4.3).

    ``std`` is the population standard deviation (ddof = 0), computed in float64. A normal
    sample gives about 0.00135 (three-sigma rule); the paper accepts a vaccine when
    ``tau > 0.02``. Identical scores give 0.
    """
    s = torch.as_tensor(scores).detach().to(device="cpu", dtype=torch.float64).flatten()
    if s.numel() == 0:
        raise ValueError("tail_ratio needs at least one score")
    if not bool(torch.isfinite(s).all()):
        raise ValueError("tail_ratio got non-finite scores")
    mean = s.mean()
    std = s.std(unbiased=False)
    return float((s < mean - 3.0 * std).double().mean())


def _model_device(model: nn.Module) -> torch.device | None:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return None


@torch.no_grad()
def score_batches(
    teacher: nn.Module, shuffled: nn.Module, batches: Sequence[torch.Tensor]
) -> torch.Tensor:
    """``S(x)`` (:func:`shuffle_scores`) of every sample in ``batches``, concatenated on CPU.

    Each batch is moved to the teacher's device. Both models are evaluated in eval mode
    (the teacher's mode is restored afterwards).
    """
    if len(batches) == 0:
        raise ValueError("score_batches needs at least one batch")
    device = _model_device(teacher)
    was_training = teacher.training
    teacher.eval()
    shuffled.eval()
    try:
        out = []
        for x in batches:
            x = x.to(device) if device is not None else x
            out.append(shuffle_scores(teacher(x), shuffled(x)).cpu())
    finally:
        teacher.train(was_training)
    return torch.cat(out)


# --------------------------------------------------------------------------------------
# Vaccine search (Sec. 4.3, Algorithm 2)
# --------------------------------------------------------------------------------------


@dataclass
class VaccineResult:
    """Outcome of :func:`search_vaccine`.

    ``shuffled`` is the accepted ensemble (None when no try passed the threshold).
    ``tail_ratio`` and ``mean_score`` belong to the accepted try, or to the try with the
    largest tail ratio when none was accepted. ``tries`` has one dict per try:
    ``{"try", "seed", "ratio", "mean_score"}``; ``ShuffledEnsemble(teacher, num_shuffles,
    num_layers, seed)`` rebuilds that try's ensemble.
    """

    found: bool
    shuffled: ShuffledEnsemble | None
    tail_ratio: float
    mean_score: float
    tries: list[dict[str, Any]] = field(default_factory=list)
    verified: bool = True
    """False for a vaccine used without verification (``search="off"``, the reference's CIFAR-10 runs)."""
    tail_class_share: float = math.nan
    """Share of the low-score tail (below mean - 3 std) that the teacher labels with the tail's
    most common class (:func:`tail_class_share`); NaN when the tail is empty."""
    tail_class: int = -1
    """That most common class (-1 when the tail is empty)."""


def tail_class_share(scores: torch.Tensor, labels: torch.Tensor) -> tuple[float, int, int]:
    """(share, class, size) of the low-score tail's most common teacher label.

    The tail is the samples with ``S(x) < mean - 3 std`` (as :func:`tail_ratio`); ``labels``
    are the teacher's argmax classes of the same samples. A backdoored teacher's tail on
    synthetic data is mostly the target class; a clean teacher's tail is spread over classes
    (docs/results.md, "What limits SV at 8x8"). A data-free statistic: no label or target is known.
    Returns ``(nan, -1, 0)`` for an empty tail.
    """
    s = torch.as_tensor(scores).detach().cpu().double().flatten()
    y = torch.as_tensor(labels).detach().cpu().long().flatten()
    if s.shape != y.shape:
        raise ValueError(f"scores ({tuple(s.shape)}) and labels ({tuple(y.shape)}) differ in shape")
    tail = s < s.mean() - 3.0 * s.std(unbiased=False)
    n = int(tail.sum())
    if n == 0:
        return math.nan, -1, 0
    counts = torch.bincount(y[tail])
    cls = int(counts.argmax())
    return float(counts[cls]) / n, cls, n


VERIFY_RULES = ("tail_ratio", "tail_class")


def _try_seed(seed: int, attempt: int) -> int:
    return int(np.random.SeedSequence([seed, attempt]).generate_state(1)[0])


def search_vaccine(
    teacher: nn.Module,
    surrogate_batches: Sequence[torch.Tensor],
    *,
    num_layers: int = 5,
    num_shuffles: int = 3,
    threshold: float = 0.02,
    max_tries: int = 8,
    seed: int = 0,
    logger: logging.Logger | None = None,
    batch_counts: Sequence[int] | None = None,
    rule: str = "tail_ratio",
    class_threshold: float = 0.6,
    min_tail: int = 10,
) -> VaccineResult:
    """Vaccine verification and search (Sec. 4.3; Algorithm 2, "search for T~ at most 8 trials").

    Each try builds a fresh :class:`ShuffledEnsemble` (seed derived from ``seed`` and the
    try index), scores every cached surrogate sample with :func:`shuffle_scores` and
    computes :func:`tail_ratio`; the first try with ``ratio > threshold`` is accepted
    (``rule="tail_ratio"``, the paper's). ``rule="tail_class"`` (our data-free alternative,
    not in the paper) accepts instead when the tail holds at least ``min_tail`` samples and
    :func:`tail_class_share` is at least ``class_threshold``. ``batch_counts`` gives each
    batch a multiplicity (a batch the loop used k times counts k times, as the reference's
    cache of every inner step holds it k times). Each
    try is logged at INFO level on ``logger`` (default: the ``"abd_fl"`` logger). When no
    try passes, ``found`` is False and the caller falls back to Self-Retrospection only.
    """
    is_real = isinstance(threshold, numbers.Real) and not isinstance(threshold, bool)
    threshold_f = float(threshold) if is_real else math.nan
    if not 0.0 <= threshold_f <= 1.0:
        raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
    max_tries = _check_int("max_tries", max_tries, 1)
    num_shuffles = _check_int("num_shuffles", num_shuffles, 1)
    num_layers = _check_int("num_layers", num_layers, 1)
    seed = _check_int("seed", seed, 0)
    if rule not in VERIFY_RULES:
        raise ValueError(f"unknown vaccine verification rule '{rule}'; choose one of: {', '.join(VERIFY_RULES)}")
    counts_in = list(batch_counts) if batch_counts is not None else [1] * len(surrogate_batches)
    if len(counts_in) != len(surrogate_batches) or any(int(c) < 1 for c in counts_in):
        raise ValueError(f"batch_counts must hold one integer >= 1 per batch, got {counts_in!r}")
    kept = [(b, int(c)) for b, c in zip(surrogate_batches, counts_in) if b.shape[0] > 0]
    batches = [b for b, _ in kept]
    repeats = torch.tensor([c for b, c in kept for _ in range(b.shape[0])], dtype=torch.long)
    if not batches:
        raise ValueError("surrogate_batches is empty: the vaccine search needs cached surrogate samples")
    log = logger if logger is not None else _LOG

    labels = teacher_labels(teacher, batches).repeat_interleave(repeats)
    tries: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    for attempt in range(max_tries):
        try_seed = _try_seed(seed, attempt)
        ensemble = ShuffledEnsemble(teacher, num_shuffles=num_shuffles, num_layers=num_layers, seed=try_seed)
        scores = score_batches(teacher, ensemble, batches).repeat_interleave(repeats)
        share, cls, n_tail = tail_class_share(scores, labels)
        record = {
            "try": attempt + 1,
            "seed": try_seed,
            "ratio": tail_ratio(scores),
            "mean_score": float(scores.double().mean()),
            "tail_class_share": share,
            "tail_class": cls,
            "tail_size": n_tail,
        }
        tries.append(record)
        if rule == "tail_ratio":
            accepted = record["ratio"] > threshold_f
        else:
            accepted = n_tail >= min_tail and share >= class_threshold
        log.info(
            "vaccine search try %d/%d: tail ratio %.4f (threshold %.4f), mean score %.3f%s",
            attempt + 1, max_tries, record["ratio"], threshold_f, record["mean_score"],
            " -> accepted" if accepted else "",
        )
        if accepted:
            return VaccineResult(True, ensemble, record["ratio"], record["mean_score"], tries,
                                 tail_class_share=share, tail_class=cls)
        if best is None or record["ratio"] > best["ratio"]:
            best = record
    assert best is not None
    log.info("vaccine search: no vaccine found in %d tries (best tail ratio %.4f)", max_tries, best["ratio"])
    return VaccineResult(False, None, best["ratio"], best["mean_score"], tries,
                         tail_class_share=best["tail_class_share"], tail_class=best["tail_class"])


@torch.no_grad()
def teacher_labels(teacher: nn.Module, batches: Sequence[torch.Tensor]) -> torch.Tensor:
    """The teacher's argmax class of every sample in ``batches`` (eval mode), on CPU."""
    device = _model_device(teacher)
    was_training = teacher.training
    teacher.eval()
    try:
        return torch.cat([teacher(x.to(device) if device is not None else x).argmax(1).cpu() for x in batches])
    finally:
        teacher.train(was_training)


def score_vaccine(
    teacher: nn.Module, shuffled: nn.Module, batches: Sequence[torch.Tensor], batch_counts: Sequence[int] | None = None
) -> dict[str, float]:
    """Tail ratio, mean score and tail-class share of a given ``T~`` on cached batches (no gating)."""
    counts = list(batch_counts) if batch_counts is not None else [1] * len(batches)
    repeats = torch.tensor([int(c) for b, c in zip(batches, counts) for _ in range(b.shape[0])], dtype=torch.long)
    scores = score_batches(teacher, shuffled, batches).repeat_interleave(repeats)
    share, cls, n_tail = tail_class_share(scores, teacher_labels(teacher, batches).repeat_interleave(repeats))
    return {"ratio": tail_ratio(scores), "mean_score": float(scores.double().mean()),
            "tail_class_share": share, "tail_class": cls, "tail_size": n_tail}


# --------------------------------------------------------------------------------------
# Using the vaccine: generator regulariser and distillation weights (Sec. 4.1 (1), (2))
# --------------------------------------------------------------------------------------


def vaccine_mask(teacher_logits: torch.Tensor, shuffled_logits: torch.Tensor) -> torch.Tensor:
    """``phi`` (Sec. 4.1): True where ``argmax T~(x) == argmax T(x)`` (flagged), shape (N,) bool."""
    _check_logits(teacher_logits, shuffled_logits)
    return teacher_logits.argmax(dim=1) == shuffled_logits.argmax(dim=1)


MASK_MODES = ("hard", "soft")
REGULARIZER_NORMS = ("flagged", "batch")


def soft_vaccine_mask(teacher_logits: torch.Tensor, shuffled_logits: torch.Tensor) -> torch.Tensor:
    """A soft ``phi`` in [0, 1] (our calibration option, not the paper's): the shuffled
    teacher's probability of the teacher's class, ``p_T~(argmax T | x)``; detached, shape (N,)."""
    _check_logits(teacher_logits, shuffled_logits)
    cls = teacher_logits.detach().argmax(dim=1, keepdim=True)
    return F.softmax(shuffled_logits.detach(), dim=1).gather(1, cls).squeeze(1)


def vaccine_regularizer(
    teacher_logits: torch.Tensor,
    shuffled_logits: torch.Tensor,
    coef: float = 0.1,
    class_reduction: str = "mean",
    mask: str = "hard",
    normalize: str = "flagged",
) -> torch.Tensor:
    """The SV term to ADD to a generator's loss (Sec. 4.1 (1)), a scalar.

    The paper's generator solves ``max_P E[KL(T||S) + alpha * R]`` with
    ``R = phi * KL(T(x) || T~(x))``: it should push flagged samples (those whose prediction
    survives the shuffle) away from the shuffled teacher, i.e. make them less backdoor-like.
    Generators here *minimise* their loss, so the returned term is

        -coef * mean_{i: phi_i = 1} KL(T(x_i) || T~(x_i))

    (teacher as target; the KL averaged over classes, ``class_reduction="mean"``, and over the
    flagged samples, as the reference's ``zskt/utils/syn_vaccine.py``; coef = alpha = 0.1
    there; ``"sum"`` sums over classes). It is 0 (with zero gradient) when no sample is
    flagged. Gradients flow into both logit tensors (hence to the generated inputs through
    T and T~); ``phi`` itself is not differentiated. ``mask="soft"`` weights each sample by
    :func:`soft_vaccine_mask` instead of the hard label match. ``normalize="batch"`` (our
    calibration option) divides by the batch size instead of the flagged count, so the term
    shrinks with the share of flagged samples (the reference's mean over the flagged samples
    gives a lone flagged sample ``coef`` times the weight of the whole batch's KD term).
    """
    if class_reduction not in ("mean", "sum"):
        raise ValueError(f"unknown class_reduction '{class_reduction}'; choose one of: mean, sum")
    if mask not in MASK_MODES:
        raise ValueError(f"unknown vaccine mask '{mask}'; choose one of: {', '.join(MASK_MODES)}")
    if normalize not in REGULARIZER_NORMS:
        raise ValueError(f"unknown regulariser normalisation '{normalize}'; choose one of: {', '.join(REGULARIZER_NORMS)}")
    terms = _kl_terms(teacher_logits, shuffled_logits)
    kl = terms.mean(dim=1) if class_reduction == "mean" else terms.sum(dim=1)
    if mask == "hard":
        phi = vaccine_mask(teacher_logits.detach(), shuffled_logits.detach()).to(kl.dtype)
    else:
        phi = soft_vaccine_mask(teacher_logits, shuffled_logits).to(kl.dtype)
    if normalize == "batch":
        return -float(coef) * (kl * phi).sum() / kl.shape[0]
    return -float(coef) * (kl * phi).sum() / phi.sum().clamp_min(1.0 if mask == "hard" else 1e-12)


def kd_weights(
    teacher_logits: torch.Tensor,
    shuffled_logits: torch.Tensor,
    mode: str = "paper",
    alpha: float = 10.0,
    coef: float = 0.1,
) -> torch.Tensor:
    """Per-sample weights (N,) for the KD loss ``mean_i w_i KL(T(x_i) || S(x_i))`` (Sec. 4.1 (2)).

    ``mode="paper"``: ``w = 1 - phi + phi / alpha`` exactly as the paper's equation. The text
    says a flagged sample's loss "will be shrunk by alpha", so ``alpha`` here is the divisor
    and defaults to 10.0 (flagged samples get weight 0.1). Note that plugging the paper's
    alpha = 0.1 (the regulariser coefficient) into the formula would instead multiply
    flagged samples by 10; we follow the text's intent. Requires ``alpha > 0``.

    ``mode="reference"``: the reference code's ``mean(KL[~m]) - coef * mean(KL[m])``
    reproduced exactly as a batch mean: ``w_i = N / |~m|`` for unflagged and
    ``w_i = -coef * N / |m|`` for flagged samples, so ``mean(w * kl)`` equals that expression
    (an empty group contributes 0, where the reference would produce NaN). Flagged samples
    are thus actively *un-learned* rather than down-weighted. ``alpha`` is unused.

    The weights are detached and on the logits' device and dtype.
    """
    mask = vaccine_mask(teacher_logits.detach(), shuffled_logits.detach())
    dtype = teacher_logits.dtype if teacher_logits.is_floating_point() else torch.float32
    return weights_from_mask(mask, mode, alpha, coef).to(dtype)


def weights_from_mask(mask: torch.Tensor, mode: str = "paper", alpha: float = 10.0, coef: float = 0.1) -> torch.Tensor:
    """The weights of :func:`kd_weights` from a given flag mask ``phi`` (N,) bool.

    With several teachers, each with its own vaccine, a sample is flagged when any
    vaccinated teacher flags it (:class:`abd_fl.defense.ABDDefense`).
    """
    phi = mask.to(torch.float32)
    if mode == "paper":
        if not alpha > 0 or math.isinf(alpha):
            raise ValueError(f"alpha must be a finite number > 0, got {alpha}")
        return (1.0 - phi + phi / float(alpha)).detach()
    if mode == "reference":
        n = float(mask.numel())
        n_flagged = float(mask.sum())
        n_clean = n - n_flagged
        w_clean = n / n_clean if n_clean > 0 else 0.0
        w_flagged = -float(coef) * n / n_flagged if n_flagged > 0 else 0.0
        return torch.where(mask, torch.full_like(phi, w_flagged), torch.full_like(phi, w_clean)).detach()
    raise ValueError(f"unknown kd_weights mode '{mode}'; choose one of: {', '.join(KD_WEIGHT_MODES)}")


# --------------------------------------------------------------------------------------
# AUCs
# --------------------------------------------------------------------------------------


def _as_1d_float(values: torch.Tensor | Sequence[float], name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        arr = values.detach().cpu().double().numpy()
    else:
        arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains non-finite values")
    return arr


def suspicion_auc(
    scores_by_client: torch.Tensor | Sequence[float], malicious: torch.Tensor | Sequence[bool]
) -> float:
    """ROC AUC of per-client suspicion scores against the true malicious flags.

    Higher score = more likely malicious (pass e.g. the tail ratio, or the negated mean
    ``S``). NaN when only one class is present (AUC undefined).
    """
    from sklearn.metrics import roc_auc_score

    scores = _as_1d_float(scores_by_client, "scores_by_client")
    labels = np.asarray(malicious.detach().cpu() if isinstance(malicious, torch.Tensor) else malicious).astype(bool)
    if labels.ndim != 1 or labels.shape[0] != scores.shape[0]:
        raise ValueError(f"scores_by_client ({scores.shape[0]}) and malicious ({labels.shape}) differ in length")
    if scores.size == 0 or labels.all() or not labels.any():
        return math.nan
    return float(roc_auc_score(labels, scores))


def detection_auc(
    clean_scores: torch.Tensor | Sequence[float], triggered_scores: torch.Tensor | Sequence[float]
) -> float:
    """ROC AUC of ``-S(x)`` separating triggered (positive) from clean (negative) samples.

    The paper's Fig. 4a (AUC 0.984 there). 1.0 = every triggered sample scores below every
    clean one. NaN when either set is empty.
    """
    clean = _as_1d_float(clean_scores, "clean_scores")
    triggered = _as_1d_float(triggered_scores, "triggered_scores")
    labels = np.concatenate([np.zeros(clean.size, dtype=bool), np.ones(triggered.size, dtype=bool)])
    return suspicion_auc(-np.concatenate([clean, triggered]), labels)
