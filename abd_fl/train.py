"""Supervised training of a classifier on an in-memory :class:`ImageData` set.

Used to train the (possibly poisoned) teacher models: cross-entropy, SGD with momentum
(or Adam) and a per-step cosine learning-rate schedule: the usual CIFAR recipe for the
teachers whose backdoors ABD (Hong et al., ICML 2023) studies.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from abd_fl.data.base import ImageData
from abd_fl.device import resolve_device

__all__ = ["train_classifier", "OPTIMIZERS", "ExtraLoss"]

ExtraLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], "torch.Tensor | None"]
"""``extra_loss(model, x, y, logits)``: a term added to a step's cross-entropy (e.g. FedGen's regulariser)."""

OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")


def _batches(n: int, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Shuffled index batches; a trailing batch of a single sample is merged into the previous
    one (batch norm cannot train on one sample)."""
    perm = torch.randperm(n, generator=gen)
    batches = list(perm.split(batch_size))
    if len(batches) > 1 and batches[-1].numel() == 1:
        batches[-2] = torch.cat([batches[-2], batches.pop()])
    return batches


def train_classifier(
    model: nn.Module,
    data: ImageData,
    *,
    epochs: int,
    lr: float,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    seed: int = 0,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    optimizer: str = "sgd",
    progress: bool = False,
    extra_loss: ExtraLoss | None = None,
) -> dict[str, float]:
    """Train ``model`` in place on ``data``; return ``{"loss", "accuracy"}`` of the last epoch.

    ``loss`` is the sample-weighted mean cross-entropy and ``accuracy`` the running training
    accuracy over the last epoch (both NaN when ``epochs == 0``). Shuffling uses a CPU
    ``torch.Generator`` seeded with ``seed``; other randomness (e.g. dropout) is seeded from
    ``seed`` inside a forked RNG, so the global RNG state is untouched and two runs from the
    same initial weights give identical weights. The model ends on ``device`` in eval mode.

    ``extra_loss(model, x, y, logits)``, when given, is added to every step's loss (None =
    nothing); ``loss`` in the result stays the cross-entropy alone.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be an int >= 0, got {epochs!r}")
    if not lr > 0 or math.isinf(lr):
        raise ValueError(f"lr must be a finite number > 0, got {lr}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if momentum < 0:
        raise ValueError(f"momentum must be >= 0, got {momentum}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    opt_name = optimizer.lower() if isinstance(optimizer, str) else optimizer
    if opt_name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer '{optimizer}'; choose one of: {', '.join(OPTIMIZERS)}")
    if len(data) == 0:
        raise ValueError("cannot train on an empty dataset (0 samples)")

    dev = resolve_device(device) if isinstance(device, str) else torch.device(device)
    model.to(dev)
    result = {"loss": math.nan, "accuracy": math.nan}
    if epochs == 0:
        model.eval()
        return result

    params = [p for p in model.parameters() if p.requires_grad]
    if opt_name == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            params, lr=lr, momentum=momentum, weight_decay=weight_decay
        )
    else:
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)

    n = len(data)
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(n / batch_size) - (1 if n > batch_size and n % batch_size == 1 else 0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)

    epoch_iter = range(epochs)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(epoch_iter, desc="train", unit="epoch")
        epoch_iter = bar

    fork_devices = [dev] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        model.train()
        for _ in epoch_iter:
            total_loss, correct, seen = 0.0, 0, 0
            for idx in _batches(n, batch_size, gen):
                x = data.images[idx].to(dev, non_blocking=True)
                y = data.labels[idx].to(dev, non_blocking=True)
                logits = model(x)
                loss = F.cross_entropy(logits, y)
                extra = extra_loss(model, x, y, logits) if extra_loss is not None else None
                opt.zero_grad(set_to_none=True)
                (loss if extra is None else loss + extra).backward()
                opt.step()
                sched.step()
                total_loss += float(loss.detach()) * y.shape[0]
                correct += int((logits.detach().argmax(dim=1) == y).sum())
                seen += y.shape[0]
            result = {"loss": total_loss / seen, "accuracy": correct / seen}
            if bar is not None:
                bar.set_postfix(loss=f"{result['loss']:.4f}", acc=f"{result['accuracy']:.3f}")
    if bar is not None:
        bar.close()
    model.eval()
    return result
