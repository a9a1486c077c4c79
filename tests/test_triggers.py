"""Tests for the paper's other seven triggers (Sig, Trojan 3x3 / 8x8 / WM, l0_inv, l2_inv, CL),
the ``prepare_poison`` hook of poisoning, the attack configs and the trigger figure."""

from __future__ import annotations

import math
import re
from typing import ClassVar

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from abd_fl.attacks import TRIGGERS, Trigger, build_trigger, make_poisoned_test_set, poison_data
from abd_fl.attacks.triggers import trigger_names
from abd_fl.data.base import ImageData

PAPER_TEN = {
    "badnets_grid", "badnets_square", "blend", "sig", "trojan_3x3", "trojan_8x8", "trojan_wm",
    "l0_inv", "l2_inv", "cl",
}
NEW = ["sig", "trojan_3x3", "trojan_8x8", "trojan_wm", "l0_inv", "l2_inv", "cl"]
SEEDED = ["blend", "trojan_3x3", "trojan_8x8", "trojan_wm", "l0_inv", "l2_inv"]
UNSEEDED = ["badnets_grid", "badnets_square", "sig", "cl"]
REPLACING = ["trojan_3x3", "trojan_8x8", "l0_inv", "cl"]  # stamp fixed values under a mask
SHAPES = [(1, 8, 8), (3, 32, 32)]
ALL_SHAPES = [(1, 8, 8), (1, 16, 16), (3, 24, 24), (3, 32, 32)]


def _rand(shape, n: int = 4, seed: int = 0) -> torch.Tensor:
    x = torch.rand((n, *shape), generator=torch.Generator().manual_seed(seed))
    x[0] = 0.0
    x[1] = 1.0
    return x


def _labelled(n: int, shape, num_classes: int = 10, seed: int = 0) -> ImageData:
    g = torch.Generator().manual_seed(seed)
    return ImageData(torch.rand((n, *shape), generator=g) * 0.9 + 0.05, torch.arange(n) % num_classes)


# --------------------------------------------------------------------------- every trigger


def test_the_paper_ten_are_registered() -> None:
    assert PAPER_TEN <= set(TRIGGERS) and PAPER_TEN <= set(trigger_names())
    assert {n for n in PAPER_TEN if TRIGGERS[n].clean_label} == {"sig", "cl"}
    for name in PAPER_TEN:  # each class cites its source paper
        assert re.search(r"et al\., 20[12]\d", TRIGGERS[name].__doc__ or ""), name


@pytest.mark.parametrize("shape", ALL_SHAPES)
@pytest.mark.parametrize("name", sorted(PAPER_TEN))
def test_range_determinism_no_inplace_and_mask(name: str, shape) -> None:
    x = _rand(shape)
    before = x.clone()
    trig = build_trigger(name, shape, seed=3)
    out = trig.apply(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(x, before) and out.data_ptr() != x.data_ptr()
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert torch.equal(out, build_trigger(name, shape, seed=3).apply(x))  # same seed, same output
    assert not torch.equal(out[2:], x[2:])  # the trigger does something to ordinary images
    mask = trig.changed_mask()
    if mask is not None:
        assert mask.dtype == torch.bool and tuple(mask.shape) == shape
        assert 0 < int(mask.sum()) < mask.numel()
        assert torch.equal(out[:, ~mask], x[:, ~mask])  # nothing outside the mask moves


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", SEEDED)
def test_seeded_patterns_differ_between_seeds(name: str, shape) -> None:
    x = torch.full((1, *shape), 0.5)
    a, b = build_trigger(name, shape, seed=0), build_trigger(name, shape, seed=1)
    assert not torch.equal(a.apply(x), b.apply(x))


@pytest.mark.parametrize("name", UNSEEDED)
def test_unseeded_patterns_ignore_the_seed(name: str) -> None:
    x = _rand((3, 32, 32))
    a, b = build_trigger(name, (3, 32, 32), seed=0), build_trigger(name, (3, 32, 32), seed=9)
    assert torch.equal(a.apply(x), b.apply(x))


@pytest.mark.parametrize("shape", ALL_SHAPES)
@pytest.mark.parametrize("name", REPLACING)
def test_patch_triggers_stamp_fixed_values_on_exactly_their_mask(name: str, shape) -> None:
    trig = build_trigger(name, shape, seed=5)
    mask = trig.changed_mask()
    x = torch.full((2, *shape), 0.5)  # never a pattern value (patterns are 0 / 1)
    out = trig.apply(x)
    assert torch.equal((out != x).any(dim=0), mask)
    other = trig.apply(_rand(shape))
    assert torch.equal(other[:, mask], out[:1, mask].expand(other.shape[0], -1))  # image-independent
    assert set(out[:, mask].unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize(
    "name, shape, side",
    [
        ("trojan_3x3", (1, 8, 8), 3), ("trojan_3x3", (3, 32, 32), 3),
        ("trojan_8x8", (1, 8, 8), 4), ("trojan_8x8", (1, 16, 16), 4),
        ("trojan_8x8", (3, 24, 24), 6), ("trojan_8x8", (3, 32, 32), 8),
    ],
)
def test_trojan_squares_size_and_place(name: str, shape, side: int) -> None:
    c, h, w = shape
    trig = build_trigger(name, shape, seed=2)
    mask = trig.changed_mask()
    expected = torch.zeros(shape, dtype=torch.bool)
    expected[:, h - 1 - side : h - 1, w - 1 - side : w - 1] = True  # 1-pixel margin, bottom-right
    assert torch.equal(mask, expected) and trig.side == side
    patch = trig.pattern()[:, h - 1 - side : h - 1, w - 1 - side : w - 1]
    assert patch.min() == 0.0 and patch.max() == 1.0  # a contrasting pattern, not a flat square
    if c == 3:  # a colour patch: the channels are not all equal
        assert not (torch.equal(patch[0], patch[1]) and torch.equal(patch[1], patch[2]))


@pytest.mark.parametrize("shape, count", [((1, 8, 8), 3), ((1, 16, 16), 3), ((3, 24, 24), 5), ((3, 32, 32), 9)])
def test_l0_inv_replaces_few_pixels(shape, count: int) -> None:
    trig = build_trigger("l0_inv", shape, seed=1)
    mask = trig.changed_mask()
    per_pixel = mask.all(dim=0)
    assert torch.equal(mask, per_pixel.expand(shape))  # whole pixels, all channels
    assert int(per_pixel.sum()) == count == trig.num_pixels
    assert int(build_trigger("l0_inv", shape, num_pixels=2).changed_mask()[0].sum()) == 2
    with pytest.raises(ValueError, match="num_pixels must be an int"):
        build_trigger("l0_inv", shape, num_pixels=0)


@pytest.mark.parametrize("shape, side", [((1, 8, 8), 2), ((1, 16, 16), 2), ((3, 24, 24), 2), ((3, 32, 32), 3)])
def test_cl_trigger_is_a_grid_at_the_four_corners(shape, side: int) -> None:
    c, h, w = shape
    trig = build_trigger("cl", shape)
    mask, pattern = trig.changed_mask(), trig.pattern()
    assert trig.side == side and int(mask[0].sum()) == 4 * side * side
    for rows in (slice(0, side), slice(h - side, h)):
        for cols in (slice(0, side), slice(w - side, w)):
            assert mask[:, rows, cols].all()
    assert torch.equal(pattern, pattern.flip(-1)) and torch.equal(pattern, pattern.flip(-2))  # mirrored
    corner = pattern[0, :side, :side]
    assert corner.min() == 0.0 and corner.max() == 1.0 and corner[0, 0] == 1.0  # checkerboard, white corner
    if side == 3:
        assert torch.equal(corner, torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]]))


@pytest.mark.parametrize("shape", ALL_SHAPES)
def test_sig_formula_and_frequency_scaling(shape) -> None:
    c, h, w = shape
    trig = build_trigger("sig", shape)
    f = min(6, w // 4)
    assert trig.frequency == f and trig.delta == pytest.approx(20 / 255)
    x = _rand(shape)
    j = torch.arange(w, dtype=torch.float64)
    wave = (20 / 255 * torch.sin(2 * math.pi * j * f / w)).to(torch.float32)
    torch.testing.assert_close(trig.apply(x), (x + wave).clamp(0, 1))
    assert trig.pattern().abs().max() <= 20 / 255 + 1e-6
    strong = build_trigger("sig", shape, delta=0.3, f=1)
    assert strong.frequency == 1 and strong.pattern().max() == pytest.approx(0.3, abs=0.02)


@pytest.mark.parametrize("shape", ALL_SHAPES)
def test_l2_inv_has_the_fixed_norm(shape) -> None:
    trig = build_trigger("l2_inv", shape, seed=4)
    d = math.prod(shape)
    assert float(trig.pattern().norm()) == pytest.approx(8 / 255 * math.sqrt(d), rel=1e-5)
    other = build_trigger("l2_inv", shape, rms=0.1)
    assert float(other.pattern().norm()) == pytest.approx(0.1 * math.sqrt(d), rel=1e-5)
    x = torch.full((1, *shape), 0.5)
    torch.testing.assert_close(trig.apply(x)[0], (0.5 + trig.pattern()).clamp(0, 1))


@pytest.mark.parametrize("shape", ALL_SHAPES)
def test_trojan_wm_adds_sparse_strokes(shape) -> None:
    c, h, w = shape
    trig = build_trigger("trojan_wm", shape, seed=0)
    mask = trig.changed_mask()
    assert torch.equal(mask, mask[0].expand(shape))
    covered = int(mask[0].sum())
    goal = max(3, round(0.12 * h * w))
    assert goal <= covered <= goal + max(3, round(min(h, w) / 3))  # stops once the density is reached
    x = torch.full((1, *shape), 0.25)
    out = trig.apply(x)
    assert torch.allclose(out[0][mask], torch.tensor(0.75)) and torch.equal(out[0][~mask], x[0][~mask])
    assert torch.equal(trig.apply(torch.ones((1, *shape))), torch.ones((1, *shape)))  # additive, clamped


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("sig", {"delta": 0.0}, "sig delta must be a finite number > 0"),
        ("sig", {"f": -1}, "sig f must be a finite number > 0"),
        ("trojan_wm", {"amplitude": 1.5}, r"amplitude must be in \(0, 1\]"),
        ("trojan_wm", {"density": 1.0}, r"density must be in \(0, 1\)"),
        ("l2_inv", {"rms": 0}, "l2_inv rms must be"),
        ("cl", {"eps": 2.0}, r"cl eps must be in \[0, 1\]"),
        ("cl", {"steps": -1}, "cl steps must be an int >= 0"),
        ("trojan_3x3", {"size": 3}, "unknown parameter 'size' for trigger 'trojan_3x3'"),
    ],
)
def test_bad_parameters(name: str, params: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_trigger(name, (1, 8, 8), **params)


# --------------------------------------------------------------------------- poisoning


class RecordingTrigger(Trigger):
    """Records what poison_data hands to prepare_poison; its training-time images differ from apply."""

    name = "test_recording_prepare"
    calls: ClassVar[list[dict]] = []

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        return images.clone()

    def changed_mask(self) -> None:
        return None

    def prepare_poison(self, images, labels, *, num_classes=None, seed=0, pool=None):
        type(self).calls.append({"labels": labels.clone(), "num_classes": num_classes, "seed": seed, "pool": pool})
        return torch.zeros_like(images)


def test_poison_data_uses_prepare_poison_with_true_labels_and_the_pool() -> None:
    data = _labelled(50, (1, 8, 8))
    RecordingTrigger.calls.clear()
    trig = build_trigger("test_recording_prepare", data.shape)
    poisoned, idx = poison_data(data, trig, 0.2, target_label=7, seed=3, num_classes=10)
    (call,) = RecordingTrigger.calls
    assert torch.equal(call["labels"], data.labels[torch.from_numpy(idx)])  # true labels, before the flip
    assert call["num_classes"] == 10 and call["seed"] == 3 and call["pool"] is data
    assert (poisoned.images[torch.from_numpy(idx)] == 0).all() and (poisoned.labels[torch.from_numpy(idx)] == 7).all()
    bd = make_poisoned_test_set(data, trig, 7)  # the ASR set uses apply only
    assert len(RecordingTrigger.calls) == 1 and torch.equal(bd.images, data.images[data.labels != 7])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", sorted(PAPER_TEN - {"cl"}))
def test_default_prepare_poison_is_apply(name: str, shape) -> None:
    trig = build_trigger(name, shape, seed=1)
    x = _rand(shape)
    assert torch.equal(trig.prepare_poison(x, torch.zeros(len(x), dtype=torch.long), seed=5), trig.apply(x))


def test_sig_poisons_only_target_class_and_keeps_labels() -> None:
    data = _labelled(200, (3, 32, 32))
    trig = build_trigger("sig", data.shape)
    poisoned, idx = poison_data(data, trig, 0.5, target_label=4, seed=0, num_classes=10)
    sel = torch.from_numpy(idx)
    assert len(idx) == round(0.5 * int((data.labels == 4).sum()))
    assert (data.labels[sel] == 4).all() and torch.equal(poisoned.labels, data.labels)
    assert torch.equal(poisoned.images[sel], trig.apply(data.images[sel]))
    rest = torch.ones(len(data), dtype=torch.bool)
    rest[sel] = False
    assert torch.equal(poisoned.images[rest], data.images[rest])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", NEW)
def test_poisoned_test_set_has_no_target_class_image(name: str, shape) -> None:
    data = _labelled(60, shape)
    trig = build_trigger(name, shape, seed=2)
    bd = make_poisoned_test_set(data, trig, target_label=3)
    keep = data.labels != 3
    assert len(bd) == int(keep.sum()) == 54 and (bd.labels == 3).all()
    assert torch.equal(bd.images, trig.apply(data.images[keep]))  # exactly the non-target images, apply only


# --------------------------------------------------------------------------- CL (adversarial step)


@pytest.fixture(scope="module")
def digits_pool() -> ImageData:
    from abd_fl.data.digits import load_digits_bundle

    return load_digits_bundle(image_size=8).train.subset(np.arange(400))


def test_cl_prepare_poison_stays_within_eps_and_stamps_the_grid(one_torch_thread, digits_pool) -> None:
    trig = build_trigger("cl", digits_pool.shape)
    target = digits_pool.labels == 0
    x, y = digits_pool.images[target], digits_pool.labels[target]
    out = trig.prepare_poison(x, y, num_classes=10, seed=0, pool=digits_pool)
    mask, pattern = trig.changed_mask(), trig.pattern()
    diff = (out - x)[:, ~mask]
    assert diff.abs().max() <= trig.eps + 1e-6 and trig.eps == pytest.approx(16 / 255)
    assert diff.abs().mean() > 0.3 * trig.eps  # PGD actually moved the images
    assert torch.equal(out[:, mask], pattern[mask].expand(len(out), -1))  # four-corner grid
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert torch.equal(out, trig.prepare_poison(x, y, num_classes=10, seed=0, pool=digits_pool))  # seeded
    assert not torch.equal(out, trig.apply(x))  # training images differ from the test-time trigger


def test_cl_pgd_raises_the_surrogate_loss(one_torch_thread, digits_pool) -> None:
    trig = build_trigger("cl", digits_pool.shape)
    model = trig.train_surrogate(digits_pool, 10, seed=0)
    with torch.no_grad():
        acc = (model(digits_pool.images).argmax(1) == digits_pool.labels).float().mean().item()
    assert acc > 0.9  # the attacker's surrogate learnt its data
    x, y = digits_pool.images[:100], digits_pool.labels[:100]
    adv = trig.perturb(model, x, y)
    assert (adv - x).abs().max() <= trig.eps + 1e-6
    noise = trig.eps * torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(0)).mul(2).sub(1)
    with torch.no_grad():
        clean, adv_loss = F.cross_entropy(model(x), y), F.cross_entropy(model(adv), y)
        random_loss = F.cross_entropy(model((x + noise).clamp(0, 1)), y)
    assert adv_loss > 5 * clean + 0.2 and adv_loss > 3 * random_loss  # gradient-directed, not just noise
    assert all(p.requires_grad for p in model.parameters())  # perturb leaves the model as it found it


def test_cl_poison_data_target_class_only(one_torch_thread) -> None:
    data = _labelled(60, (3, 32, 32))
    trig = build_trigger("cl", data.shape, surrogate_epochs=1, steps=3)
    poisoned, idx = poison_data(data, trig, 0.5, target_label=2, seed=0, num_classes=10)
    sel = torch.from_numpy(idx)
    assert len(idx) == 3 and (data.labels[sel] == 2).all() and torch.equal(poisoned.labels, data.labels)
    mask = trig.changed_mask()
    assert (poisoned.images[sel][:, ~mask] - data.images[sel][:, ~mask]).abs().max() <= trig.eps + 1e-6
    assert torch.equal(poisoned.images[sel][:, mask], trig.pattern()[mask].expand(3, -1))
    rest = torch.ones(len(data), dtype=torch.bool)
    rest[sel] = False
    assert torch.equal(poisoned.images[rest], data.images[rest])


# --------------------------------------------------------------------------- configs and figure


def _top_keys(yaml_text: str) -> list[str]:
    return [line.split(":")[0] for line in yaml_text.splitlines() if line and not line.startswith((" ", "#"))]


@pytest.mark.parametrize("name", NEW)
def test_attack_config_for_each_trigger(name: str) -> None:
    from abd_fl.config import validate_config
    from abd_fl.paths import compose_config, configs_dir

    reference = (configs_dir() / "attack" / "badnets_square.yaml").read_text()
    own = (configs_dir() / "attack" / f"{name}.yaml").read_text()
    assert _top_keys(own) == _top_keys(reference)
    cfg = compose_config([f"attack={name}"])
    validate_config(cfg)
    assert cfg["attack"]["trigger"] == name
    build_trigger(name, (1, 8, 8), **dict(cfg["attack"]["trigger_params"] or {}))


@pytest.mark.parametrize("shape", SHAPES)
def test_save_trigger_figure_writes_a_png(tmp_path, shape) -> None:
    from PIL import Image

    from abd_fl.results.trigger_figure import save_trigger_figure

    images = _rand(shape, n=3, seed=1)
    triggers = {name: build_trigger(name, shape) for name in sorted(PAPER_TEN)}
    captions = {"trojan_wm": "93.8/100", "cl": "91.2/94.3"}
    path = save_trigger_figure(tmp_path / "sub" / "triggers.png", images, triggers, captions)
    assert path == tmp_path / "sub" / "triggers.png"
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        width, height = img.size
        assert img.format == "PNG"
    assert width > height  # 11 columns (clean + ten triggers), 3 rows
    assert width >= 11 * 100 and height >= 3 * 100
    with pytest.raises(ValueError, match="captions for unknown columns: nope"):
        save_trigger_figure(tmp_path / "x.png", images, triggers, {"nope": "1/2"})
