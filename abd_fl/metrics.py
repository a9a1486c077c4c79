"""Evaluation metrics: clean accuracy, attack success rate (ASR) and the ASR floor.

ABD (Hong et al., ICML 2023) reports clean accuracy ("Acc") and ASR, the fraction of
triggered non-target test images classified as the target. ``asr_floor`` is the same
fraction on the *clean* non-target images: a model that always answers the target class
has floor 1.0, so a high ASR only means "backdoored" when it is well above the floor.
"""

from __future__ import annotations

import math
from typing import Callable, Union

import torch
from torch import nn

from abd_fl.data.base import ImageData
from abd_fl.device import resolve_device

__all__ = ["predict", "accuracy", "backdoor_metrics", "score_predictions"]

#: An ``nn.Module`` or any callable mapping a (N, C, H, W) batch to (N, num_classes) logits.
Model = Union[nn.Module, Callable[[torch.Tensor], torch.Tensor]]


def _as_device(device: torch.device | str) -> torch.device:
    return resolve_device(device) if isinstance(device, str) else torch.device(device)


@torch.no_grad()
def predict(
    model: Model, images: torch.Tensor, device: torch.device | str = "cpu", batch_size: int = 1024
) -> torch.Tensor:
    """Argmax labels (int64, on CPU) of ``model`` on ``images`` (N, C, H, W), in eval mode.

    An ``nn.Module`` is moved to ``device`` and put in eval mode, and its previous
    train/eval mode is restored afterwards; a plain callable is called as-is on batches
    moved to ``device``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if images.ndim != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
    dev = _as_device(device)
    module = model if isinstance(model, nn.Module) else None
    was_training = module.training if module is not None else False
    if module is not None:
        module.to(dev)
        module.eval()
    try:
        preds = [
            model(images[i : i + batch_size].to(dev)).argmax(dim=1).cpu()
            for i in range(0, images.shape[0], batch_size)
        ]
    finally:
        if module is not None:
            module.train(was_training)
    return torch.cat(preds).long() if preds else torch.empty(0, dtype=torch.long)


def accuracy(model: Model, data: ImageData, device: torch.device | str = "cpu", batch_size: int = 1024) -> float:
    """Fraction of ``data`` classified correctly, in [0, 1]; ``ValueError`` on an empty set."""
    if len(data) == 0:
        raise ValueError("cannot compute accuracy on an empty dataset (0 samples)")
    preds = predict(model, data.images, device, batch_size)
    return float((preds == data.labels.cpu()).float().mean())


def backdoor_metrics(
    model: Model,
    clean_test: ImageData,
    poisoned_test: ImageData,
    target_label: int,
    device: torch.device | str = "cpu",
    batch_size: int = 1024,
) -> dict[str, float]:
    """``{"acc", "asr", "asr_floor"}`` of ``model``.

    ``acc``: clean accuracy on ``clean_test`` (``ValueError`` if empty). ``asr``: fraction
    of ``poisoned_test`` predicted as ``target_label`` (NaN if empty). ``asr_floor``:
    fraction of clean images whose true label != target predicted as target (NaN if none).
    """
    if len(clean_test) == 0:
        raise ValueError("clean_test is empty (0 samples); cannot compute clean accuracy")
    clean_pred = predict(model, clean_test.images, device, batch_size)
    backdoor_pred = predict(model, poisoned_test.images, device, batch_size) if len(poisoned_test) else None
    return score_predictions(clean_pred, clean_test.labels, backdoor_pred, target_label)


def score_predictions(
    clean_pred: torch.Tensor, labels: torch.Tensor, backdoor_pred: torch.Tensor | None, target_label: int
) -> dict[str, float]:
    """``{"acc", "asr", "asr_floor"}`` from predicted labels (see :func:`backdoor_metrics`):
    ``clean_pred`` against the clean ``labels``; ``backdoor_pred`` on the triggered images
    (``None`` or empty: ASR NaN)."""
    if len(clean_pred) == 0:
        raise ValueError("clean_test is empty (0 samples); cannot compute clean accuracy")
    clean_pred, labels = clean_pred.cpu(), labels.cpu()
    acc = float((clean_pred == labels).float().mean())
    non_target = labels != target_label
    floor = float((clean_pred[non_target] == target_label).float().mean()) if bool(non_target.any()) else math.nan
    asr = math.nan if backdoor_pred is None or len(backdoor_pred) == 0 else float((backdoor_pred.cpu() == target_label).float().mean())
    return {"acc": acc, "asr": asr, "asr_floor": floor}
