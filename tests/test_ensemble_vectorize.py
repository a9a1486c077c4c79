"""Vectorised teacher ensembles (issue 16, item 3): same-architecture teachers run as one
``vmap``-ed call over their stacked weights give the logits (and the input gradients) of the
loop over teachers within float tolerance, under every combination rule; hooks, mixed
architectures and ``auto`` on CPU fall back to the loop."""

from __future__ import annotations

import pytest
import torch

from abd_fl.config import ConfigError, validate_config
from abd_fl.distill import DistillConfig
from abd_fl.distill.ensemble import ENSEMBLE_RULES, TeacherEnsemble
from abd_fl.models import build_model
from abd_fl.paths import compose_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _teachers(name: str, n: int, channels: int = 1) -> list[torch.nn.Module]:
    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        out.append(build_model(name, 10, channels, (0.3,) * channels, (0.4,) * channels))
    return out


@pytest.mark.parametrize("name,shape", [("cnn", (1, 8, 8)), ("wrn16_1", (3, 16, 16))])  # wrn: BatchNorm in eval mode
@pytest.mark.parametrize("rule", ENSEMBLE_RULES)
def test_the_batched_call_equals_the_loop_with_input_gradients(name: str, shape: tuple, rule: str) -> None:
    teachers = _teachers(name, 4, shape[0])
    loop = TeacherEnsemble(teachers, rule=rule, vectorize="off")
    batched = TeacherEnsemble(teachers, rule=rule, vectorize="on")
    assert batched.runs_vectorized(torch.device("cpu")) and not loop.runs_vectorized(torch.device("cpu"))
    torch.manual_seed(9)
    x = torch.randn(16, *shape)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    a, b = loop(xa), batched(xb)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(batched.stacked_logits(x), loop.stacked_logits(x), rtol=1e-4, atol=1e-5)
    a.square().sum().backward()
    b.square().sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-3, atol=1e-5)


def test_a_teacher_changed_in_place_is_restacked() -> None:
    teachers = _teachers("cnn", 3)
    ens = TeacherEnsemble(teachers, vectorize="on")
    x = torch.randn(4, 1, 8, 8)
    before = ens.stacked_logits(x)
    with torch.no_grad():
        next(teachers[1].parameters()).mul_(3.0)
    after = ens.stacked_logits(x)
    torch.testing.assert_close(after, torch.stack([t(x) for t in teachers]), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(after[1], before[1]) and torch.allclose(after[0], before[0])


def test_hooks_mixed_architectures_one_teacher_and_auto_on_cpu_use_the_loop() -> None:
    cpu = torch.device("cpu")
    assert not TeacherEnsemble(_teachers("cnn", 3), vectorize="auto").runs_vectorized(cpu)
    assert TeacherEnsemble(_teachers("cnn", 3), vectorize="auto").runs_vectorized(torch.device("cuda"))
    assert not TeacherEnsemble(_teachers("cnn", 1), vectorize="on").runs_vectorized(cpu)
    assert not TeacherEnsemble(_teachers("cnn", 2) + _teachers("cnn_small", 1), vectorize="on").runs_vectorized(cpu)
    teachers = _teachers("cnn", 3)
    ens = TeacherEnsemble(teachers, vectorize="on")
    seen = []
    handle = list(teachers[2].modules())[-1].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    assert not ens.runs_vectorized(cpu)
    ens(torch.randn(2, 1, 8, 8))
    assert seen, "a hooked teacher must run as a module, so its hook fires"
    handle.remove()
    assert ens.runs_vectorized(cpu)
    teachers[1].train()  # one teacher put back in train mode: the modes differ, so the loop runs
    assert not ens.runs_vectorized(cpu)


def test_a_bad_vectorize_mode_is_a_one_line_error() -> None:
    with pytest.raises(ValueError, match=r"unknown distill.ensemble_vectorize 'sometimes'; choose one of: auto, on, off"):
        DistillConfig(ensemble_vectorize="sometimes")
    cfg = compose_config(["distill.ensemble_vectorize=sometimes"])
    with pytest.raises(ConfigError, match="ensemble_vectorize 'sometimes'"):
        validate_config(cfg)
    assert compose_config([])["distill"]["ensemble_vectorize"] == "off"
