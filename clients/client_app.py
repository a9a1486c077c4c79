"""The Flower ClientApp: local training of benign and malicious clients.

The server sends the resolved experiment config (JSON, key ``abd-config`` of the train
ConfigRecord) and the round (``server-round``) with the global arrays. A client loads its
partition by ``partition-id`` (from the node config) and does its round's work
(:func:`abd_fl.local_update.client_update`): when the attack schedule says it attacks in
this round it trains on poisoned data (or sends a pretrained teacher from
``attack.teacher_checkpoints``) and scales its update; otherwise it trains on clean data.
It replies with one ArrayRecord (its model) and one MetricRecord: ``num-examples``,
``partition-id``, ``malicious`` (1 if it attacked in this round: ground truth, used only
to score detection), ``label-counts`` (for FedGen), ``train-loss``,
``train-acc``, ``train-s`` (the seconds of this round's local work, from the message's
arrival to the reply: what the server's ``replies_wait_s`` is compared with).

FedGen (``strategy=fedgen``): from round 2 on the train message also carries the server's
feature generator as a second ArrayRecord, ``fedgen-generator``; the client checks it
against the generator its config builds (keys, shapes, dtypes, finite values, label
distribution) and adds FedGen's regulariser to its local loss
(:func:`abd_fl.local_update.fedgen_regularizer`). A malformed generator, or one sent when the
strategy is not FedGen, stops this client's round with a ValueError that names the
problem (Flower returns it to the server as an error reply, which the server drops and
logs). The reply stays one ArrayRecord and one MetricRecord; it adds ``fedgen-reg-loss``
(the regulariser's last value) when the regulariser was used.
"""

from __future__ import annotations

import json
import time

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from abd_fl.device import resolve_device
from abd_fl.distill.fedgen import GENERATOR_RECORD_KEY, FedGenRegularizer, GeneratorPayloadError
from abd_fl.experiment import build_bundle
from abd_fl.local_update import client_update, fedgen_regularizer
from abd_fl.settings.faults import FaultSettings
from clients.faults import break_reply

CONFIG_KEY = "abd-config"

app = ClientApp()


def regularizer_from_content(content: RecordDict, cfg: dict, server_round: int, partition_id: int) -> FedGenRegularizer | None:
    """FedGen's regulariser from the train message's ``fedgen-generator`` record (None when
    there is none); raises a ValueError naming the problem for a malformed generator or a
    generator sent to a run whose strategy is not FedGen."""
    if GENERATOR_RECORD_KEY not in content.array_records:
        return None
    try:
        state = content.array_records[GENERATOR_RECORD_KEY].to_torch_state_dict()
    except Exception as err:  # an ArrayRecord that does not even convert to tensors
        raise GeneratorPayloadError(f"FedGen generator payload: cannot read it as a state dict ({err})") from None
    return fedgen_regularizer(cfg, state, server_round, partition_id)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """This round's local work on this client's partition (see the module doc)."""
    started = time.perf_counter()
    config = msg.content["config"]
    cfg = json.loads(str(config[CONFIG_KEY]))
    server_round = int(config.get("server-round", 1))
    partition_id = int(context.node_config["partition-id"])
    torch.set_num_threads(max(1, int(cfg["simulation"]["client_resources"]["num_cpus"])))
    fault = FaultSettings(**(cfg.get("fault") or {}))
    faulty = fault.faulty(partition_id, server_round, int(cfg["simulation"]["num_clients"]), int(cfg["seed"]))
    if faulty and fault.kind == "raise":
        raise RuntimeError(f"fault.kind=raise: client {partition_id} fails in round {server_round} (injected)")
    bundle = build_bundle(cfg)
    regularizer = regularizer_from_content(msg.content, cfg, server_round, partition_id)
    update = client_update(
        cfg,
        partition_id,
        server_round,
        msg.content["arrays"].to_torch_state_dict(),
        device=resolve_device(str(cfg.get("device", "auto"))),
        regularizer=regularizer,
    )
    counts = torch.bincount(update.data.labels, minlength=bundle.num_classes).tolist()
    metrics = MetricRecord(
        {
            "num-examples": len(update.data),
            "partition-id": partition_id,
            "malicious": int(update.malicious),
            "label-counts": [int(c) for c in counts],
            "train-loss": float(update.stats["loss"]),
            "train-acc": float(update.stats["accuracy"]),
            "train-s": time.perf_counter() - started,
        }
    )
    if regularizer is not None and regularizer.calls > 0:
        metrics["fedgen-reg-loss"] = float(regularizer.last_loss)
    content = RecordDict({"arrays": ArrayRecord(update.model.state_dict()), "metrics": metrics})
    if faulty:
        content = break_reply(content, fault.kind)
    return Message(content=content, reply_to=msg)
