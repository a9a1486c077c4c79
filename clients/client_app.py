"""The Flower ClientApp: local training of benign and malicious clients.

The server sends the resolved experiment config (JSON, key ``abd-config`` of the train
ConfigRecord) with the global arrays. A client loads its partition by ``partition-id``
(from the node config), poisons it when its id is in the malicious set derived from the
config and seed, trains locally, and replies with one ArrayRecord (its model) and one
MetricRecord: ``num-examples``, ``partition-id``, ``malicious`` (ground truth, used only
to score detection), ``label-counts`` (for FedGen), ``train-loss``, ``train-acc``.
"""

from __future__ import annotations

import json

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from abd_fl.device import resolve_device
from abd_fl.experiment import build_bundle, build_named_model, client_train_data
from abd_fl.train import train_classifier

CONFIG_KEY = "abd-config"

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received model on this client's (possibly poisoned) partition."""
    cfg = json.loads(str(msg.content["config"][CONFIG_KEY]))
    partition_id = int(context.node_config["partition-id"])
    torch.set_num_threads(max(1, int(cfg["simulation"]["client_resources"]["num_cpus"])))
    data, is_malicious = client_train_data(cfg, partition_id)
    bundle = build_bundle(cfg)
    model = build_named_model(cfg, bundle, "client")
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    sim = cfg["simulation"]
    stats = train_classifier(
        model,
        data,
        epochs=int(sim["local_epochs"]),
        lr=float(sim["local_lr"]),
        batch_size=int(sim["local_batch_size"]),
        device=resolve_device(str(cfg.get("device", "auto"))),
        seed=int(cfg["seed"]) * 1000 + partition_id,
    )
    counts = torch.bincount(data.labels, minlength=bundle.num_classes).tolist()
    metrics = MetricRecord(
        {
            "num-examples": len(data),
            "partition-id": partition_id,
            "malicious": int(is_malicious),
            "label-counts": [int(c) for c in counts],
            "train-loss": float(stats["loss"]),
            "train-acc": float(stats["accuracy"]),
        }
    )
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
    return Message(content=content, reply_to=msg)
