"""The teacher ensemble of federated data-free KD: how the client models' outputs are combined.

``mean_logits`` (FedDF / DENSE; the default before issue 15) averages raw logits, so a
teacher that sends large logits (a scaled, model-replacing attacker) outweighs the others:
two of six clients at scale 5 take every model the server makes (issue 15). The other rules
bound each teacher's say:

* ``mean_probs`` (the default, :data:`DEFAULT_ENSEMBLE`) -- the mean of the teachers'
  softmax probabilities: a teacher's vote is a distribution, at most 1/n of the mass
  whatever its logits' size.
* ``standardized_logits`` -- each teacher's logits standardised per sample over the classes
  (zero mean, unit standard deviation) before the mean: the logits' scale is removed, their
  ranking and relative margins kept.
* ``median_probs`` -- the coordinate-wise median of the probabilities over teachers
  (renormalised): a minority cannot move it past the majority's values.
* ``trimmed_probs`` -- per class, the mean of the probabilities after dropping the
  ``trim`` share of the highest and of the lowest teachers (renormalised).

How the teachers run (``vectorize``): ``off`` calls them one after the other; ``on`` runs
teachers of one architecture as one batched call (their weights stacked with
``torch.func.stack_module_state``, the forward ``vmap``-ed over them), whenever no hook is
registered on a teacher (attention transfer's stage recorders and DENSE's BatchNorm hooks
need the per-teacher modules, so those runs fall back to the loop); ``auto`` is ``on`` on
CUDA and ``off`` on CPU. The default is ``off``: on this project's CPU the batched call
measured slower than the loop (docs/performance.md, issue 16), and it has not yet been timed on a GPU.
Both give the same logits within float tolerance (tests/test_ensemble_vectorize.py).

The probability rules return the log of the combined distribution, which serves as logits
downstream (``softmax(log p) = p``; at a KD temperature ``T`` it is ``p`` sharpened or
smoothed by ``1/T``). Per-teacher ``weights`` (e.g. ABD down-weighting a suspicious client)
weigh the two means and the standardised mean; the median and trimmed rules use every teacher
of positive weight, each counted once.
"""

from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
from torch import nn

ENSEMBLE_RULES = ("mean_logits", "mean_probs", "standardized_logits", "median_probs", "trimmed_probs")
"""The ways :class:`TeacherEnsemble` combines its teachers (``distill.ensemble``)."""

DEFAULT_ENSEMBLE = "mean_probs"
"""The default rule (issue 15): on the default scenario it never lost clean accuracy against
``mean_logits`` (+4.6 to +8.8 points for the teacher ensemble, 3 seeds) and bounds a scaled
attacker's say (docs/configuration.md, "A server that hostile clients cannot take over")."""

VECTORIZE_MODES = ("auto", "on", "off")
"""How :class:`TeacherEnsemble` runs its teachers (``distill.ensemble_vectorize``)."""

_EPS = 1e-8


def check_ensemble(rule: str, trim: float, vectorize: str = "off") -> None:
    """Raise a one-line ``ValueError`` on an unknown rule, a trim outside [0, 0.5) or an
    unknown vectorize mode."""
    if vectorize not in VECTORIZE_MODES:
        raise ValueError(f"unknown distill.ensemble_vectorize '{vectorize}'; choose one of: {', '.join(VECTORIZE_MODES)}")
    if rule not in ENSEMBLE_RULES:
        raise ValueError(f"unknown distill.ensemble '{rule}'; choose one of: {', '.join(ENSEMBLE_RULES)}")
    if isinstance(trim, bool) or not isinstance(trim, (int, float)) or not 0 <= trim < 0.5:
        raise ValueError(f"distill.ensemble_trim must be a number in [0, 0.5), got {trim!r}")


class TeacherEnsemble(nn.Module):
    """Frozen teachers combined by ``rule`` (see the module doc; default: averaged logits).

    ``weights`` are normalised to sum to one; ``None`` gives the plain mean. ``trim`` is the
    share of teachers dropped at each end per class by ``trimmed_probs`` (in [0, 0.5)). The
    module is always in eval mode and its parameters never require gradients, but gradients
    do flow to the *inputs* (generators are trained through it).
    """

    def __init__(
        self,
        teachers: Sequence[nn.Module],
        weights: Sequence[float] | None = None,
        rule: str = DEFAULT_ENSEMBLE,
        trim: float = 0.2,
        vectorize: str = "off",
    ) -> None:
        super().__init__()
        if len(teachers) == 0:
            raise ValueError("a teacher ensemble needs at least one teacher, got 0")
        check_ensemble(rule, trim, vectorize)
        self.rule, self.trim, self.vectorize = rule, float(trim), vectorize
        self.teachers = nn.ModuleList(teachers)
        for teacher in self.teachers:
            teacher.eval()
            teacher.requires_grad_(False)
        self.set_weights(weights)
        first = self.teachers[0]
        signature = _signature(first)
        self._same_architecture = all(
            type(t) is type(first) and _signature(t) == signature and repr(t) == repr(first) for t in self.teachers
        )
        self._stacked: tuple[tuple, dict, dict, nn.Module] | None = None  # (key, params, buffers, skeleton)

    def set_weights(self, weights: Sequence[float] | None) -> None:
        """Set the per-teacher weights (e.g. down-weighting suspicious clients)."""
        n = len(self.teachers)
        if weights is None:
            w = torch.full((n,), 1.0 / n)
        else:
            w = torch.as_tensor(list(weights), dtype=torch.float32)
            if w.shape != (n,) or bool((w < 0).any()) or float(w.sum()) <= 0:
                raise ValueError(
                    f"ensemble weights must be {n} non-negative numbers with a positive sum, got {list(weights)}"
                )
            w = w / w.sum()
        self.register_buffer("weights", w, persistent=False)

    def train(self, mode: bool = True) -> "TeacherEnsemble":  # teachers stay frozen
        return super().train(False)

    def member_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every teacher on ``x``."""
        return list(self.stacked_logits(x).unbind(0))

    def stacked_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of every teacher on ``x``, stacked ``(T, B, K)``: one batched call when
        :meth:`runs_vectorized`, else one call per teacher."""
        if self.runs_vectorized(x.device):
            return self._batched_forward(x)
        return torch.stack([teacher(x) for teacher in self.teachers], dim=0)

    def runs_vectorized(self, device: torch.device) -> bool:
        """Whether a forward on ``device`` runs the teachers as one batched call (module doc)."""
        if self.vectorize == "off" or (self.vectorize == "auto" and device.type != "cuda"):
            return False
        return len(self.teachers) > 1 and self._same_architecture and not self._hooked() and not self._mixed_modes()

    def _mixed_modes(self) -> bool:
        modes = [tuple(m.training for m in t.modules()) for t in self.teachers]
        return any(mode != modes[0] for mode in modes)

    def _hooked(self) -> bool:
        return any(
            m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
            for t in self.teachers for m in t.modules()
        )

    def _batched_forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.func import functional_call, stack_module_state, vmap

        tensors = [v for t in self.teachers for v in (*t.parameters(), *t.buffers())]
        # restacked when a teacher's tensors move or change in place (not through ``.data``, which
        # keeps no version) or a module changes mode (the skeleton is built in the teachers' modes)
        key = (x.device, tuple((v.data_ptr(), v._version) for v in tensors), tuple(m.training for m in self.teachers[0].modules()))
        if self._stacked is None or self._stacked[0] != key:  # restacked only when a teacher changed
            params, buffers = stack_module_state(list(self.teachers))
            skeleton = copy.deepcopy(self.teachers[0]).to("meta")
            self._stacked = (key, params, buffers, skeleton)
        _, params, buffers, skeleton = self._stacked

        def one(p: dict, b: dict, inputs: torch.Tensor) -> torch.Tensor:
            return functional_call(skeleton, (p, b), (inputs,))

        return vmap(one, in_dims=(0, 0, None))(params, buffers, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return combine_logits(self.stacked_logits(x), self.weights, self.rule, self.trim)


def _signature(model: nn.Module) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    return [(k, tuple(v.shape), v.dtype) for k, v in model.state_dict().items()]


def combine_logits(logits: torch.Tensor, weights: torch.Tensor, rule: str = DEFAULT_ENSEMBLE, trim: float = 0.2) -> torch.Tensor:
    """Combine stacked teacher logits ``(T, B, K)`` with normalised ``weights`` ``(T,)`` by ``rule``
    (the module doc); returns ``(B, K)`` logits."""
    w = weights.to(logits).view(-1, 1, 1)
    if rule == "mean_logits":
        return (w * logits).sum(dim=0)
    if rule == "standardized_logits":
        centred = logits - logits.mean(dim=2, keepdim=True)
        z = centred / (centred.pow(2).mean(dim=2, keepdim=True).sqrt() + _EPS)
        return (w * z).sum(dim=0)
    probs = logits.softmax(dim=2)
    if rule == "mean_probs":
        combined = (w * probs).sum(dim=0)
    else:
        active = probs[(weights > 0).to(probs.device)]  # every teacher of positive weight, once
        if rule == "median_probs":
            combined = active.median(dim=0).values if len(active) % 2 else active.quantile(0.5, dim=0)
        elif rule == "trimmed_probs":
            n = len(active)
            cut = math.floor(trim * n)
            combined = active.sort(dim=0).values[cut:n - cut].mean(dim=0)
        else:
            raise ValueError(f"unknown distill.ensemble '{rule}'; choose one of: {', '.join(ENSEMBLE_RULES)}")
    combined = combined / combined.sum(dim=1, keepdim=True).clamp_min(_EPS)
    return combined.clamp_min(_EPS).log()
