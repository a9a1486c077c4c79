"""abd-quickstart's ClientApp: a stock one. It trains the global model on its partition and
replies with one ArrayRecord and a MetricRecord carrying only ``num-examples`` and
``train-loss``, as Flower's quickstart apps do: nothing abd-fl-specific goes back to the
server. Partitions ``0 .. num-malicious - 1`` are attackers that poison their data."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from abd_quickstart.task import Net, load_partition
from abd_quickstart.task import train as train_model

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = context.run_config
    partition_id = int(context.node_config["partition-id"])
    attacker = partition_id < int(cfg["num-malicious"])
    data = load_partition(
        partition_id,
        int(context.node_config["num-partitions"]),
        seed=int(cfg["seed"]),
        poison_rate=float(cfg["poison-rate"]) if attacker else 0.0,
    )
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    seed = int(cfg["seed"]) * 1000 + partition_id
    loss = train_model(model, data, epochs=int(cfg["local-epochs"]), lr=float(cfg["learning-rate"]), seed=seed)
    metrics = MetricRecord({"train-loss": loss, "num-examples": len(data)})
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)
