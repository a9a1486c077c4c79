"""FedGen (Zhu et al., ICML 2021, "Data-Free Knowledge Distillation for Heterogeneous
Federated Learning"): a label-conditioned generator in *feature space*, torch only.

Every round the server (the Flower glue is :mod:`strategies.fedgen`):

1. aggregates the client models with FedAvg (that aggregate is FedGen's global model);
2. trains a small generator ``G(z, y)`` (noise ``z ~ N(0, I)`` concatenated with a
   one-hot label ``y``; two Linear layers with BatchNorm and ReLU between) whose output is
   a feature vector of the classifier head's input width (``model.feature_dim``), so that
   every client's *head* (``model.head``, the final Linear) classifies ``G(z, y)`` as
   ``y`` (:func:`train_feature_generator`). Client ``c``'s cross-entropy on label ``y``
   is weighted by its share of the clients' examples of ``y``
   (``counts[c, y] / sum_c' counts[c', y]``, :func:`label_weights`), so a client that
   never saw a label has no say on it. A diversity term keeps the generator from
   collapsing: ``exp(-mean_ij ||z_i - z_j||^2_mean * |G_i - G_j|_mean)`` (pairs of the
   batch; the loss is small when different noises give different features);
3. sends the generator's state (its weights, BatchNorm statistics and the label
   distribution ``p(y)`` it samples from, a buffer) to the clients with the next round's
   global model.

Each client then adds FedGen's regulariser to its local cross-entropy
(:class:`FedGenRegularizer`): ``alpha * CE(head(G(z, y_s)), y_s)`` for ``y_s ~ p(y)``
(the paper's objective, Eq. 5: the head learns the consensus feature distribution of
all clients), and, when ``beta > 0``, the reference code's extra term
``beta * KL(softmax(head(G(z, y))) || softmax(model(x)))`` on the client's own batch
``(x, y)`` (not in the paper's equations; off by default). The generator is frozen on
the client (eval mode, running BatchNorm statistics).

``p(y)`` (``label_sampling``): ``prior`` (the paper's ``p^(y)``, the clients' pooled label
counts) or ``uniform`` over the labels any client holds more than ``min_label_count``
examples of (the reference code's "qualified labels"; only those are generated either way).

How a defense attaches (also in README, "How ABD attaches to FedGen"): ABD's
Shuffling Vaccine acts on the *input channels* of a model's last conv stage, and
Self-Retrospection on an *input-space* perturbation; generated features bypass both
(they enter after the conv stages). So this module exposes no defense hook of its own:
with ``defense=abd|sv|sr`` the server runs the existing distillation loop
(:func:`abd_fl.distill.distill`, input-space synthesizer, the defense through
:mod:`abd_fl.distill.hooks`) as a short data-free repair of the FedAvg model, and the
undefended arm is the FedAvg model itself.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from abd_fl.distill.synthesizers.common import check_int

_PREFIX = "strategy.fedgen."  # the config keys FedGenConfig validates

__all__ = [
    "GENERATOR_RECORD_KEY",
    "LABEL_SAMPLING",
    "FedGenConfig",
    "FeatureGenerator",
    "GeneratorPayloadError",
    "FedGenRegularizer",
    "check_generator_state",
    "diversity_loss",
    "label_distribution",
    "label_weights",
    "model_head",
    "train_feature_generator",
]

GENERATOR_RECORD_KEY = "fedgen-generator"
"""Name of the generator's ArrayRecord in a FedGen train message (beside ``arrays``)."""

LABEL_SAMPLING = ("prior", "uniform")


@dataclass
class FedGenConfig:
    """FedGen's settings: the generator, its server-side training, the clients' regulariser."""

    noise_dim: int = 32
    hidden_dim: int = 256
    steps: int = 100
    """Generator steps per round on the server."""
    batch_size: int = 64
    lr: float = 1e-3
    teacher_weight: float = 1.0
    """Weight of the label-count-weighted CE of the clients' heads."""
    diversity_weight: float = 1.0
    label_sampling: str = "prior"
    min_label_count: int = 1
    """A label is generated only if some client holds more than this many examples of it."""
    reg_alpha: float = 1.0
    """Client: weight of CE(head(G(z, y)), y) (the paper's regulariser)."""
    reg_beta: float = 0.0
    """Client: weight of the reference code's KL term on the client's own batch (0 = off, as the paper)."""
    reg_decay: float = 0.98
    """alpha and beta are multiplied by ``reg_decay ** (round - 2)`` (the first regularised round is 2)."""
    reg_batch_size: int = 32
    """Generated features per local step."""
    defense_iterations: int | None = None
    """Defended arms: iterations of the data-free repair distillation (None = distill.iterations)."""

    def __post_init__(self) -> None:
        for name in ("noise_dim", "hidden_dim", "batch_size", "reg_batch_size"):
            check_int(name, getattr(self, name), 2 if "batch" in name else 1, prefix=_PREFIX)
        check_int("steps", self.steps, 0, prefix=_PREFIX)
        check_int("min_label_count", self.min_label_count, 0, prefix=_PREFIX)
        if self.defense_iterations is not None:
            check_int("defense_iterations", self.defense_iterations, 0, prefix=_PREFIX)
        for name in ("lr",):
            _check_number(f"strategy.fedgen.{name}", getattr(self, name), positive=True)
        for name in ("teacher_weight", "diversity_weight", "reg_alpha", "reg_beta"):
            _check_number(f"strategy.fedgen.{name}", getattr(self, name))
        _check_number("strategy.fedgen.reg_decay", self.reg_decay, positive=True)
        if self.label_sampling not in LABEL_SAMPLING:
            raise ValueError(
                f"unknown strategy.fedgen.label_sampling '{self.label_sampling}'; choose one of: {', '.join(LABEL_SAMPLING)}"
            )

    def regularizer_weights(self, server_round: int) -> tuple[float, float]:
        """(alpha, beta) of the clients' regulariser in ``server_round`` (decayed per round)."""
        factor = self.reg_decay ** max(0, server_round - 2)
        return self.reg_alpha * factor, self.reg_beta * factor


def _check_number(key: str, value: Any, positive: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        raise ValueError(f"{key} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")


def model_head(model: nn.Module) -> nn.Module:
    """The classifier head of ``model`` (``model.head``): ``model(x) == head(model.features(x))``."""
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Module) or not callable(getattr(model, "features", None)):
        raise ValueError(
            f"FedGen needs a model with a features(x) / head split (abd_fl.models); {type(model).__name__} has none"
        )
    return head


class FeatureGenerator(nn.Module):
    """``G(z, y)``: noise (N, noise_dim) and labels (N,) -> features (N, feature_dim).

    ``label_probs`` (a buffer, part of the state dict that travels to the clients) is the
    distribution the clients sample labels from.
    """

    label_probs: torch.Tensor

    def __init__(self, num_classes: int, feature_dim: int, noise_dim: int = 32, hidden_dim: int = 256) -> None:
        super().__init__()
        for key, value in (("num_classes", num_classes), ("feature_dim", feature_dim), ("noise_dim", noise_dim), ("hidden_dim", hidden_dim)):
            check_int(key, value, 1, prefix="")
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        self.noise_dim = noise_dim
        self.hidden = nn.Sequential(nn.Linear(noise_dim + num_classes, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU())
        self.out = nn.Linear(hidden_dim, feature_dim)
        self.register_buffer("label_probs", torch.full((num_classes,), 1.0 / num_classes))

    def noise(self, n: int, rng: torch.Generator | None = None) -> torch.Tensor:
        """``N(0, I)`` noise drawn on the CPU (same values on any device), moved to the generator's device."""
        return torch.randn(n, self.noise_dim, generator=rng).to(self.label_probs.device)

    def forward(self, labels: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        if noise is None:
            noise = self.noise(labels.shape[0])
        onehot = F.one_hot(labels.long(), self.num_classes).to(noise.dtype)
        return self.out(self.hidden(torch.cat([noise, onehot], dim=1)))

    def sample_labels(self, n: int, rng: torch.Generator | None = None) -> torch.Tensor:
        """``n`` labels drawn from ``label_probs`` (on the generator's device)."""
        idx = torch.multinomial(self.label_probs.detach().cpu().double(), n, replacement=True, generator=rng)
        return idx.to(self.label_probs.device)


class GeneratorPayloadError(ValueError):
    """A FedGen generator state that does not fit the expected generator."""


def check_generator_state(reference: FeatureGenerator, state: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`GeneratorPayloadError` unless ``state`` fits ``reference`` exactly: the
    same keys, shapes and dtypes, finite values, and a label distribution (``label_probs``)
    of non-negative numbers summing to 1."""
    expected = reference.state_dict()
    keys = set(state)
    if keys != set(expected):
        extra, missing = sorted(keys - set(expected)), sorted(set(expected) - keys)
        raise GeneratorPayloadError(f"FedGen generator payload: keys differ (unexpected {extra[:3]}, missing {missing[:3]})")
    for key, ref in expected.items():
        value = state[key]
        if not isinstance(value, torch.Tensor):
            raise GeneratorPayloadError(f"FedGen generator payload: '{key}' is not a tensor")
        if tuple(value.shape) != tuple(ref.shape):
            raise GeneratorPayloadError(f"FedGen generator payload: '{key}' has shape {tuple(value.shape)}, expected {tuple(ref.shape)}")
        if value.dtype != ref.dtype:
            raise GeneratorPayloadError(f"FedGen generator payload: '{key}' has dtype {value.dtype}, expected {ref.dtype}")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise GeneratorPayloadError(f"FedGen generator payload: '{key}' has non-finite values")
    probs = state["label_probs"].double()
    if bool((probs < 0).any()) or abs(float(probs.sum()) - 1.0) > 1e-4:
        raise GeneratorPayloadError(
            f"FedGen generator payload: label_probs must be non-negative and sum to 1, got sum {float(probs.sum()):.6f}"
        )


def label_weights(label_counts: torch.Tensor) -> torch.Tensor:
    """(K, C) weights ``w[y, c] = counts[c, y] / sum_c' counts[c', y]`` from (C, K) label counts.

    Each label's column of client weights sums to 1; a label no client holds gets equal weights.
    """
    counts = torch.as_tensor(label_counts, dtype=torch.float64)
    if counts.ndim != 2 or bool((counts < 0).any()) or not bool(torch.isfinite(counts).all()):
        raise ValueError(f"label counts must be a (clients, classes) array of finite non-negative numbers, got shape {tuple(counts.shape)}")
    totals = counts.sum(dim=0, keepdim=True)
    uniform = torch.full_like(counts, 1.0 / counts.shape[0])
    return torch.where(totals > 0, counts / totals.clamp_min(1e-12), uniform).T.contiguous().float()


def label_distribution(label_counts: torch.Tensor, sampling: str = "prior", min_label_count: int = 1) -> torch.Tensor:
    """``p(y)`` (K,) over the labels some client holds more than ``min_label_count`` examples of
    (all held labels when none qualifies): proportional to the pooled counts (``prior``) or
    uniform over them (``uniform``)."""
    counts = torch.as_tensor(label_counts, dtype=torch.float64)
    if sampling not in LABEL_SAMPLING:
        raise ValueError(f"unknown label sampling '{sampling}'; choose one of: {', '.join(LABEL_SAMPLING)}")
    qualified = counts.max(dim=0).values > min_label_count
    if not bool(qualified.any()):
        qualified = counts.sum(dim=0) > 0
    if not bool(qualified.any()):
        raise ValueError("FedGen: the clients reported no labelled examples at all")
    mass = counts.sum(dim=0) if sampling == "prior" else torch.ones(counts.shape[1], dtype=torch.float64)
    mass = torch.where(qualified, mass, torch.zeros_like(mass))
    return (mass / mass.sum()).float()


def diversity_loss(noise: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """``exp(-mean_ij d_z(i, j) * d_f(i, j))`` with ``d_z`` the mean squared and ``d_f`` the
    mean absolute difference between samples ``i`` and ``j`` of the batch: small when
    different noises give different features (mode seeking)."""
    d_z = (noise.unsqueeze(0) - noise.unsqueeze(1)).pow(2).mean(dim=2)
    d_f = (features.unsqueeze(0) - features.unsqueeze(1)).abs().mean(dim=2)
    return torch.exp(-(d_z * d_f).mean())


def _frozen(module: nn.Module, device: torch.device) -> nn.Module:
    out = copy.deepcopy(module).to(device).eval()
    out.requires_grad_(False)
    return out


def train_feature_generator(
    generator: FeatureGenerator,
    heads: Sequence[nn.Module],
    label_counts: torch.Tensor | Sequence[Sequence[float]],
    config: FedGenConfig | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Train ``generator`` in place for ``config.steps`` steps against the clients' ``heads``.

    ``label_counts`` (C, K): client ``c``'s examples of each label (the order of ``heads``).
    Loss per step, on ``batch_size`` labels drawn from the new ``label_probs``:
    ``teacher_weight * sum_c mean_i w[y_i, c] CE(head_c(G(z_i, y_i)), y_i)
    + diversity_weight * diversity_loss(z, G(z, y))``. The heads are frozen copies (the
    originals are untouched). ``optimizer`` (Adam at ``config.lr`` when None) may be
    carried over rounds. Returns logs: the teacher loss of the first and last step, the
    mean diversity loss, ``label_probs`` and the wall time.
    """
    cfg = config or FedGenConfig()
    device = torch.device(device)
    counts = torch.as_tensor(label_counts, dtype=torch.float64)
    if counts.ndim != 2 or counts.shape != (len(heads), generator.num_classes):
        raise ValueError(f"label_counts must have shape ({len(heads)}, {generator.num_classes}), got {tuple(counts.shape)}")
    t0 = time.perf_counter()
    weights = label_weights(counts).to(device)  # (K, C)
    generator.to(device)
    with torch.no_grad():
        generator.label_probs.copy_(label_distribution(counts, cfg.label_sampling, cfg.min_label_count).to(device))
    frozen = [_frozen(h, device) for h in heads]
    opt = optimizer or torch.optim.Adam(generator.parameters(), lr=cfg.lr)
    rng = torch.Generator().manual_seed(int(seed))
    teacher_losses: list[float] = []
    diversity: list[float] = []
    generator.train()
    for _ in range(cfg.steps):
        y = generator.sample_labels(cfg.batch_size, rng)
        z = generator.noise(cfg.batch_size, rng)
        feats = generator(y, z)
        w = weights[y]  # (N, C)
        teacher = torch.stack([(w[:, c] * F.cross_entropy(h(feats), y, reduction="none")).mean() for c, h in enumerate(frozen)]).sum()
        div = diversity_loss(z, feats)
        loss = cfg.teacher_weight * teacher + cfg.diversity_weight * div
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        teacher_losses.append(float(teacher.detach()))
        diversity.append(float(div.detach()))
    generator.eval()
    return {
        "steps": cfg.steps,
        "teacher_loss_first": teacher_losses[0] if teacher_losses else None,
        "teacher_loss_last": teacher_losses[-1] if teacher_losses else None,
        "diversity_loss_mean": sum(diversity) / len(diversity) if diversity else None,
        "label_probs": [round(float(p), 6) for p in generator.label_probs.cpu()],
        "wall_s": time.perf_counter() - t0,
    }


class FedGenRegularizer:
    """A client's FedGen term, for :func:`abd_fl.train.train_classifier`'s ``extra_loss``.

    ``__call__(model, x, y, logits)`` returns ``alpha * CE(head(G(z, y_s)), y_s)`` on
    ``batch_size`` labels ``y_s`` drawn from the generator's ``label_probs`` (plus, when
    ``beta > 0``, ``beta * KL(softmax(head(G(z, y))) || softmax(logits))`` on the client's
    own labels ``y``, the target detached). The generator is a frozen copy in eval mode.
    ``calls`` and ``last_loss`` record its use.
    """

    def __init__(self, generator: FeatureGenerator, alpha: float = 1.0, beta: float = 0.0, batch_size: int = 32, seed: int = 0) -> None:
        self.generator = copy.deepcopy(generator).eval()
        self.generator.requires_grad_(False)
        self.alpha, self.beta, self.batch_size = float(alpha), float(beta), int(batch_size)
        self.rng = torch.Generator().manual_seed(int(seed))
        self.calls = 0
        self.last_loss = math.nan

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> torch.Tensor | None:
        if self.alpha == 0 and self.beta == 0:
            return None
        head = model_head(model)
        self.generator.to(logits.device)
        with torch.no_grad():
            y_s = self.generator.sample_labels(self.batch_size, self.rng)
            feats = self.generator(y_s, self.generator.noise(self.batch_size, self.rng))
        loss = self.alpha * F.cross_entropy(head(feats), y_s)
        if self.beta > 0:
            with torch.no_grad():
                target = F.softmax(head(self.generator(y, self.generator.noise(y.shape[0], self.rng))), dim=1)
            loss = loss + self.beta * F.kl_div(F.log_softmax(logits, dim=1), target, reduction="batchmean")
        self.calls += 1
        self.last_loss = float(loss.detach())
        return loss
