"""FedGen's Flower glue: a :class:`~strategies.datafree_kd.ServerExtension` for ``DataFreeKD``.

The algorithm itself (generator, its training, the clients' regulariser) is torch-only
code in :mod:`abd_fl.distill.fedgen`. Here, per round:

- ``configure_train``: from round 2 on, every train message carries the generator's state
  as a second ArrayRecord, ``fedgen-generator``, beside the global model's ``arrays``
  (Flower 1.42 messages hold any number of named records; the base strategy's
  ``arrays`` / ``config`` stay as they are). Its ``label_probs`` buffer is the label
  distribution the clients sample from.
- ``reply_problem``: a reply must still carry exactly one ArrayRecord and one MetricRecord
  (the base strategies aggregate "the" ArrayRecord of a reply), so the clients' label
  counts travel in the MetricRecord as ``label-counts``: a list of ``num_classes``
  non-negative integers summing to ``num-examples`` (when sent); a reply without them is rejected.
- ``reply_info``: whether a client trained with the regulariser (``fedgen-reg-loss`` in its
  MetricRecord), for ``teacher_info`` in ``metrics.jsonl``.
- ``after_aggregate``: the generator is trained against the valid clients' heads with
  their label counts (generator and Adam state carry over rounds).

The global model is the base aggregate (FedAvg in the preset); the ServerApp's
``distill_fn`` leaves the undefended arm as it is and repairs a defended arm by the data-free
distillation with its defense (README, "How ABD attaches to FedGen").
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from flwr.app import ArrayRecord, Message
from torch import nn

from abd_fl.distill.fedgen import GENERATOR_RECORD_KEY, FedGenConfig, FeatureGenerator, model_head, train_feature_generator

log = logging.getLogger("abd_fl")

LABEL_COUNTS_KEY = "label-counts"


class FedGenExtension:
    """FedGen on the server (see the module doc)."""

    name = "fedgen"

    def __init__(self, generator: FeatureGenerator, settings: FedGenConfig, device: torch.device | str = "cpu", seed: int = 0) -> None:
        self.generator = generator.to(device)
        self.settings = settings
        self.device = torch.device(device)
        self.seed = int(seed)
        self.optimizer = torch.optim.Adam(self.generator.parameters(), lr=settings.lr)
        self.trained = False

    def state_dict(self) -> dict:
        """What a resumed run needs: the generator, its optimiser, whether it was trained."""
        return {"generator": self.generator.state_dict(), "optimizer": self.optimizer.state_dict(), "trained": self.trained}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output (``resume``)."""
        self.generator.load_state_dict(state["generator"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.trained = bool(state["trained"])

    def generator_record(self) -> ArrayRecord:
        """The generator's state as an ArrayRecord (CPU tensors)."""
        return ArrayRecord({k: v.detach().cpu() for k, v in self.generator.state_dict().items()})

    def configure_train(self, server_round: int, messages: list[Message]) -> list[Message]:
        if not self.trained:  # round 1 (or no valid reply yet): nothing to regularise with
            return messages
        record = self.generator_record()
        for msg in messages:
            msg.content[GENERATOR_RECORD_KEY] = record
        return messages

    def reply_problem(self, msg: Message) -> str | None:
        metrics = next(iter(msg.content.metric_records.values()))
        if LABEL_COUNTS_KEY not in metrics:
            return f"FedGen needs the client's '{LABEL_COUNTS_KEY}' in its MetricRecord"
        counts = metrics[LABEL_COUNTS_KEY]
        k = self.generator.num_classes
        if not isinstance(counts, list) or len(counts) != k:
            return f"'{LABEL_COUNTS_KEY}' must be a list of {k} counts, got {counts!r:.80}"
        if any(isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c < 0 or c != int(c) for c in counts):
            return f"'{LABEL_COUNTS_KEY}' must hold non-negative integers, got {counts!r:.80}"
        if "num-examples" in metrics and sum(counts) != metrics["num-examples"]:
            return f"'{LABEL_COUNTS_KEY}' sum to {sum(counts)}, but num-examples is {metrics['num-examples']}"
        return None

    def reply_info(self, msg: Message) -> dict[str, Any]:
        metrics = next(iter(msg.content.metric_records.values()))
        used = "fedgen-reg-loss" in metrics
        return {"fedgen_regularized": used, **({"fedgen_reg_loss": float(metrics["fedgen-reg-loss"])} if used else {})}

    def after_aggregate(
        self, server_round: int, teachers: list[nn.Module], teacher_info: list[dict[str, Any]], aggregated: nn.Module | None
    ) -> dict[str, Any]:
        heads = [model_head(t) for t in teachers]
        counts = [info["label_counts"] for info in teacher_info]
        logs = train_feature_generator(
            self.generator,
            heads,
            counts,
            self.settings,
            optimizer=self.optimizer,
            seed=self.seed * 1000 + server_round,
            device=self.device,
        )
        self.trained = True
        log.info(
            "round %d: FedGen generator trained (%d steps): teacher loss %.3f -> %.3f",
            server_round,
            logs["steps"],
            logs["teacher_loss_first"] if logs["teacher_loss_first"] is not None else math.nan,
            logs["teacher_loss_last"] if logs["teacher_loss_last"] is not None else math.nan,
        )
        return logs
