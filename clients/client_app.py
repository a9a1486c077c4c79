"""The Flower ClientApp: local training of benign and malicious clients.

The server sends the resolved experiment config (JSON, key ``abd-config`` of the train
ConfigRecord) and the round (``server-round``) with the global arrays. A client loads its
partition by ``partition-id`` (from the node config) and does its round's work
(:func:`abd_fl.experiment.client_update`): when the attack schedule says it attacks in
this round it trains on poisoned data (or sends a pretrained teacher from
``attack.teacher_checkpoints``) and scales its update; otherwise it trains on clean data.
It replies with one ArrayRecord (its model) and one MetricRecord: ``num-examples``,
``partition-id``, ``malicious`` (1 if it attacked in this round: ground truth, used only
to score detection), ``label-counts`` (for FedGen), ``train-loss``,
``train-acc``.
"""

from __future__ import annotations

import json

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from abd_fl.device import resolve_device
from abd_fl.experiment import build_bundle, client_update

CONFIG_KEY = "abd-config"

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """This round's local work on this client's partition (see the module doc)."""
    config = msg.content["config"]
    cfg = json.loads(str(config[CONFIG_KEY]))
    server_round = int(config.get("server-round", 1))
    partition_id = int(context.node_config["partition-id"])
    torch.set_num_threads(max(1, int(cfg["simulation"]["client_resources"]["num_cpus"])))
    bundle = build_bundle(cfg)
    update = client_update(
        cfg,
        partition_id,
        server_round,
        msg.content["arrays"].to_torch_state_dict(),
        device=resolve_device(str(cfg.get("device", "auto"))),
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
        }
    )
    content = RecordDict({"arrays": ArrayRecord(update.model.state_dict()), "metrics": metrics})
    return Message(content=content, reply_to=msg)
