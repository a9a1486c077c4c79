"""abd-quickstart's ServerApp: Flower's FedAvg, wrapped in abd-fl's DataFreeKD with ABD.

Each round FedAvg aggregates the client models as usual; DataFreeKD then distils the
client models (the teachers) into the global model on the server, without any data, and
ABD keeps a malicious client's backdoor from travelling through that distillation. The
global model's accuracy (Acc) and attack success rate (ASR) are measured on the server's
held-out digits after every round.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from abd_fl.metrics import backdoor_metrics
from abd_quickstart.task import IMAGE_SHAPE, TARGET, Net, eval_sets
from strategies.api import ZSKT, ZSKTParams, datafree_kd, defense_preset

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    num_rounds, seed = int(cfg["num-server-rounds"]), int(cfg["seed"])
    torch.manual_seed(seed)
    clean_test, triggered_test = eval_sets(seed)

    def measure(model: torch.nn.Module) -> dict[str, float]:
        return backdoor_metrics(model, clean_test, triggered_test, TARGET)  # acc, asr, asr_floor

    students: dict[int, dict[str, dict[str, float]]] = {}

    def on_round(outcome) -> None:  # every distilled student, e.g. the undefended one beside ABD's
        students[outcome.server_round] = {arm: measure(model) for arm, model in outcome.students.items()}
        for arm, m in students[outcome.server_round].items():
            print(f"round {outcome.server_round}: {arm:13s} acc {m['acc']:.3f}  asr {m['asr']:.3f}", flush=True)

    # FedAvg, as in any Flower app, wrapped: the server distils the clients' models with ABD
    batch = int(cfg["distill-batch-size"])
    strategy = datafree_kd(
        FedAvg(fraction_evaluate=0.0),  # evaluation happens on the server (evaluate_fn)
        Net,
        IMAGE_SHAPE,
        distill=ZSKT(  # the synthesizer and the KD budgets; every other value is the shipped default
            iterations=int(cfg["distill-iterations"]),
            student_steps=int(cfg["distill-student-steps"]),
            batch_size=batch,
            synthesizer_params=ZSKTParams(batch_size=batch),
        ),
        defense=defense_preset(str(cfg["defense"]), compare_baseline=bool(cfg["compare-baseline"])),
        seed=seed,
        on_round=on_round,
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(Net().state_dict()),
        num_rounds=num_rounds,
        evaluate_fn=lambda rnd, arrays: MetricRecord(measure(_load(arrays))),
    )

    final = measure(_load(result.arrays))
    print(f"abd-quickstart: {num_rounds} rounds done; global model acc {final['acc']:.3f} asr {final['asr']:.3f}", flush=True)
    if str(cfg["result-file"]):
        out = {
            "rounds": num_rounds,
            "defense": str(cfg["defense"]),
            "global_model": final,
            "students_by_round": students,
            "evaluate_by_round": {r: dict(m) for r, m in result.evaluate_metrics_serverapp.items()},
            "train_metrics_by_round": {r: dict(m) for r, m in result.train_metrics_clientapp.items()},
        }
        path = Path(str(cfg["result-file"]))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2))


def _load(arrays: ArrayRecord) -> Net:
    model = Net()
    model.load_state_dict(arrays.to_torch_state_dict())
    return model.eval()
