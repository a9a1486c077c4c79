"""Attention transfer (Zagoruyko & Komodakis, 2017), the student-side term of ZSKT
(Micaelli & Storkey, 2019), as an option of the distillation loop (``distill.attention_beta``).

The spatial attention map of a stage activation ``f`` (N, C, H, W) is
``a(f) = normalize(mean_c f^2)``: the channel mean of the squared activation, flattened to
(N, H*W) and scaled to unit L2 norm per sample. The student minimises, besides the KD loss,

    beta * sum_stages mean_positions (a(f_S) - a(f_T))^2

over the stage outputs of student and teacher (ZSKT: beta = 250 on the three groups of a
WRN; only the student sees this term, the generator still maximises the KL alone). Here:

- **Stages** are each model's ``stage_modules()`` (its stage outputs, shallow to deep),
  recorded with forward hooks during the forward passes the loop makes anyway.
- **Pairs**: the last ``k = min(n_S, n_T)`` stages of each (the deepest ones pair up when
  the architectures have different numbers of stages).
- **Sizes**: where a pair's spatial sizes differ, both maps are average-pooled to the
  smaller size before normalising.
- **Ensembles** (federated KD): the teacher map is the ensemble-weighted mean of the
  teachers' normalised maps, normalised again.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _squared_mean(activation: torch.Tensor) -> torch.Tensor:
    if activation.ndim != 4:
        raise ValueError(f"attention transfer needs (N, C, H, W) stage activations, got shape {tuple(activation.shape)}")
    return activation.pow(2).mean(dim=1)  # (N, H, W)


def _normalised(maps: torch.Tensor) -> torch.Tensor:
    return F.normalize(maps.flatten(1), dim=1)


def attention_map(activation: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """``a(f) = normalize(mean_c f^2)`` (Zagoruyko & Komodakis, 2017, Eq. 2 with p = 2):
    (N, C, H, W) -> (N, H*W), unit L2 norm per sample; average-pooled to ``size`` first
    when given (and different)."""
    maps = _squared_mean(activation)
    if size is not None and tuple(maps.shape[-2:]) != tuple(size):
        maps = F.adaptive_avg_pool2d(maps.unsqueeze(1), size).squeeze(1)
    return _normalised(maps)


class StageRecorder:
    """Records the outputs of ``model.stage_modules()`` while it is active (``with recorder:``),
    in call order; hooks exist only inside the ``with`` block."""

    def __init__(self, model: nn.Module) -> None:
        stages = getattr(model, "stage_modules", None)
        if not callable(stages):
            raise ValueError(f"attention transfer needs models with stage_modules(); {type(model).__name__} has none")
        self.modules = list(stages())
        if not self.modules:
            raise ValueError(f"attention transfer: {type(model).__name__}.stage_modules() is empty")
        self.outputs: list[torch.Tensor] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        self.outputs.append(output)

    def take(self) -> list[torch.Tensor]:
        """The outputs recorded so far, handed over and forgotten here (so a batch's
        activations are not kept until the next ``with`` block)."""
        outputs, self.outputs = self.outputs, []
        return outputs

    def __enter__(self) -> "StageRecorder":
        self.outputs = []
        self._handles = [m.register_forward_hook(self._hook) for m in self.modules]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


@contextmanager
def recording(recorders: Sequence[StageRecorder]) -> Iterator[None]:
    """Activate several recorders at once (e.g. one per teacher of an ensemble); every hook
    registered is removed on exit, also when a later recorder fails to start."""
    with ExitStack() as stack:
        for r in recorders:
            stack.enter_context(r)
        yield


def attention_transfer_per_sample(
    student_stages: Sequence[torch.Tensor],
    teacher_stages: Sequence[Sequence[torch.Tensor]],
    teacher_weights: torch.Tensor | Sequence[float] | None = None,
) -> torch.Tensor:
    """Per-sample attention-transfer loss (N,): ``sum_pairs mean_positions (a_S - a_T)^2``
    (Zagoruyko & Komodakis, 2017, Eq. 2; ZSKT's student term without its beta).

    ``student_stages``: the student's stage activations; ``teacher_stages``: one such list
    per teacher, all of equal length; ``teacher_weights``: the ensemble's weights (None =
    equal). The deepest ``min(n_S, n_T)`` stages pair up; ``a_T`` is the weighted mean of the
    teachers' maps, renormalised. Gradients flow into the student's activations only when
    the teachers' were computed without them (as the loop does).
    """
    if not teacher_stages:
        raise ValueError("attention transfer needs at least one teacher's stage activations")
    n_t = len(teacher_stages[0])
    if any(len(t) != n_t for t in teacher_stages):
        raise ValueError(f"every teacher must record the same number of stages, got {[len(t) for t in teacher_stages]}")
    k = min(len(student_stages), n_t)
    if k == 0:
        raise ValueError("attention transfer: no stage activations were recorded")
    if teacher_weights is None:
        w = [1.0 / len(teacher_stages)] * len(teacher_stages)
    else:
        w = torch.as_tensor(teacher_weights, dtype=torch.float32).flatten().tolist()  # one device sync, not one per map
        if len(w) != len(teacher_stages):
            raise ValueError(f"{len(teacher_stages)} teachers but {len(w)} ensemble weights")
        total_w = sum(w)
        w = [wi / total_w for wi in w]
    s_stages = list(student_stages)[-k:]
    t_stages = [list(t)[-k:] for t in teacher_stages]
    total = None
    for j, s_act in enumerate(s_stages):
        sizes = [tuple(s_act.shape[-2:])] + [tuple(t[j].shape[-2:]) for t in t_stages]
        size = (min(h for h, _ in sizes), min(w_ for _, w_ in sizes))
        a_s = attention_map(s_act, size)
        a_t = sum(wi * attention_map(t[j], size) for wi, t in zip(w, t_stages, strict=True))
        a_t = F.normalize(a_t, dim=1).to(a_s)
        term = (a_s - a_t).pow(2).mean(dim=1)
        total = term if total is None else total + term
    return total
