"""Issue 16's speed levers in the distillation loop. ``distill.memory_format``: the
convolutions run channels-last on CPU (``auto``), give the same student as the contiguous
layout within float tolerance, and teachers and student are handed back in the usual layout.
Fixed inputs (the clean-KD reference): the teachers' targets are computed once per image,
and the student is the one the per-step teacher passes gave."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from abd_fl.config import ConfigError, validate_config
from abd_fl.defense import ABDConfig, ABDDefense, SRConfig
from abd_fl.device import MEMORY_FORMATS, resolve_memory_format
from abd_fl.distill import DistillConfig, distill
from abd_fl.distill.synthesizers.zskt import ZSKTSynthesizer
from abd_fl.models import build_model
from abd_fl.paths import compose_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPE = (1, 8, 8)


def _model(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name, 10, 1, (0.3,), (0.4,))


def _conv_weights(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.dim() == 4]


def _run(fmt: str, teacher_name: str = "cnn", defense: ABDDefense | None = None, progress=None) -> tuple[nn.Module, list[nn.Module], ZSKTSynthesizer]:
    teachers = [_model(teacher_name, 1 + i).eval() for i in range(2)]
    student = _model("cnn_small", 9)
    synth = ZSKTSynthesizer(z_dim=16, ngf=16, batch_size=32)
    distill(teachers, student, synth, defense=defense, image_shape=SHAPE, progress=progress,
            config=DistillConfig(iterations=2, student_steps=2, batch_size=32, memory_format=fmt))
    return student, teachers, synth


def test_auto_is_channels_last_on_cpu_and_contiguous_on_cuda() -> None:
    assert resolve_memory_format("auto", "cpu") == torch.channels_last
    assert resolve_memory_format("auto", torch.device("cuda")) == torch.contiguous_format
    assert resolve_memory_format("channels_last", "cuda") == torch.channels_last
    assert resolve_memory_format("contiguous", "cpu") == torch.contiguous_format
    assert DistillConfig().memory_format == "auto" and set(MEMORY_FORMATS) == {"auto", "channels_last", "contiguous"}


def test_a_bad_memory_format_is_a_one_line_error_naming_it_and_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown distill.memory_format 'nhwc'; choose one of: auto, channels_last, contiguous"):
        DistillConfig(memory_format="nhwc")
    with pytest.raises(ValueError, match="nhwc"):
        resolve_memory_format("nhwc", "cpu")
    with pytest.raises(ConfigError, match="nhwc"):
        validate_config(compose_config(["distill.memory_format=nhwc"]))


def test_channels_last_is_what_runs_and_the_layout_is_restored_afterwards() -> None:
    seen: list[bool] = []
    student_box: dict[str, nn.Module] = {}

    def progress(_it: int, _logs: dict) -> None:  # inside the run: every 4-D weight is channels-last
        weights = _conv_weights(student_box["s"])  # (a 1-channel input's weights are both layouts at once)
        seen.append(all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
                    and any(not w.is_contiguous() for w in weights))

    teachers = [_model("cnn", 1).eval()]
    student_box["s"] = _model("cnn_small", 9)
    synth = ZSKTSynthesizer(z_dim=16, ngf=16, batch_size=32)
    distill(teachers, student_box["s"], synth, image_shape=SHAPE, progress=progress,
            config=DistillConfig(iterations=2, student_steps=1, batch_size=32))  # auto on CPU
    assert seen == [True, True]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in _conv_weights(synth.generator))
    for model in (student_box["s"], *teachers):  # handed back in the usual layout
        assert all(w.is_contiguous() for w in _conv_weights(model))


@pytest.mark.parametrize("name", ["cnn", "cnn_small", "wrn16_1", "lenet", "resnet18"])
def test_a_channels_last_model_gives_the_same_logits_and_input_gradients(name: str) -> None:
    contiguous = _model(name, 3).train()  # train mode: BatchNorm on batch statistics, as in the generator step
    channels_last = copy.deepcopy(contiguous).to(memory_format=torch.channels_last)
    x = torch.rand(32, *SHAPE, requires_grad=True)
    x_cl = x.detach().clone().requires_grad_(True)
    out, out_cl = contiguous(x), channels_last(x_cl)
    out.square().sum().backward()
    out_cl.square().sum().backward()
    # the summation order differs, so each is compared at its own scale (1e-4 of its largest value)
    torch.testing.assert_close(out_cl, out, rtol=1e-4, atol=1e-4 * float(out.detach().abs().max()))
    torch.testing.assert_close(x_cl.grad, x.grad, rtol=1e-4, atol=1e-4 * float(x.grad.abs().max()))


# Adam's steps are normalised, so float-level differences in a near-zero gradient can move a
# weight by up to the learning rate (2e-3); a short run stays within a quarter of that.
@pytest.mark.parametrize("teacher_name", ["cnn", "wrn16_1"])
def test_channels_last_gives_the_contiguous_student_within_float_tolerance(teacher_name: str) -> None:
    student_cl, _, _ = _run("channels_last", teacher_name)
    student_c, _, _ = _run("contiguous", teacher_name)
    for a, b in zip(student_cl.state_dict().values(), student_c.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=5e-4)


def test_abd_runs_channels_last_and_matches_contiguous_within_float_tolerance() -> None:
    def defense() -> ABDDefense:
        return ABDDefense(ABDConfig(num_layers=1, sr_fraction=0.5, sr_config=SRConfig(n_delta=2)))

    students = {fmt: _run(fmt, defense=defense())[0] for fmt in ("channels_last", "contiguous")}
    for a, b in zip(students["channels_last"].state_dict().values(), students["contiguous"].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=5e-4)


# ---- the clean-KD reference's fixed inputs: the teachers' targets computed once ---------------
def _clean_kd(monkeypatch: pytest.MonkeyPatch | None = None) -> tuple[nn.Module, int]:
    from abd_fl.distill import FixedDataSynthesizer

    if monkeypatch is not None:  # the loop as before: the teachers run on every sampled batch
        monkeypatch.setattr("abd_fl.distill.loop._fixed_targets", lambda *_args: None)
    teacher = _model("cnn", 1).eval()
    calls = [0]
    teacher.register_forward_hook(lambda *_args: calls.__setitem__(0, calls[0] + 1))
    student = _model("cnn_small", 9)
    images = torch.rand(40, *SHAPE, generator=torch.Generator().manual_seed(0))
    distill([teacher], student, FixedDataSynthesizer(images), image_shape=SHAPE,
            config=DistillConfig(iterations=3, student_steps=4, batch_size=16))
    return student, calls[0]


def test_fixed_inputs_get_the_teachers_targets_once_and_the_same_student(monkeypatch: pytest.MonkeyPatch) -> None:
    cached, cached_calls = _clean_kd()
    with monkeypatch.context() as m:
        recomputed, recomputed_calls = _clean_kd(m)
    assert cached_calls == 3  # 40 images in batches of 16, once
    assert recomputed_calls == 3 * 4  # every student step
    for a, b in zip(cached.state_dict().values(), recomputed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=5e-4)
