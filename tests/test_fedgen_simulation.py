"""End to end: `strategy=fedgen` in a 2-round, 3-client Ray simulation (``abd-fl``, tiny
budgets, defense=abd): the server trains the generator every round, the clients of round
2 train with it, and the run writes its summary with Acc/ASR."""

from __future__ import annotations

import json
from pathlib import Path

from tests.process_cleanup import run_simulation_cli


def test_fedgen_two_round_three_client_ray_simulation(tmp_path: Path) -> None:
    out = tmp_path / "outputs"
    overrides = [
        "experiment=tiny",
        "strategy=fedgen",
        "strategy.fedgen.steps=20",
        "simulation.rounds=2",
        "simulation.num_clients=3",
        "attack.num_malicious=1",
        "clean_kd_reference.enabled=false",
    ]
    run = run_simulation_cli(overrides, out)
    rounds = [r for r in (json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()) if "round" in r]
    assert [r["round"] for r in rounds] == [1, 2]
    for rec in rounds:
        assert rec["rejected"] == [] and len(rec["teacher_info"]) == 3
        gen = rec["fedgen"]
        assert gen["steps"] == 20 and abs(sum(gen["label_probs"]) - 1.0) < 1e-4
        assert all(len(i["label_counts"]) == 10 and sum(i["label_counts"]) == i["num_examples"] for i in rec["teacher_info"])
        # the undefended arm is FedGen's global model, the FedAvg aggregate itself
        assert rec["dfkd_student"] == rec["fedavg"]
        assert rec["distill"]["dfkd_student"]["defense"] == {"fedgen": "FedAvg aggregate, not distilled"}
        assert rec["distill"]["abd_student"]["history"]  # the defended arm repaired it with ABD attached
    # round 1: no generator yet; round 2: every client trained with it
    assert [i["fedgen_regularized"] for i in rounds[0]["teacher_info"]] == [False] * 3
    assert [i["fedgen_regularized"] for i in rounds[1]["teacher_info"]] == [True] * 3
    assert all(i["fedgen_reg_loss"] > 0 for i in rounds[1]["teacher_info"])

    summary = json.loads((run / "summary.json").read_text())
    for role in ("malicious_teacher", "benign_teachers", "ensemble", "fedavg", "dfkd_student", "abd_student"):
        assert set(summary[role]) == {"acc", "asr", "asr_floor"}
        assert all(0.0 <= v <= 1.0 for v in summary[role].values())
    cfg_text = (run / "config.yaml").read_text()
    assert "name: fedgen" in cfg_text and "data-free KD student" in (run / "results.md").read_text()
