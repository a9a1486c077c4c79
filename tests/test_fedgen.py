"""FedGen: the models' feature / head split, the feature generator and its label-count
weighting, the generator's trip to the clients (Flower records) and its use there."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from torch import nn

from abd_fl.distill.fedgen import (
    GENERATOR_RECORD_KEY,
    FedGenConfig,
    FedGenRegularizer,
    FeatureGenerator,
    GeneratorPayloadError,
    check_generator_state,
    diversity_loss,
    label_distribution,
    label_weights,
    model_head,
    train_feature_generator,
)
from abd_fl.experiment import build_bundle, build_feature_generator, build_named_model, fedgen_settings
from abd_fl.local_update import client_update
from abd_fl.models import MODEL_NAMES, build_model
from abd_fl.paths import compose_config
from clients.client_app import regularizer_from_content
from strategies.datafree_kd import DataFreeKD, state_signature
from strategies.fedgen import FedGenExtension

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- the feature / head split of every registered model ------------------------------


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("channels", [1, 3])
def test_head_of_features_is_exactly_the_forward_of_every_model(name: str, channels: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, 10, channels, (0.4,) * channels, (0.3,) * channels).eval()
    x = torch.rand(3, channels, 8, 8)
    with torch.no_grad():
        feats = model.features(x)
        assert feats.shape == (3, model.feature_dim)
        assert torch.equal(model.head(feats), model(x))
    head = model_head(model)
    assert head is model.head is model.classifier and isinstance(head, nn.Linear)
    assert head.in_features == model.feature_dim and head.out_features == 10
    assert set(model.state_dict()) == {f"net.{k}" for k in model.net.state_dict()} | {"normalize.mean", "normalize.std"}


def test_model_head_rejects_a_model_without_the_split() -> None:
    with pytest.raises(ValueError, match="features\\(x\\) / head split"):
        model_head(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)))


# ---- label weights, label distribution, diversity ------------------------------------


def test_label_weights_split_each_label_among_the_clients_that_hold_it() -> None:
    counts = torch.tensor([[3.0, 0.0, 1.0, 0.0], [1.0, 5.0, 1.0, 0.0]])  # 2 clients, 4 labels
    w = label_weights(counts)
    expected = torch.tensor([[0.75, 0.25], [0.0, 1.0], [0.5, 0.5], [0.5, 0.5]])  # label 3: nobody -> equal
    assert torch.allclose(w, expected)
    with pytest.raises(ValueError, match="finite non-negative"):
        label_weights(torch.tensor([[1.0, -1.0]]))


def test_label_distribution_prior_uniform_and_qualified_labels() -> None:
    counts = torch.tensor([[6.0, 1.0, 0.0, 2.0], [2.0, 1.0, 0.0, 0.0]])
    prior = label_distribution(counts, "prior", min_label_count=1)  # label 1: at most 1 per client -> not generated
    assert torch.allclose(prior, torch.tensor([0.8, 0.0, 0.0, 0.2]))
    uniform = label_distribution(counts, "uniform", min_label_count=1)
    assert torch.allclose(uniform, torch.tensor([0.5, 0.0, 0.0, 0.5]))
    assert torch.allclose(label_distribution(counts, "prior", min_label_count=0), torch.tensor([8.0, 2.0, 0.0, 2.0]) / 12)
    with pytest.raises(ValueError, match="no labelled examples"):
        label_distribution(torch.zeros(2, 3))


def test_diversity_loss_is_lower_for_diverse_features() -> None:
    z = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    collapsed = torch.ones(16, 8)
    diverse = torch.randn(16, 8, generator=torch.Generator().manual_seed(1)) * 3
    assert float(diversity_loss(z, collapsed)) == pytest.approx(1.0)
    assert float(diversity_loss(z, diverse)) < 0.5


# ---- server-side generator training -------------------------------------------------


def _heads(k: int = 4, d: int = 8, n: int = 3, seed: int = 0) -> list[nn.Linear]:
    torch.manual_seed(seed)
    return [nn.Linear(d, k) for _ in range(n)]


def test_generator_training_loss_decreases_and_leaves_the_heads_alone() -> None:
    heads = _heads()
    before = [copy.deepcopy(h.state_dict()) for h in heads]
    torch.manual_seed(1)
    gen = FeatureGenerator(4, 8, noise_dim=4, hidden_dim=32)
    counts = [[10, 5, 0, 3], [0, 5, 8, 3], [2, 2, 2, 2]]
    logs = train_feature_generator(gen, heads, counts, FedGenConfig(steps=150, batch_size=32, lr=1e-2), seed=0)
    assert logs["teacher_loss_last"] < 0.3 * logs["teacher_loss_first"], logs
    assert sum(logs["label_probs"]) == pytest.approx(1.0, abs=1e-5) and logs["label_probs"][0] == pytest.approx(12 / 42, abs=1e-5)
    for h, b in zip(heads, before):
        assert all(torch.equal(h.state_dict()[k], b[k]) for k in b) and h.weight.grad is None
    # the trained generator's features are classified as their label by the weighted heads
    with torch.no_grad():
        y = torch.arange(4).repeat(16)
        feats = gen(y, gen.noise(64, torch.Generator().manual_seed(5)))
        votes = sum(F.softmax(h(feats), 1) * label_weights(torch.tensor(counts, dtype=torch.float))[y][:, [c]] for c, h in enumerate(heads))
    assert float((votes.argmax(1) == y).float().mean()) > 0.9


def test_label_count_weighting_decides_whose_head_the_generator_follows() -> None:
    """Client A's head and client B's disagree on every label (B = A shifted by one class).
    The generator follows, for each label, the client that holds that label's examples."""
    torch.manual_seed(0)
    head_a = nn.Linear(8, 4)
    head_b = nn.Linear(8, 4)
    with torch.no_grad():
        head_b.weight.copy_(head_a.weight.roll(1, dims=0))  # B predicts (c + 1) % 4 where A predicts c
        head_b.bias.copy_(head_a.bias.roll(1, dims=0))
    counts_ab = [[20, 20, 0, 0], [0, 0, 20, 20]]  # A holds labels 0, 1; B holds 2, 3

    def agreement(counts):
        torch.manual_seed(1)
        gen = FeatureGenerator(4, 8, noise_dim=4, hidden_dim=32)
        train_feature_generator(gen, [head_a, head_b], counts, FedGenConfig(steps=200, batch_size=32, lr=1e-2, diversity_weight=0.1), seed=0)
        y = torch.arange(4).repeat(32)
        with torch.no_grad():
            feats = gen(y, gen.noise(len(y), torch.Generator().manual_seed(3)))
            pa, pb = head_a(feats).argmax(1), head_b(feats).argmax(1)
        low = y < 2
        return float((pa[low] == y[low]).float().mean()), float((pb[~low] == y[~low]).float().mean()), float((pb[low] == y[low]).float().mean())

    a_on_low, b_on_high, b_on_low = agreement(counts_ab)
    assert a_on_low > 0.9 and b_on_high > 0.9  # each label follows its holder's head
    assert b_on_low < 0.2  # ... not the other client's
    _, _, b_on_low_swapped = agreement([[0, 0, 20, 20], [20, 20, 0, 0]])
    assert b_on_low_swapped > 0.9  # swap the counts and labels 0, 1 follow B


# ---- payload checks ----------------------------------------------------------------


def _fedgen_cfg(*extra: str) -> dict:
    return compose_config(["strategy=fedgen", "experiment=tiny", "simulation.local_epochs=1", *extra])


def _generator_state(cfg: dict) -> dict[str, torch.Tensor]:
    return build_feature_generator(cfg, build_bundle(cfg), fedgen_settings(cfg)).state_dict()


def _content(state: dict[str, torch.Tensor] | ArrayRecord | None) -> RecordDict:
    records = {"arrays": ArrayRecord(), "config": ConfigRecord()}
    if state is not None:
        records[GENERATOR_RECORD_KEY] = state if isinstance(state, ArrayRecord) else ArrayRecord(state)
    return RecordDict(records)


def test_a_well_formed_generator_gives_the_client_a_regularizer() -> None:
    cfg = _fedgen_cfg()
    assert regularizer_from_content(_content(None), cfg, 1, 0) is None
    reg = regularizer_from_content(_content(_generator_state(cfg)), cfg, 2, 0)
    assert isinstance(reg, FedGenRegularizer) and reg.alpha == 1.0
    reg5 = regularizer_from_content(_content(_generator_state(cfg)), cfg, 5, 0)
    assert reg5.alpha == pytest.approx(0.98**3)  # decayed from round 2 on


def _corrupt(state, how):
    state = {k: v.clone() for k, v in state.items()}
    key = "out.weight"
    if how == "shape":
        state[key] = torch.zeros(3, 3)
    elif how == "missing":
        del state[key]
    elif how == "extra":
        state["trojan.weight"] = torch.zeros(2)
    elif how == "nan":
        state[key][0, 0] = float("nan")
    elif how == "dtype":
        state[key] = state[key].double()
    elif how == "probs":
        state["label_probs"] = torch.full_like(state["label_probs"], 0.5)
    return state


@pytest.mark.parametrize(
    "how, message",
    [
        ("shape", "'out.weight' has shape (3, 3)"),
        ("missing", "keys differ (unexpected [], missing ['out.weight'])"),
        ("extra", "keys differ (unexpected ['trojan.weight']"),
        ("nan", "'out.weight' has non-finite values"),
        ("dtype", "'out.weight' has dtype torch.float64"),
        ("probs", "label_probs must be non-negative and sum to 1"),
    ],
)
def test_a_malformed_generator_payload_is_rejected_with_a_clear_error(how: str, message: str) -> None:
    cfg = _fedgen_cfg()
    bad = _corrupt(_generator_state(cfg), how)
    with pytest.raises(GeneratorPayloadError, match="FedGen generator payload") as err:
        regularizer_from_content(_content(bad), cfg, 2, 0)
    assert message in str(err.value)


def test_a_generator_sent_to_a_run_that_is_not_fedgen_is_rejected() -> None:
    fedgen_cfg = _fedgen_cfg()
    other = compose_config(["strategy=fedftg", "experiment=tiny"])
    with pytest.raises(ValueError, match="a FedGen generator was sent, but the strategy is 'fedftg'"):
        regularizer_from_content(_content(_generator_state(fedgen_cfg)), other, 2, 0)


def test_check_generator_state_accepts_its_own_state() -> None:
    gen = FeatureGenerator(10, 32)
    check_generator_state(gen, gen.state_dict())


# ---- the client trains with the regulariser ------------------------------------------


def test_a_clients_local_training_uses_the_generator() -> None:
    cfg = _fedgen_cfg()
    bundle = build_bundle(cfg)
    global_state = build_named_model(cfg, bundle, "client").state_dict()
    torch.manual_seed(3)
    gen = build_feature_generator(cfg, bundle, fedgen_settings(cfg))
    # a generator whose features the current head already classifies: the regulariser term
    # is then informative; any generator would do for "differs"
    settings = FedGenConfig(steps=30, batch_size=32, lr=1e-2)
    model0 = build_named_model(cfg, bundle, "client")
    train_feature_generator(gen, [model0.head], [[10] * 10], settings, seed=0)
    plain = client_update(cfg, 1, 2, global_state)
    reg = regularizer_from_content(_content(gen.state_dict()), cfg, 2, 1)
    regularised = client_update(cfg, 1, 2, global_state, regularizer=reg)
    assert reg.calls > 0 and np.isfinite(reg.last_loss)
    diff = max(float((plain.model.state_dict()[k] - regularised.model.state_dict()[k]).abs().max()) for k in global_state)
    assert diff > 1e-4
    # the regularised head classifies generated features better than the plain one
    y = torch.arange(10).repeat(20)
    with torch.no_grad():
        feats = gen.eval()(y, gen.noise(len(y), torch.Generator().manual_seed(9)))
        ce_plain = float(F.cross_entropy(plain.model.head(feats), y))
        ce_reg = float(F.cross_entropy(regularised.model.head(feats), y))
    assert ce_reg < ce_plain
    # the same call twice is deterministic
    again = client_update(cfg, 1, 2, global_state, regularizer=regularizer_from_content(_content(gen.state_dict()), cfg, 2, 1))
    assert all(torch.equal(again.model.state_dict()[k], regularised.model.state_dict()[k]) for k in global_state)


def test_the_reference_kl_term_runs_when_beta_is_positive() -> None:
    torch.manual_seed(0)
    model = build_model("cnn_small", 10, 1, (0.3,), (0.4,))
    gen = FeatureGenerator(10, model.feature_dim, noise_dim=4, hidden_dim=16).eval()
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    only_ce = FedGenRegularizer(gen, alpha=1.0, beta=0.0, seed=0)(model, x, y, model(x))
    with_kl = FedGenRegularizer(gen, alpha=1.0, beta=1.0, seed=0)(model, x, y, model(x))
    assert float(with_kl.detach()) > float(only_ce.detach()) > 0
    assert FedGenRegularizer(gen, alpha=0.0, beta=0.0)(model, x, y, model(x)) is None


# ---- the server side in DataFreeKD (Flower records) -------------------------------------


class _Grid:
    def get_node_ids(self):
        return [11, 12, 13]


def _reply(node: int, model: nn.Module, counts: list[int] | None, n: int | None = None) -> Message:
    instruction = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type="train")
    metrics = {"num-examples": n if n is not None else sum(counts or [1]), "partition-id": node, "malicious": 0}
    if counts is not None:
        metrics["label-counts"] = counts
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord(metrics)}), reply_to=instruction)


def test_the_server_trains_the_generator_and_sends_it_from_round_two(server_task_identity) -> None:
    def model(seed=0):
        torch.manual_seed(seed)
        return build_model("cnn_small", 10, 1, (0.3,), (0.4,))

    torch.manual_seed(0)
    ext = FedGenExtension(FeatureGenerator(10, model().feature_dim, 8, 32), FedGenConfig(steps=5, batch_size=16))
    seen = []
    arms_seen = []

    def distill_fn(arm, teachers, student, rnd):
        arms_seen.append(arm)
        from abd_fl.distill import DistillResult

        return DistillResult(0.0, 0.0)

    strategy = DataFreeKD(FedAvg(fraction_evaluate=0.0), model, model, distill_fn, mode="multi_round", on_round=seen.append, extension=ext)
    arrays = ArrayRecord(model().state_dict())
    round1 = list(strategy.configure_train(1, arrays, ConfigRecord(), _Grid()))
    assert len(round1) == 3 and all(GENERATOR_RECORD_KEY not in m.content.array_records for m in round1)

    counts = [[30, 0, 5, 0, 0, 0, 0, 0, 0, 5], [0, 20, 0, 0, 0, 0, 0, 0, 0, 0], [1] * 10]
    replies = [_reply(11 + i, model(i + 1), c) for i, c in enumerate(counts)]
    replies.append(_reply(14, model(9), None, n=10))  # no label counts: FedGen cannot use it
    replies.append(_reply(15, model(9), [1] * 9, n=9))  # wrong length
    replies.append(_reply(16, model(9), [5] * 10, n=7))  # does not add up
    agg, metrics = strategy.aggregate_train(1, replies)
    assert agg is not None and metrics["num-rejected"] == 3
    outcome = seen[0]
    reasons = dict(outcome.rejected)
    assert "needs the client's 'label-counts'" in reasons[14] and "list of 10 counts" in reasons[15] and "num-examples is 7" in reasons[16]
    assert [i["label_counts"] for i in outcome.teacher_info] == counts
    assert outcome.extension["steps"] == 5 and outcome.extension["label_probs"][0] == pytest.approx(31 / 64, abs=1e-5)  # labels 3-8: at most 1 per client, not generated
    assert "fedgen_s" in outcome.timings

    round2 = list(strategy.configure_train(2, agg, ConfigRecord(), _Grid()))
    assert len(round2) == 3
    for msg in round2:
        assert set(msg.content.array_records) == {"arrays", GENERATOR_RECORD_KEY}
        sent = msg.content.array_records[GENERATOR_RECORD_KEY].to_torch_state_dict()
        expected = ext.generator.state_dict()
        assert all(torch.equal(sent[k], expected[k].cpu()) for k in expected)
        assert state_signature(model()) == {
            k: (tuple(v.shape), np.dtype(str(v.dtype).replace("torch.", "")))
            for k, v in msg.content["arrays"].to_torch_state_dict().items()
        }


def test_a_reply_with_a_second_array_record_is_still_rejected_under_fedgen(server_task_identity) -> None:
    torch.manual_seed(0)
    m = build_model("cnn_small", 10, 1, (0.3,), (0.4,))
    ext = FedGenExtension(FeatureGenerator(10, m.feature_dim, 8, 32), FedGenConfig(steps=1, batch_size=4))
    strategy = DataFreeKD(FedAvg(fraction_evaluate=0.0), lambda: m, lambda: m, lambda *a: None, mode="multi_round", extension=ext)
    msg = _reply(11, m, [1] * 10)
    msg.content["echo"] = ArrayRecord({"x": Array(np.zeros(2, np.float32))})
    assert strategy.aggregate_train(1, [msg]) == (None, None)
