"""Training-set poisoning and the attack-success-rate (ASR) test set.

Follows the data-poisoning threat model of ABD (Hong et al., ICML 2023, Sec. 3): a
fraction ``poison_rate`` of the training set gets the trigger and (for dirty-label attacks
such as BadNets / Blend) its label flipped to ``target_label``; the ASR is measured on
every non-target test image carrying the trigger.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from abd_fl.attacks.triggers import Trigger
from abd_fl.data.base import ImageData

__all__ = ["poison_data", "make_poisoned_test_set"]


def _check_target(target_label: int, num_classes: int | None) -> int:
    if isinstance(target_label, bool) or not isinstance(target_label, numbers.Integral):
        raise ValueError(f"target_label must be an int, got {target_label!r}")
    target = int(target_label)
    if num_classes is not None:
        if not 0 <= target < num_classes:
            raise ValueError(f"target_label must be in [0, {num_classes}), got {target}")
    elif target < 0:
        raise ValueError(f"target_label must be >= 0, got {target}")
    return target


def _check_shape(data: ImageData, trigger: Trigger) -> None:
    if data.shape != trigger.image_shape:
        raise ValueError(f"trigger built for images {trigger.image_shape}, but data has images {data.shape}")


def poison_data(
    data: ImageData,
    trigger: Trigger,
    poison_rate: float,
    target_label: int,
    seed: int = 0,
    num_classes: int | None = None,
) -> tuple[ImageData, np.ndarray]:
    """Return a poisoned copy of ``data`` and the sorted indices (int64) of poisoned samples.

    Dirty-label triggers: ``round(poison_rate * N)`` samples drawn (seeded numpy Generator)
    from the whole set get the trigger and label ``target_label``. Clean-label triggers
    (``trigger.clean_label``): ``round(poison_rate * n_target)`` target-class samples get the
    trigger and keep their label. ``data`` itself is never modified.

    The chosen images are poisoned with ``trigger.prepare_poison`` (their true labels, the
    whole of ``data`` as the attacker's pool, ``num_classes`` and ``seed``): the test-time
    trigger for most attacks, adversarial perturbation plus trigger for CL.
    """
    if isinstance(poison_rate, bool) or not isinstance(poison_rate, numbers.Real):
        raise ValueError(f"poison_rate must be a number in [0, 1], got {poison_rate!r}")
    rate = float(poison_rate)
    if math.isnan(rate) or not 0.0 <= rate <= 1.0:
        raise ValueError(f"poison_rate must be in [0, 1], got {poison_rate}")
    target = _check_target(target_label, num_classes)
    _check_shape(data, trigger)

    labels_np = data.labels.cpu().numpy()
    if trigger.clean_label:
        candidates = np.flatnonzero(labels_np == target)
    else:
        candidates = np.arange(len(data))
    count = int(round(rate * len(candidates)))
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(candidates, size=count, replace=False)).astype(np.int64)

    images = data.images.clone()
    labels = data.labels.clone()
    if count:
        idx = torch.from_numpy(chosen).to(images.device)
        images[idx] = trigger.prepare_poison(
            images[idx], data.labels[idx.to(data.labels.device)], num_classes=num_classes, seed=seed, pool=data
        )
        if not trigger.clean_label:
            labels[idx.to(labels.device)] = target
    return ImageData(images, labels), chosen


def make_poisoned_test_set(test: ImageData, trigger: Trigger, target_label: int) -> ImageData:
    """Every test image whose label != ``target_label``, with the trigger and label ``target_label``.

    This is the paper's ASR evaluation set (the fraction of it classified as the target).
    Only the test-time trigger ``trigger.apply`` is used (never ``prepare_poison``), also for
    clean-label attacks.
    """
    target = _check_target(target_label, None)
    _check_shape(test, trigger)
    keep = test.labels != target
    images = trigger.apply(test.images[keep])
    labels = torch.full((images.shape[0],), target, dtype=test.labels.dtype, device=test.labels.device)
    return ImageData(images, labels)
