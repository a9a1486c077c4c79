"""Tests for abd_fl.attacks: triggers (BadNets grid/square, Blend), poisoning, ASR test set."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest
import torch

from abd_fl.attacks import TRIGGERS, Trigger, build_trigger, make_poisoned_test_set, poison_data
from abd_fl.attacks.triggers import trigger_names
from abd_fl.data.base import ImageData

SHAPES = [(1, 8, 8), (3, 32, 32)]
CHECKER = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])


class CleanLabelDummy(Trigger):
    """A clean-label trigger in one small class: sets the top-left pixel to white."""

    name = "test_clean_label_dummy"
    clean_label: ClassVar[bool] = True

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        out = images.clone()
        out[:, :, 0, 0] = 1.0
        return out

    def changed_mask(self) -> torch.Tensor:
        mask = torch.zeros(self.image_shape, dtype=torch.bool)
        mask[:, 0, 0] = True
        return mask


def _labelled_data(n: int = 200, shape=(1, 8, 8), num_classes: int = 10, seed: int = 0) -> ImageData:
    """Random images whose pixel [0, 0, 0] stores the sample index (to identify the origin)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand((n, *shape), generator=g) * 0.9
    labels = torch.arange(n) % num_classes
    images[:, 0, 0, 0] = torch.arange(n, dtype=torch.float32) / (10 * n)
    return ImageData(images, labels)


# --------------------------------------------------------------------------- patch triggers


def _expected_patch(name: str, h: int) -> torch.Tensor:
    if name == "badnets_grid":
        return CHECKER  # 3x3 pixels at 8..32 px
    s = max(2, round(4 * h / 32))
    return torch.ones(s, s)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", ["badnets_grid", "badnets_square"])
def test_patch_trigger_changes_exactly_the_patch(name: str, shape) -> None:
    c, h, w = shape
    trig = build_trigger(name, shape)
    x = torch.full((2, c, h, w), 0.5)
    out = trig.apply(x)
    mask = trig.changed_mask()
    assert mask.dtype == torch.bool and tuple(mask.shape) == shape
    changed = (out != x).any(dim=0)
    assert torch.equal(changed, mask)  # 0.5 is never a pattern value: every masked pixel changes
    patch = _expected_patch(name, h)
    k = patch.shape[0]
    expected = x.clone()
    expected[:, :, h - 1 - k : h - 1, w - 1 - k : w - 1] = patch
    assert torch.equal(out, expected)
    # bottom-right with a 1-pixel margin: last row / column untouched, patch touches row/col -2
    assert not mask[:, -1, :].any() and not mask[:, :, -1].any()
    assert mask[:, h - 2, w - 2].all() and mask[:, h - 1 - k, w - 1 - k].all()
    assert not mask[:, : h - 1 - k, :].any() and not mask[:, :, : w - 1 - k].any()


def test_badnets_sizes_scale_with_image() -> None:
    grid64 = build_trigger("badnets_grid", (3, 64, 64))
    mask = grid64.changed_mask()
    assert int(mask[0].sum()) == 36  # 6x6 patch
    patch = grid64.apply(torch.full((1, 3, 64, 64), 0.5))[0, 0, 57:63, 57:63]
    assert torch.equal(patch, CHECKER.repeat_interleave(2, 0).repeat_interleave(2, 1))  # 2x2 cells
    assert int(build_trigger("badnets_square", (1, 32, 32)).changed_mask()[0].sum()) == 16
    assert int(build_trigger("badnets_square", (1, 8, 8)).changed_mask()[0].sum()) == 4


def test_patch_trigger_rejects_tiny_image() -> None:
    with pytest.raises(ValueError, match="at least 4x4"):
        build_trigger("badnets_grid", (1, 3, 3))


# --------------------------------------------------------------------------- blend


@pytest.mark.parametrize("shape", SHAPES)
def test_blend_formula(shape) -> None:
    trig = build_trigger("blend", shape, seed=3, alpha=0.3)
    assert trig.changed_mask() is None
    x = torch.rand((4, *shape), generator=torch.Generator().manual_seed(1))
    pattern = torch.rand(shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(trig.apply(x), 0.7 * x + 0.3 * pattern)


def test_blend_default_alpha_and_seeds() -> None:
    shape = (3, 8, 8)
    x = torch.zeros((1, *shape))
    a, b, c = (build_trigger("blend", shape, seed=s) for s in (0, 0, 1))
    assert a.alpha == pytest.approx(0.2)
    assert torch.equal(a.apply(x), b.apply(x))
    assert not torch.equal(a.apply(x), c.apply(x))


@pytest.mark.parametrize("alpha", [0.0, -0.1, 1.5])
def test_blend_bad_alpha(alpha: float) -> None:
    with pytest.raises(ValueError, match=f"alpha must be in \\(0, 1\\], got {alpha}"):
        build_trigger("blend", (1, 8, 8), alpha=alpha)


def test_blend_pattern_from_file(tmp_path) -> None:
    from PIL import Image

    arr = np.zeros((16, 16, 3), dtype=np.uint8)
    arr[..., 0] = 255  # pure red
    path = tmp_path / "pattern.png"
    Image.fromarray(arr).save(path)
    rgb = build_trigger("blend", (3, 8, 8), alpha=1.0, pattern_path=str(path))
    out = rgb.apply(torch.zeros((1, 3, 8, 8)))
    assert torch.allclose(out[0, 0], torch.ones(8, 8)) and torch.allclose(out[0, 1:], torch.zeros(2, 8, 8))
    gray = build_trigger("blend", (1, 8, 8), alpha=1.0, pattern_path=str(path))
    assert gray.apply(torch.zeros((1, 1, 8, 8))).shape == (1, 1, 8, 8)


# --------------------------------------------------------------------------- all triggers


@pytest.mark.parametrize("name", ["badnets_grid", "badnets_square", "blend"])
def test_trigger_range_determinism_and_no_inplace(name: str) -> None:
    shape = (3, 32, 32)
    x = torch.rand((5, *shape), generator=torch.Generator().manual_seed(0))
    x[0] = 0.0
    x[1] = 1.0
    before = x.clone()
    out = build_trigger(name, shape, seed=7).apply(x)
    assert torch.equal(x, before)
    assert out.data_ptr() != x.data_ptr()
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert torch.equal(out, build_trigger(name, shape, seed=7).apply(x))


def test_apply_rejects_wrong_shape() -> None:
    with pytest.raises(ValueError, match=r"\(N, 1, 8, 8\)"):
        build_trigger("badnets_square", (1, 8, 8)).apply(torch.zeros(2, 3, 8, 8))


def test_registry_and_errors() -> None:
    assert {"badnets_grid", "badnets_square", "blend"} <= set(TRIGGERS)
    assert {"badnets_grid", "badnets_square", "blend"} <= set(trigger_names())
    with pytest.raises(ValueError) as err:
        build_trigger("x", (1, 8, 8))
    msg = str(err.value)
    assert msg.startswith("unknown trigger 'x'; choose one of: ")
    assert "badnets_grid, badnets_square, blend" in msg
    with pytest.raises(ValueError, match="unknown parameter 'beta' for trigger 'blend'"):
        build_trigger("blend", (1, 8, 8), beta=0.1)


# --------------------------------------------------------------------------- poison_data


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.37, 1.0])
def test_poison_data_counts_labels_and_untouched_rest(rate: float) -> None:
    data = _labelled_data()
    before = ImageData(data.images.clone(), data.labels.clone())
    trig = build_trigger("badnets_square", data.shape)
    poisoned, idx = poison_data(data, trig, rate, target_label=3, seed=1, num_classes=10)
    assert len(idx) == round(rate * len(data)) and len(np.unique(idx)) == len(idx)
    assert torch.equal(data.images, before.images) and torch.equal(data.labels, before.labels)
    sel = torch.from_numpy(idx)
    rest = torch.ones(len(data), dtype=torch.bool)
    rest[sel] = False
    assert (poisoned.labels[sel] == 3).all()
    assert torch.equal(poisoned.labels[rest], data.labels[rest])
    assert torch.equal(poisoned.images[rest], data.images[rest])
    assert torch.equal(poisoned.images[sel], trig.apply(data.images[sel]))


def test_poison_data_is_seeded() -> None:
    data = _labelled_data()
    trig = build_trigger("blend", data.shape)
    p1, i1 = poison_data(data, trig, 0.2, 0, seed=5)
    p2, i2 = poison_data(data, trig, 0.2, 0, seed=5)
    _, i3 = poison_data(data, trig, 0.2, 0, seed=6)
    assert np.array_equal(i1, i2) and torch.equal(p1.images, p2.images)
    assert not np.array_equal(i1, i3)


@pytest.mark.parametrize("rate", [-0.1, 1.5])
def test_poison_data_bad_rate(rate: float) -> None:
    data = _labelled_data(20)
    with pytest.raises(ValueError, match=f"poison_rate must be in \\[0, 1\\], got {rate}"):
        poison_data(data, build_trigger("blend", data.shape), rate, 0)


@pytest.mark.parametrize("target", [-1, 10])
def test_poison_data_bad_target(target: int) -> None:
    data = _labelled_data(20)
    with pytest.raises(ValueError, match=f"target_label must be in \\[0, 10\\), got {target}"):
        poison_data(data, build_trigger("blend", data.shape), 0.1, target, num_classes=10)


def test_poison_data_shape_mismatch() -> None:
    data = _labelled_data(20)
    with pytest.raises(ValueError, match="trigger built for images"):
        poison_data(data, build_trigger("blend", (3, 8, 8)), 0.1, 0)


def test_clean_label_trigger_poisons_only_target_class() -> None:
    assert TRIGGERS["test_clean_label_dummy"] is CleanLabelDummy
    data = _labelled_data(200)
    trig = build_trigger("test_clean_label_dummy", data.shape)
    poisoned, idx = poison_data(data, trig, 0.5, target_label=4, seed=0, num_classes=10)
    n_target = int((data.labels == 4).sum())
    assert len(idx) == round(0.5 * n_target)
    assert (data.labels[torch.from_numpy(idx)] == 4).all()
    assert torch.equal(poisoned.labels, data.labels)
    assert (poisoned.images[torch.from_numpy(idx), :, 0, 0] == 1.0).all()


# --------------------------------------------------------------------------- ASR test set


def test_make_poisoned_test_set() -> None:
    n, target = 100, 2
    data = _labelled_data(n, shape=(3, 32, 32))
    trig = build_trigger("badnets_grid", data.shape)
    bd = make_poisoned_test_set(data, trig, target)
    non_target = data.labels != target
    assert len(bd) == int(non_target.sum())
    assert (bd.labels == target).all()
    # origin index survives in pixel [0, 0, 0] (outside the bottom-right trigger)
    origin = torch.round(bd.images[:, 0, 0, 0] * 10 * n).long()
    assert (data.labels[origin] != target).all()
    assert torch.equal(bd.images, trig.apply(data.images[non_target]))
