"""End-to-end: the example Flower App ``examples/abd-quickstart`` (a stock ClientApp, a
ServerApp that wraps FedAvg in DataFreeKD with ABD) completes a tiny 2-round run through
the real ``flwr run``, as the README types it, and the test stops everything it started by
pid: the local SuperLink that ``flwr run`` launches, its SuperExec, the simulation and Ray
(:func:`tests.process_cleanup.make_flwr_sandbox`: its own ``FLWR_HOME``, free ports, the
venv's bin on PATH, no runtime dependency installation).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from tests.process_cleanup import FlwrSandbox, describe, flwr_log_tail, make_flwr_sandbox

REPO_ROOT = Path(__file__).resolve().parents[1]
APP = REPO_ROOT / "examples" / "abd-quickstart"
NUM_SUPERNODES = 3
ROUNDS = 2
RUN_TIMEOUT_S = 400  # the whole `flwr run --stream`
CMD_TIMEOUT_S = 60  # `flwr ls`


@pytest.fixture
def flwr_sandbox(tmp_path: Path):
    # one intra-op thread per process: the ServerApp's distillation shares 2 cores with Ray
    with make_flwr_sandbox(tmp_path, extra_env={"OMP_NUM_THREADS": "1"}) as sandbox:
        yield sandbox


def test_example_app_runs_through_flwr_run(flwr_sandbox: FlwrSandbox) -> None:
    sandbox = flwr_sandbox
    result_file = sandbox.output_dir / "result.json"
    run_config = " ".join(
        [
            f"num-server-rounds={ROUNDS}",
            "local-epochs=1",
            "num-malicious=1",
            "defense='abd'",
            "compare-baseline=true",
            "distill-iterations=4",
            "distill-student-steps=1",
            "distill-batch-size=32",
            f"result-file='{result_file}'",  # absolute: the ServerApp's cwd is the SuperExec's
        ]
    )
    t0 = time.monotonic()
    rc = sandbox.run_flwr(
        [
            "run",
            str(APP),
            "--stream",
            "--federation-config",
            f"num-supernodes={NUM_SUPERNODES} client-resources-num-cpus=1",
            "--run-config",
            run_config,
        ],
        sandbox.log_path,
        RUN_TIMEOUT_S,
        cwd=REPO_ROOT,
    )
    elapsed = time.monotonic() - t0
    log = sandbox.log_path.read_text(errors="replace")
    print(f"\n`flwr run {APP.relative_to(REPO_ROOT)}` took {elapsed:.1f}s (log: {sandbox.log_path})")
    assert rc == 0, f"`flwr run` exited with {rc}; log tail:\n{flwr_log_tail(log)}"
    assert "Unable to launch" not in log, flwr_log_tail(log)  # flower-superlink found on PATH

    match = re.search(r"Successfully started run (\d+)", log)
    assert match, f"no run id in the `flwr run` output:\n{flwr_log_tail(log)}"
    run_id = match.group(1)
    assert f"({NUM_SUPERNODES} simulated SuperNodes)" in log, flwr_log_tail(log)

    # finished successfully (`flwr run --stream` exits 0 even for a failed run)
    ls_log = sandbox.log_path.with_name("flwr-ls.log")
    rc = sandbox.run_flwr(["ls", "--run-id", run_id, "--format", "json"], ls_log, CMD_TIMEOUT_S, cwd=REPO_ROOT)
    ls_out = ls_log.read_text(errors="replace")
    assert rc == 0, f"`flwr ls` exited with {rc}:\n{ls_out}"
    runs = json.loads(ls_out[ls_out.index("{") :])["runs"]
    assert [r["status"] for r in runs] == ["finished:completed"], f"run {run_id}: {runs}\n{flwr_log_tail(log)}"

    # the ServerApp's last line and its result file: every round distilled both arms
    assert f"abd-quickstart: {ROUNDS} rounds done; global model acc" in log, flwr_log_tail(log)
    assert result_file.is_file(), f"no {result_file}; log tail:\n{flwr_log_tail(log)}"
    result = json.loads(result_file.read_text())
    assert result["rounds"] == ROUNDS and result["defense"] == "abd"
    assert sorted(result["students_by_round"]) == [str(r) for r in range(1, ROUNDS + 1)]
    for arms in result["students_by_round"].values():
        assert sorted(arms) == ["abd_student", "dfkd_student"]
        for m in arms.values():
            assert set(m) == {"acc", "asr", "asr_floor"} and all(0.0 <= v <= 1.0 for v in m.values())
    # the global model is ABD's student, evaluated by the ServerApp's evaluate_fn (round 0 = initial)
    assert sorted(result["evaluate_by_round"]) == [str(r) for r in range(ROUNDS + 1)]
    assert result["evaluate_by_round"][str(ROUNDS)] == result["global_model"] == result["students_by_round"][str(ROUNDS)]["abd_student"]
    # the stock ClientApp's replies (num-examples, train-loss) were all accepted
    for metrics in result["train_metrics_by_round"].values():
        assert metrics["num-rejected"] == 0 and metrics["train-loss"] > 0

    # The local SuperLink outlives the run: it is ours, and stopping it stops everything.
    ours = sandbox.scope.processes()
    names = " ".join(" ".join(p.cmdline()) for p in ours)
    assert "flower-superlink" in names and str(sandbox.home) in names, describe(ours)
    survivors = sandbox.scope.stop()
    assert not survivors, f"processes left running after cleanup:\n{describe(survivors)}"
