"""Tests for the Shuffling Vaccine (abd_fl.defense.vaccine; ABD paper Sec. 4.1 and 4.3)."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from abd_fl.defense.vaccine import (
    KL_FLOOR,
    ShuffledEnsemble,
    VaccineResult,
    conv_layers,
    detection_auc,
    kd_weights,
    score_batches,
    search_vaccine,
    shuffle_scores,
    shuffled_copy,
    suspicion_auc,
    tail_ratio,
    vaccine_mask,
    vaccine_regularizer,
)
from abd_fl.models import MODEL_NAMES, build_model


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(name: str, seed: int = 0, in_channels: int = 1) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build_model(name, 10, in_channels, (0.5,) * in_channels, (0.25,) * in_channels)
    return model.eval()


def _recover_permutation(original: torch.Tensor, shuffled: torch.Tensor) -> list[int]:
    """perm with shuffled[:, j] == original[:, perm[j]], found by matching dim-1 slices exactly."""
    index: dict[bytes, int] = {}
    for i in range(original.shape[1]):
        key = original[:, i].detach().contiguous().numpy().tobytes()
        assert key not in index, "repeated dim-1 slices: permutation not identifiable"
        index[key] = i
    perm = []
    for j in range(shuffled.shape[1]):
        key = shuffled[:, j].detach().contiguous().numpy().tobytes()
        assert key in index, f"dim-1 slice {j} of the shuffled weight is not a slice of the original"
        perm.append(index[key])
    return perm


# --------------------------------------------------------------------------------------
# shuffled_copy / conv_layers
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_shuffle_permutes_only_last_convs_along_input_channels(name: str) -> None:
    model = _model(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    convs = conv_layers(model)
    conv_names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == len(conv_names) and conv_names
    shuffled_names = {f"{n}.weight" for n in conv_names[-5:]}  # cnn/cnn_small: all 3 convs

    copy = shuffled_copy(model, num_layers=5, seed=0)
    assert copy is not model and not copy.training
    assert all(not p.requires_grad for p in copy.parameters())
    assert any(p.requires_grad for p in model.parameters())  # the original keeps its flags
    after = copy.state_dict()
    assert after.keys() == before.keys()
    moved = 0
    for key, value in before.items():
        assert torch.equal(model.state_dict()[key], value), f"{key}: the original model changed"
        if key not in shuffled_names:
            assert torch.equal(after[key], value), f"{key} should be untouched"
            continue
        perm = _recover_permutation(value, after[key])
        assert sorted(perm) == list(range(value.shape[1]))
        assert torch.equal(after[key], value[:, perm])
        moved += perm != sorted(perm)
    # every shuffled layer with more than one input channel is (almost surely) moved
    multi = sum(before[k].shape[1] > 1 for k in shuffled_names)
    assert moved == multi and moved >= (1 if name.startswith("lenet") else 2)  # lenet: 2 convs, a grey stem
    if name.startswith(("cnn", "lenet")):
        # only 3 (lenet: 2) convs: all are "shuffled", and the 1-input-channel stem is necessarily unchanged
        assert len(conv_names) == (2 if name.startswith("lenet") else 3)
        assert torch.equal(after[f"{conv_names[0]}.weight"], before[f"{conv_names[0]}.weight"])


def test_shuffle_is_deterministic_and_seed_dependent() -> None:
    model = _model("wrn16_1")
    a = shuffled_copy(model, num_layers=5, seed=3).state_dict()
    b = shuffled_copy(model, num_layers=5, seed=3).state_dict()
    c = shuffled_copy(model, num_layers=5, seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    # num_layers=1 touches exactly the last conv
    last = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][-1] + ".weight"
    one = shuffled_copy(model, num_layers=1, seed=0).state_dict()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, one[k])]
    assert changed == [last]


def test_shuffle_grouped_conv_and_errors() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.Conv2d(6, 6, 1, groups=3)).eval()
    copy = shuffled_copy(model, num_layers=10, seed=1)  # more than available: both convs
    for orig, new in zip(conv_layers(model), conv_layers(copy)):
        perm = _recover_permutation(orig.weight.detach(), new.weight)
        assert sorted(perm) == list(range(orig.weight.shape[1]))  # within in_channels / groups
        assert torch.equal(orig.bias, new.bias)
    with pytest.raises(ValueError, match="num_layers"):
        shuffled_copy(model, num_layers=0)
    with pytest.raises(ValueError, match="no nn.Conv2d"):
        shuffled_copy(nn.Linear(3, 2))


def test_shuffled_ensemble_averages_member_logits() -> None:
    model = _model("cnn_small")
    ens = ShuffledEnsemble(model, num_layers=2, seed=5)
    assert len(ens.members) == 3 and len(set(ens.seeds)) == 3
    assert not any(p.requires_grad for p in ens.parameters())
    ens.train()
    assert not ens.training and not any(m.training for m in ens.modules())
    x = torch.rand(7, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = sum(m(x) for m in ens.members) / 3
        assert torch.allclose(ens(x), expected, atol=1e-6)
        again = ShuffledEnsemble(model, num_layers=2, seed=5)
        assert torch.equal(again(x), ens(x))
        assert not torch.equal(ShuffledEnsemble(model, num_layers=2, seed=6)(x), ens(x))


# --------------------------------------------------------------------------------------
# scores and tail ratio
# --------------------------------------------------------------------------------------


def test_scores_on_hand_built_logits() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 5.0]], dtype=torch.float64)
    s = shuffle_scores(logits, logits.clone())
    assert torch.allclose(s, torch.full((2,), math.log(KL_FLOOR), dtype=torch.float64))

    p = torch.tensor([[0.7, 0.2, 0.1], [0.25, 0.25, 0.5]], dtype=torch.float64)
    q = torch.tensor([[0.1, 0.3, 0.6], [0.5, 0.25, 0.25]], dtype=torch.float64)
    expected = torch.log((p * (p / q).log()).sum(1) / 3)  # KL(T || T~) averaged over 3 classes
    got = shuffle_scores(p.log() + 2.0, q.log() - 1.0)  # logits are defined up to a shift
    assert torch.allclose(got, expected, atol=1e-12)
    ref = F.kl_div(F.log_softmax(q.log(), 1), F.softmax(p.log(), 1), reduction="none").mean(1).log()
    assert torch.allclose(got, ref, atol=1e-12)
    with pytest.raises(ValueError, match="shape"):
        shuffle_scores(p, q[:1])


def test_tail_ratio() -> None:
    scores = torch.cat([torch.zeros(1000), torch.full((30,), -100.0)])
    assert tail_ratio(scores) == pytest.approx(30 / 1030)
    assert tail_ratio([0.0] * 10 + [1.0] * 10) == 0.0  # no tail within 3 sigma
    assert tail_ratio([2.0] * 5) == 0.0
    normal = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    assert tail_ratio(normal) == pytest.approx(0.00135, abs=4e-4)
    assert tail_ratio(-normal.exp()) > 0.015  # a heavy lower tail
    with pytest.raises(ValueError):
        tail_ratio([])


# --------------------------------------------------------------------------------------
# generator regulariser and KD weights (Sec. 4.1 (1), (2))
# --------------------------------------------------------------------------------------


def test_regularizer_value_and_zero_when_nothing_flagged() -> None:
    t = torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [1.0, 0.0, 0.5]], dtype=torch.float64, requires_grad=True)
    s = torch.tensor([[2.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.8, 0.1, 0.0]], dtype=torch.float64, requires_grad=True)
    mask = vaccine_mask(t, s)
    assert mask.tolist() == [True, False, True]
    kl = (F.softmax(t, 1) * (F.log_softmax(t, 1) - F.log_softmax(s, 1))).sum(1)
    term = vaccine_regularizer(t, s, coef=0.1)  # the reference: the KL averaged over the K = 3 classes
    assert term.ndim == 0 and term.item() < 0
    assert torch.allclose(term, -0.1 * kl[mask].mean() / 3)
    assert torch.allclose(vaccine_regularizer(t, s, coef=0.1, class_reduction="sum"), -0.1 * kl[mask].mean())
    soft = F.softmax(s, 1).gather(1, t.argmax(1, keepdim=True)).squeeze(1).detach()  # p_T~(argmax T)
    assert torch.allclose(vaccine_regularizer(t, s, coef=0.1, mask="soft"), -0.1 * (soft * kl / 3).sum() / soft.sum())
    term.backward()
    assert t.grad.abs().sum() > 0 and s.grad.abs().sum() > 0  # gradients through T and T~

    none_t = torch.tensor([[2.0, 0.0], [2.0, 0.0]], requires_grad=True)
    none_s = torch.tensor([[0.0, 2.0], [0.0, 2.0]], requires_grad=True)
    zero = vaccine_regularizer(none_t, none_s)
    assert zero.item() == 0.0
    zero.backward()
    assert torch.equal(none_t.grad, torch.zeros_like(none_t))


def test_regularizer_step_increases_kl_on_flagged_samples() -> None:
    """Minimising the term (as a generator does) must push flagged x away from T~ (the paper's max R)."""
    teacher = _model("cnn_small", seed=1).double()
    shuffled = ShuffledEnsemble(teacher, num_layers=2, seed=0)
    x = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64, requires_grad=True)
    t_logits, s_logits = teacher(x), shuffled(x)
    mask = vaccine_mask(t_logits, s_logits)
    assert 0 < int(mask.sum()) < 64

    def flagged_kl(inputs: torch.Tensor) -> float:
        with torch.no_grad():
            t, s = teacher(inputs), shuffled(inputs)
            return float((F.softmax(t, 1) * (F.log_softmax(t, 1) - F.log_softmax(s, 1))).sum(1)[mask].mean())

    (grad,) = torch.autograd.grad(vaccine_regularizer(t_logits, s_logits, coef=0.1), x)
    step = 0.5 * grad / grad.norm()
    before = flagged_kl(x.detach())
    descended = flagged_kl(x.detach() - step)  # a generator step: minimise its loss
    ascended = flagged_kl(x.detach() + step)
    assert descended > before > ascended, (before, descended, ascended)


def test_kd_weights_paper_and_reference() -> None:
    t = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]], requires_grad=True)
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 3.0], [1.0, 0.0], [5.0, 0.0]], requires_grad=True)
    flagged = torch.tensor([True, False, True, False, True])
    assert torch.equal(vaccine_mask(t, s), flagged)

    w = kd_weights(t, s)  # paper mode, alpha = 10
    assert not w.requires_grad and w.shape == (5,)
    assert torch.allclose(w, torch.where(flagged, torch.tensor(0.1), torch.tensor(1.0)))
    assert torch.allclose(kd_weights(t, s, mode="paper", alpha=4.0)[flagged], torch.tensor(0.25))

    kl = torch.rand(5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    w_ref = kd_weights(t.double(), s.double(), mode="reference", coef=0.1)
    assert not w_ref.requires_grad
    expected = kl[~flagged].mean() - 0.1 * kl[flagged].mean()
    assert torch.allclose((w_ref * kl).mean(), expected, atol=1e-12)
    assert torch.allclose(w_ref[~flagged], torch.tensor(2.5, dtype=torch.float64))  # N / |~m|
    assert torch.allclose(w_ref[flagged], torch.tensor(-0.1 * 5 / 3, dtype=torch.float64))

    same = t.detach().clone()
    assert torch.allclose(kd_weights(same, same, mode="reference", coef=0.3), torch.tensor(-0.3))
    none_flagged = kd_weights(torch.tensor([[1.0, 0.0]] * 5), torch.tensor([[0.0, 1.0]] * 5), mode="reference")
    assert torch.allclose(none_flagged, torch.ones(5))
    with pytest.raises(ValueError, match="mode"):
        kd_weights(t, s, mode="nope")
    with pytest.raises(ValueError, match="alpha"):
        kd_weights(t, s, alpha=0.0)


# --------------------------------------------------------------------------------------
# AUCs
# --------------------------------------------------------------------------------------


def test_aucs_on_hand_built_inputs() -> None:
    assert suspicion_auc([0.1, 0.9, 0.8, 0.2], [False, True, True, False]) == 1.0
    assert suspicion_auc([0.9, 0.1, 0.2, 0.8], [False, True, True, False]) == 0.0
    assert math.isnan(suspicion_auc([0.1, 0.2], [True, True]))
    assert math.isnan(suspicion_auc([0.1, 0.2], [False, False]))
    with pytest.raises(ValueError, match="length"):
        suspicion_auc([0.1, 0.2], [True])
    assert detection_auc(torch.tensor([0.0, 1.0, 2.0]), torch.tensor([-5.0, -4.0])) == 1.0
    assert detection_auc([-5.0, -4.0], [0.0, 1.0, 2.0]) == 0.0
    assert math.isnan(detection_auc([0.0, 1.0], []))


# --------------------------------------------------------------------------------------
# vaccine search: argument handling on a random model
# --------------------------------------------------------------------------------------


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _random_batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.rand(40, 1, 8, 8, generator=g) for _ in range(2)]


def test_search_respects_max_tries_when_unreachable() -> None:
    teacher = _model("cnn_small")
    teacher.train()
    handler = _ListHandler()
    logger = logging.getLogger("abd_fl")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        result = search_vaccine(teacher, _random_batches(), num_layers=2, threshold=1.0, max_tries=3, seed=1)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert isinstance(result, VaccineResult)
    assert not result.found and result.shuffled is None and len(result.tries) == 3
    assert teacher.training  # mode restored
    assert result.tail_ratio == max(t["ratio"] for t in result.tries)
    best = max(result.tries, key=lambda t: t["ratio"])
    assert result.mean_score == best["mean_score"]
    assert len({t["seed"] for t in result.tries}) == 3
    assert sum("try" in m for m in handler.messages) == 3 and "no vaccine found" in handler.messages[-1]
    again = search_vaccine(teacher, _random_batches(), num_layers=2, threshold=1.0, max_tries=3, seed=1)
    assert again.tries == result.tries


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"threshold": -0.1}, "threshold"),
        ({"threshold": 1.5}, "threshold"),
        ({"threshold": float("nan")}, "threshold"),
        ({"max_tries": 0}, "max_tries"),
        ({"num_shuffles": 0}, "num_shuffles"),
        ({"num_layers": 0}, "num_layers"),
        ({"seed": -1}, "seed"),
    ],
)
def test_search_argument_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        search_vaccine(_model("cnn_small"), _random_batches(), **kwargs)


def test_search_rejects_empty_batches() -> None:
    with pytest.raises(ValueError, match="empty"):
        search_vaccine(_model("cnn_small"), [])
    with pytest.raises(ValueError, match="empty"):
        search_vaccine(_model("cnn_small"), [torch.zeros(0, 1, 8, 8)])


# --------------------------------------------------------------------------------------
# a real backdoored teacher: digits upsampled to 16x16, BadNets square, 10% poison, target 0
# --------------------------------------------------------------------------------------
# The 3-conv `cnn` has no WRN-like "last stage" of 5 convs; shuffling only its last conv
# (num_layers=1) is the analogue and separates triggered inputs reliably at this scale
# (num_layers >= 2 shuffles the middle conv too and is much less stable; see the report).


@pytest.fixture(scope="module")
def digits_setup(poisoned_digits16: dict) -> dict:
    """The shared backdoored / clean teachers of ``tests/conftest.py``."""
    return poisoned_digits16


def test_detection_auc_separates_triggered_samples(digits_setup: dict) -> None:
    clean, triggered = digits_setup["clean_images"], digits_setup["triggered_images"]
    aucs = {}
    for kind in ("poisoned", "clean"):
        teacher = digits_setup[kind]
        aucs[kind] = []
        for seed in range(3):
            ens = ShuffledEnsemble(teacher, num_shuffles=3, num_layers=1, seed=seed)
            s_clean = score_batches(teacher, ens, [clean])
            s_trig = score_batches(teacher, ens, [triggered])
            aucs[kind].append(detection_auc(s_clean, s_trig))
    print("detection AUC (poisoned teacher, clean teacher):", aucs)
    assert max(aucs["poisoned"]) > 0.8, aucs  # paper Fig. 4a: 0.984
    assert max(aucs["clean"]) < 0.75 and np.mean(aucs["clean"]) < np.mean(aucs["poisoned"]) - 0.2, aucs


def test_search_finds_vaccine_on_poisoned_mix_and_not_on_clean(digits_setup: dict) -> None:
    clean, triggered = digits_setup["clean_images"], digits_setup["triggered_images"]
    mix = torch.cat([clean, triggered[:25]])  # 25 / 525 ~ 4.8% triggered
    batches = list(mix.split(128))
    handler = _ListHandler()
    logger = logging.getLogger("test_vaccine.search")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        result = search_vaccine(digits_setup["poisoned"], batches, num_layers=1, seed=0, logger=logger)
    finally:
        logger.removeHandler(handler)
    print("poisoned teacher, mixed surrogate:", result.tries)
    assert result.found and isinstance(result.shuffled, ShuffledEnsemble) and result.tail_ratio > 0.02
    assert result.tail_ratio == result.tries[-1]["ratio"] and len(handler.messages) == len(result.tries)
    assert "accepted" in handler.messages[-1]

    # the same search budget, threshold out of reach, so every try's ratio is recorded
    poisoned_all = search_vaccine(digits_setup["poisoned"], batches, num_layers=1, threshold=1.0, max_tries=4)
    clean_all = search_vaccine(digits_setup["clean"], [clean], num_layers=1, threshold=1.0, max_tries=4)
    p_ratios = [t["ratio"] for t in poisoned_all.tries]
    c_ratios = [t["ratio"] for t in clean_all.tries]
    print("tail ratios: poisoned teacher on mix", p_ratios, "clean teacher on clean", c_ratios)
    assert np.mean(c_ratios) < np.mean(p_ratios)
    assert np.mean(c_ratios) < 0.02 < np.mean(p_ratios)


def test_tail_class_share_counts_the_low_score_tail_by_teacher_label() -> None:
    from abd_fl.defense.vaccine import tail_class_share

    scores = torch.zeros(1000)
    scores[:20] = -100.0  # an outlying tail of 20 samples ...
    labels = torch.arange(1000) % 10
    labels[:15] = 0  # ... 15 of them labelled 0
    share, cls, n = tail_class_share(scores, labels)
    assert (cls, n) == (0, 20) and share == pytest.approx(15 / 20)
    assert tail_class_share(torch.zeros(50), torch.zeros(50, dtype=torch.long)) == (pytest.approx(float("nan"), nan_ok=True), -1, 0)
    with pytest.raises(ValueError, match="differ in shape"):
        tail_class_share(torch.zeros(3), torch.zeros(4))


def test_the_tail_class_rule_accepts_a_concentrated_tail_and_counts_repeated_batches() -> None:
    from abd_fl.defense.vaccine import search_vaccine

    teacher = _model("cnn_small", seed=1)
    batches = [torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    strict = search_vaccine(teacher, batches, num_layers=1, max_tries=2, rule="tail_class", class_threshold=1.0, min_tail=10**6)
    assert not strict.found and len(strict.tries) == 2  # an impossible tail size: never accepted
    assert all({"tail_class_share", "tail_class", "tail_size"} <= set(t) for t in strict.tries)
    lax = search_vaccine(teacher, batches, num_layers=1, max_tries=2, rule="tail_class", class_threshold=0.0, min_tail=0)
    assert lax.found and lax.tries[0]["try"] == 1
    once = search_vaccine(teacher, batches, num_layers=1, max_tries=1)
    thrice = search_vaccine(teacher, batches, num_layers=1, max_tries=1, batch_counts=[3, 3, 3])
    assert thrice.tail_ratio == pytest.approx(once.tail_ratio)  # the same samples, each counted 3 times
    with pytest.raises(ValueError, match="unknown vaccine verification rule 'votes'"):
        search_vaccine(teacher, batches, rule="votes")
    with pytest.raises(ValueError, match="batch_counts must hold one integer >= 1 per batch"):
        search_vaccine(teacher, batches, batch_counts=[1])


def test_batch_normalised_regulariser_scales_with_the_flagged_share() -> None:
    t = torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [1.0, 0.0, 0.5], [0.0, 0.0, 1.0]], dtype=torch.float64)
    s = torch.tensor([[2.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.8, 0.1, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    flagged_mean = vaccine_regularizer(t, s, coef=0.1)  # 2 of 4 flagged
    assert torch.allclose(vaccine_regularizer(t, s, coef=0.1, normalize="batch"), flagged_mean * 2 / 4)
    with pytest.raises(ValueError, match="unknown regulariser normalisation 'all'"):
        vaccine_regularizer(t, s, normalize="all")
