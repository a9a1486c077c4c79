"""The CMI and OOD-patch synthesizers: shapes, their loss terms and pools, determinism,
the defense hook, CutMix, image files, and short distillation runs with ABD attached."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from abd_fl.config import ConfigError, validate_config
from abd_fl.defense import ABDConfig, ABDDefense, SRConfig
from abd_fl.distill import (
    CMISynthesizer,
    DistillConfig,
    OODPatchSynthesizer,
    TeacherEnsemble,
    build_synthesizer,
    distill,
)
from abd_fl.distill.synthesizers.cmi import random_views
from abd_fl.distill.synthesizers.ood import cutmix
from abd_fl.experiment import build_synthesizer_from_config
from abd_fl.models import build_model
from abd_fl.paths import compose_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPES = [(1, 8, 8), (3, 16, 16)]
CPU = torch.device("cpu")


def tiny_model(seed: int, shape: tuple[int, int, int] = (1, 8, 8), name: str = "cnn_small") -> nn.Module:
    c = shape[0]
    torch.manual_seed(seed)
    return build_model(name, 10, c, (0.3,) * c, (0.4,) * c)


def cmi(shape=(1, 8, 8), teachers: int = 1, hook=None, seed: int = 0, **params) -> CMISynthesizer:
    synth = CMISynthesizer(**{"batch_size": 8, "g_steps": 2, "z_dim": 16, "ngf": 8, "n_neg": 16, **params})
    ens = TeacherEnsemble([tiny_model(10 + i, shape) for i in range(teachers)])
    synth.setup(ens, tiny_model(2, shape), shape, CPU, hook, seed=seed)
    return synth


def ood(shape=(1, 8, 8), seed: int = 0, **params) -> OODPatchSynthesizer:
    synth = OODPatchSynthesizer(**{"num_patches": 64, "batch_size": 8, "source_size": 64, **params})
    synth.setup(TeacherEnsemble([tiny_model(1, shape)]), tiny_model(2, shape), shape, CPU, seed=seed)
    return synth


# ---- both -------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", ["cmi", "ood"])
def test_samples_have_the_image_shape_pixel_range_and_device(name: str, shape: tuple[int, int, int]) -> None:
    synth = cmi(shape, teachers=2) if name == "cmi" else ood(shape)
    logs = synth.generator_round(0)
    x = synth.sample(12)
    assert x.shape == (12, *shape) and x.dtype == torch.float32 and x.device == CPU
    assert not x.requires_grad and float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert float(x.std()) > 0.01  # not a constant image
    assert all(math.isfinite(v) for v in logs.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["cmi", "ood"])
def test_samples_stay_on_the_cuda_device(name: str) -> None:
    cuda = torch.device("cuda")
    synth = build_synthesizer(name, **({"batch_size": 8, "g_steps": 2} if name == "cmi" else {"num_patches": 32}))
    shape = (3, 16, 16)
    synth.setup(TeacherEnsemble([tiny_model(1, shape)]).to(cuda), tiny_model(2, shape).to(cuda), shape, cuda)
    synth.generator_round(0)
    x = synth.sample(8)
    assert x.device.type == "cuda" and x.shape == (8, *shape)


def test_registered_and_bad_parameters_fail_with_one_line() -> None:
    assert isinstance(build_synthesizer("cmi", g_steps=3), CMISynthesizer)
    assert isinstance(build_synthesizer("ood", num_patches=8), OODPatchSynthesizer)
    cases = [
        ("cmi", {"g_steps": 0}, "distill.synthesizer_params.g_steps must be an integer >= 1, got 0"),
        ("cmi", {"cr_temperature": 0.0}, "cr_temperature must be a number in (0.0, inf)"),
        ("cmi", {"nonsense": 1}, "bad parameters for synthesizer 'cmi'"),
        ("ood", {"image": "moon"}, "image must be one of: china, flower, got 'moon'"),
        ("ood", {"cutmix_prob": 1.5}, "cutmix_prob must be a number in [0.0, 1.0], got 1.5"),
    ]
    for name, params, message in cases:
        with pytest.raises(ValueError) as err:
            build_synthesizer(name, **params)
        assert message in str(err.value) and "\n" not in str(err.value)


def test_configs_compose_and_validate(tmp_path: Path) -> None:
    for name in ("cmi", "ood"):
        cfg = compose_config([f"distill={name}"])
        validate_config(cfg)
        assert cfg["distill"]["synthesizer"] == name
    cfg = compose_config(["distill=cmi", "distill.synthesizer_params.n_neg=-1"])
    with pytest.raises(ConfigError, match="n_neg must be an integer >= 0, got -1"):
        validate_config(cfg)
    missing = tmp_path / "missing.png"
    cfg = compose_config(["distill=ood", f"distill.synthesizer_params.image_path={missing}"])
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    assert str(missing) in str(err.value) and "image_path" in str(err.value) and "\n" not in str(err.value)


# ---- CMI --------------------------------------------------------------------------------
def test_cmi_loss_terms_are_finite_and_logged() -> None:
    synth = cmi(teachers=2)
    x = torch.rand(8, 1, 8, 8, requires_grad=True)
    terms, local, global_ = synth.losses(x, torch.arange(8) % 10)
    assert set(terms) == {"bn", "oh", "adv", "cr"}
    values = {k: float(t.detach()) for k, t in terms.items()}
    assert all(t.ndim == 0 for t in terms.values()) and all(math.isfinite(v) for v in values.values())
    assert values["bn"] > 0 and values["oh"] > 0 and values["adv"] <= 0 and values["cr"] > 0
    assert local.shape == global_.shape == (8, 2 * (16 + 32 + 32))  # BN-input channel means of both teachers
    sum(terms.values()).backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all()) and float(x.grad.abs().sum()) > 0
    logs = synth.generator_round(0)
    for key in ("generator_loss", "loss_bn", "loss_oh", "loss_adv", "loss_cr"):
        assert math.isfinite(logs[key])


def test_cmi_views_are_per_sample_and_differentiable() -> None:
    x = torch.rand(6, 3, 16, 16, requires_grad=True)
    rng = torch.Generator().manual_seed(0)
    same = random_views(x, rng, 1.0, 0.0, flip=False)
    assert torch.allclose(same, x, atol=1e-5)  # no crop, no shift, no flip: identity
    views = random_views(x, rng, 0.25, 0.0, flip=True)
    assert views.shape == x.shape and not torch.allclose(views, x)
    views.sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    one = x[:1].detach().expand(6, -1, -1, -1)
    crops = random_views(one, rng, 0.25, 0.0, flip=True)
    assert not torch.allclose(crops[0], crops[1])  # each sample gets its own crop


def test_cmi_bn_statistics_loss_decreases_over_generator_steps() -> None:
    teacher = tiny_model(10)
    for module in teacher.modules():  # running statistics of real inputs (uniform noise images)
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None
    with torch.no_grad():
        for _ in range(5):
            teacher.train()(torch.rand(64, 1, 8, 8))
    synth = CMISynthesizer(bn_weight=1.0, oh_weight=0.0, adv_weight=0.0, cr_weight=0.0, g_steps=15, lr=1e-2,
                           batch_size=16, z_dim=16, ngf=8)
    synth.setup(TeacherEnsemble([teacher]), tiny_model(2), (1, 8, 8), CPU)
    synth.generator_round(0)
    bn = [step["bn"] for step in synth.last_trace]
    assert len(bn) == 15 and max(bn[-3:]) < 0.6 * bn[0]


def test_cmi_pool_and_memory_bank_grow_and_are_capped() -> None:
    synth = cmi(bank_size=20, max_pool_size=28, n_neg=12)
    sizes = [synth.generator_round(i) for i in range(4)]
    assert [s["bank_size"] for s in sizes] == [8.0, 16.0, 20.0, 20.0]
    assert [s["pool_size"] for s in sizes] == [8.0, 16.0, 24.0, 28.0]
    local, global_ = synth.bank.sample(synth.n_neg, synth.rng)
    assert local.shape == global_.shape == (12, synth.bank.dim)
    assert bool(torch.isfinite(synth.bank.data).all())


def test_cmi_generator_is_reset_each_round_or_kept() -> None:
    for reset in (True, False):
        synth = cmi(reset_generator=reset)
        first = synth.generator
        synth.generator_round(0)
        second = synth.generator
        synth.generator_round(1)
        assert (second is not first and synth.generator is not second) if reset else (synth.generator is first)


def test_cmi_samples_before_the_first_round() -> None:
    synth = cmi()
    assert synth.sample(4).shape == (4, 1, 8, 8)  # an untrained generator, e.g. for a defense's warm-up cache


def test_cmi_adds_the_defense_term_to_the_generator_loss() -> None:
    calls: list[tuple[int, ...]] = []

    def constant(x: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return torch.tensor(5.0)

    base, shifted = cmi(seed=3, g_steps=3), cmi(seed=3, g_steps=3, hook=constant)
    a, b = base.generator_round(0), shifted.generator_round(0)
    assert calls == [(8, 1, 8, 8)] * 3  # once per generator step, on the synthesised batch
    assert b["generator_loss"] == pytest.approx(a["generator_loss"] + 5.0, abs=1e-4)
    assert b["loss_bn"] == pytest.approx(a["loss_bn"], abs=1e-5)
    assert torch.allclose(base.sample(16), shifted.sample(16))  # a constant moves nothing

    pushed = cmi(seed=3, g_steps=3, hook=lambda x: 100.0 * x.mean())  # a term with gradient
    c = pushed.generator_round(0)
    assert c["generator_loss"] != pytest.approx(a["generator_loss"], abs=1e-3)
    base_pool, pushed_pool = base.pool.sample(8, torch.Generator().manual_seed(0)), pushed.pool.sample(8, torch.Generator().manual_seed(0))
    assert not torch.allclose(base_pool, pushed_pool)
    assert float(pushed_pool.mean()) < float(base_pool.mean())  # the generator lowered the pixel mean

    none_hook = cmi(seed=3, g_steps=3, hook=lambda x: None)
    assert none_hook.generator_round(0)["generator_loss"] == pytest.approx(a["generator_loss"], abs=1e-5)


def test_cmi_hooks_record_only_during_generator_steps() -> None:
    synth = cmi()
    synth.generator_round(0)
    synth.ensemble(torch.rand(4, 1, 8, 8))  # a KD-step forward
    assert synth.hooks._terms == [] and synth.hooks._features == []
    synth.close()
    assert synth.hooks._handles == []


# ---- OOD --------------------------------------------------------------------------------
def test_ood_is_deterministic_with_the_seed() -> None:
    a, b, c = ood(seed=1), ood(seed=1), ood(seed=2)
    assert torch.equal(a.pool, b.pool) and not torch.equal(a.pool, c.pool)
    assert torch.equal(a.sample(16), b.sample(16))
    a.generator_round(0)
    b.generator_round(0)
    assert torch.equal(a.pool, b.pool) and torch.equal(a.sample(16), b.sample(16))


def test_ood_crops_differ_and_rounds_refresh_the_pool() -> None:
    synth = ood(shape=(3, 16, 16), cutmix_prob=0.0)
    patches = synth.pool.flatten(1)
    distances = torch.cdist(patches, patches) + torch.eye(64) * 1e3
    assert float(distances.min()) > 1e-2  # no two of the 64 crops alike
    assert float(patches.std(0).mean()) > 0.05  # and not all near one colour
    before = synth.pool.clone()
    logs = synth.generator_round(0)
    changed = (synth.pool != before).flatten(1).any(1)
    assert int(changed.sum()) == 8 and bool(changed[:8].all()) and logs["patches_cut"] == 72.0


def test_cutmix_pastes_a_box_of_the_second_source() -> None:
    rng = np.random.default_rng(0)
    zeros, ones = torch.zeros(64, 1, 8, 8), torch.ones(64, 1, 8, 8)
    mixed = cutmix(zeros, ones, beta=1.0, prob=1.0, rng=rng)
    assert bool(((mixed == 0) | (mixed == 1)).all())
    share = mixed.mean(dim=(1, 2, 3))
    assert int(((share > 0) & (share < 1)).sum()) > 32  # most samples hold both sources
    for i in range(64):  # the pasted region is one axis-aligned box
        rows, cols = mixed[i, 0].nonzero(as_tuple=True)
        if rows.numel():
            box = mixed[i, 0, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
            assert bool((box == 1).all())
    assert torch.equal(cutmix(zeros, ones, 1.0, 0.0, rng), zeros)  # prob 0: untouched
    synth = ood(cutmix_prob=1.0)
    plain = ood(cutmix_prob=0.0)
    assert not torch.equal(synth.sample(32), plain.sample(32))


def test_ood_reads_a_custom_image_file(tmp_path: Path) -> None:
    pixels = np.zeros((40, 60, 3), dtype=np.uint8)
    pixels[:, :30, 0] = 255  # left half red, right half blue
    pixels[:, 30:, 2] = 255
    path = tmp_path / "two_colours.png"
    Image.fromarray(pixels).save(path)
    synth = OODPatchSynthesizer(image_path=str(path), num_patches=32, color_jitter=0.0, degrees=0.0, shear=0.0)
    synth.setup(TeacherEnsemble([tiny_model(1, (3, 8, 8))]), tiny_model(2, (3, 8, 8)), (3, 8, 8), CPU)
    x = synth.sample(16)
    assert x.shape == (16, 3, 8, 8)
    assert float(x[:, 1].abs().max()) < 1e-3  # no green anywhere: the patches come from that file
    assert float(x[:, 0].max()) > 0.9 and float(x[:, 2].max()) > 0.9
    gray = OODPatchSynthesizer(image_path=str(path), num_patches=8)
    gray.setup(TeacherEnsemble([tiny_model(1)]), tiny_model(2), (1, 8, 8), CPU)
    assert gray.sample(4).shape == (4, 1, 8, 8)


def test_ood_missing_or_unreadable_image_fails_with_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nope.png"
    with pytest.raises(ValueError) as err:
        OODPatchSynthesizer(image_path=str(missing))
    assert str(missing) in str(err.value) and "does not exist" in str(err.value) and "\n" not in str(err.value)
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image\nat all")
    with pytest.raises(ValueError) as err:
        OODPatchSynthesizer(image_path=str(garbage))
    assert "cannot read" in str(err.value) and str(garbage) in str(err.value) and "\n" not in str(err.value)
    synth = OODPatchSynthesizer(num_patches=4)
    with pytest.raises(ValueError, match="1 or 3 image channels"):
        synth.setup(TeacherEnsemble([tiny_model(1)]), tiny_model(2), (2, 8, 8), CPU)


# ---- end to end -------------------------------------------------------------------------
@pytest.mark.parametrize("defended", [False, True])
@pytest.mark.parametrize("name", ["cmi", "ood"])
def test_short_distillation_runs_end_to_end(name: str, defended: bool) -> None:
    shape = (1, 8, 8)
    teachers = [tiny_model(20, shape, "cnn"), tiny_model(21, shape, "cnn")]
    student = tiny_model(22, shape)
    before = [p.detach().clone() for p in student.parameters()]
    small = ["g_steps=2", "batch_size=16", "z_dim=16"] if name == "cmi" else ["num_patches=64", "batch_size=8"]
    cfg = compose_config([f"distill={name}", "distill.generator_width=8", *(f"distill.synthesizer_params.{kv}" for kv in small)])
    synth = build_synthesizer_from_config(cfg)  # the shipped config's parameters, smaller budgets
    defense = None
    if defended:
        defense = ABDDefense(ABDConfig(num_layers=1, surrogate_batches=2, warmup_fraction=0.34, max_tries=2, sr="on",
                                       search="verify", surrogate="first",
                                       sr_fraction=0.34, sr_config=SRConfig(n_delta=2, fixed_point_steps=1, portion=0.1)))
    result = distill(teachers, student, synth, defense=defense,
                     config=DistillConfig(iterations=3, student_steps=2, batch_size=16, log_every=1), image_shape=shape)
    assert len(result.history) == 3 and all(math.isfinite(h["kd_loss"]) for h in result.history)
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, student.parameters()))
    assert all(bool(torch.isfinite(p).all()) for p in student.parameters())
    if defended:
        report = result.defense_report
        assert len(report["teachers"]) == 2 and report["sr_active"] is True and report["sr_steps"] == 2
        assert result.history[-1]["late_phase"] == 1.0


def test_zskt_makes_a_rounds_images_once_and_they_equal_a_fresh_forward_of_its_z() -> None:
    synth = build_synthesizer("zskt", z_dim=8, ngf=8, batch_size=16)
    synth.setup(TeacherEnsemble([tiny_model(1)]), tiny_model(2), (1, 8, 8), CPU, seed=0, total_iterations=4)
    calls = []
    synth.generator.register_forward_hook(lambda *_: calls.append(1))
    for it in range(2):
        synth.generator_round(it)
        calls.clear()
        first, again = synth.sample(16), synth.sample(16)
        assert first is again and len(calls) == 1  # one generator forward serves every student step of the round
        with torch.no_grad():
            assert torch.equal(first, synth.generator.train()(synth._round_z))  # what a per-step regeneration gives
    calls.clear()
    fresh = synth.sample(8)  # another batch size: fresh z, not the round's images
    assert fresh.shape[0] == 8 and len(calls) == 1 and synth.sample(8) is not fresh
