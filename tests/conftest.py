"""Shared fixtures."""

from __future__ import annotations

from typing import Iterator

import pytest
import torch

from abd_fl.attacks import build_trigger, make_poisoned_test_set, poison_data
from abd_fl.data.digits import load_digits_bundle
from abd_fl.models import build_model
from abd_fl.train import train_classifier


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Small tensors: one intra-op thread avoids oversubscription on a shared 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def poisoned_digits16() -> dict:
    """A real backdoored teacher: digits at 16x16, BadNets square, 10% poisoned, target 0
    (and a clean teacher trained the same way), with clean and triggered test images."""
    bundle = load_digits_bundle(image_size=16)
    trigger = build_trigger("badnets_square", (1, 16, 16))
    poisoned_train, _ = poison_data(bundle.train, trigger, 0.1, 0, seed=0)
    triggered_test = make_poisoned_test_set(bundle.test, trigger, 0)
    teachers = {}
    for kind, data in (("poisoned", poisoned_train), ("clean", bundle.train)):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = build_model("cnn", 10, 1, bundle.mean, bundle.std)
        train_classifier(model, data, epochs=8, lr=0.05, seed=0)
        teachers[kind] = model.eval()
    with torch.no_grad():
        asr = (teachers["poisoned"](triggered_test.images).argmax(1) == 0).float().mean().item()
        acc = (teachers["poisoned"](bundle.test.images).argmax(1) == bundle.test.labels).float().mean().item()
    assert asr > 0.9 and acc > 0.9, (asr, acc)  # the backdoor is there
    return {
        "bundle": bundle,
        "clean_images": bundle.test.images,
        "triggered_images": triggered_test.images,
        "triggered_test": triggered_test,
        **teachers,
    }


@pytest.fixture
def server_task_identity(monkeypatch) -> None:
    """Messages need the identity Flower sets in a running ServerApp process (run, task, node)."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value, raising=False)
