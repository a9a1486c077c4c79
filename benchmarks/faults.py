"""Fault-injection table (issue 15, item 3): does a multi-round run survive broken and hostile clients?

    .venv/bin/python benchmarks/faults.py                       # every case, seed 0
    .venv/bin/python benchmarks/faults.py --cases nan raise_half -- experiment=tiny   # a smoke run
    .venv/bin/python benchmarks/faults.py --report              # the table from finished runs only

Each case is one real ``abd-fl`` run (Flower + Ray) of the FL default scenario in multi-round
mode (``ROUNDS`` rounds of half the local epochs and distillation iterations each, as
``benchmarks/table3.py``'s multi-round presets; defense off, so what is measured is the
server's handling, not ABD), with the fault injected by the clients (``fault.*``,
``clients/faults.py``) or the attack's scaling. Per case: the rounds completed, the replies
rejected, update flags, whether the final global model is finite and sane (Acc above chance),
and the student's Acc / ASR / floor. Finished runs are read back (``--rerun`` runs them
again); every finished run's records go to the tracked ``benchmarks/results/faults/`` (not
with extra overrides), and ``results.md`` is rewritten after every run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweep import ROOT, RunFailed, run_command, run_one  # noqa: E402

ROUNDS = 2
BASE = ["strategy.mode=multi_round", f"simulation.rounds={ROUNDS}", "simulation.local_epochs=15",
        "distill.iterations=250", "defense=none", "clean_kd_reference.enabled=false"]
ONE = "fault.partition_ids=[0]"
CASES: dict[str, list[str]] = {
    "none": [],
    "nan": ["fault.kind=nan", ONE],
    "inf": ["fault.kind=inf", ONE],
    "wrong_shape": ["fault.kind=wrong_shape", ONE],
    "wrong_dtype": ["fault.kind=wrong_dtype", ONE],
    "missing_array": ["fault.kind=missing_array", ONE],
    "extra_array": ["fault.kind=extra_array", ONE],
    "two_arrayrecords": ["fault.kind=two_arrayrecords", ONE],
    "huge_norm": ["fault.kind=huge_norm", ONE],
    "huge_norm_reject": ["fault.kind=huge_norm", ONE, "strategy.update_check.action=reject"],
    "raise_one": ["fault.kind=raise", ONE],
    "raise_half": ["fault.kind=raise", "fault.fraction=0.5"],
    "scaled_x5": ["attack.scale=5"],
    "scaled_x5_median": ["attack.scale=5", "distill.ensemble=median_probs"],
    "scaled_x5_clip": ["attack.scale=5", "strategy.update_check.action=clip"],
    # what clip costs honest clients, and whether it bounds a huge update (the update_check default)
    "none_clip": ["strategy.update_check.action=clip"],
    "huge_norm_clip": ["fault.kind=huge_norm", ONE, "strategy.update_check.action=clip"],
    "scaled_x5_mean_probs": ["attack.scale=5", "distill.ensemble=mean_probs"],
}
DEFAULT_ARCHIVE = ROOT / "benchmarks" / "results" / "faults"


def row(case: str, summary: dict) -> str:
    records = [json.loads(x) for x in (Path(summary["_dir"]) / "latest" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rounds = [r for r in records if "round" in r]
    rejected = sum(len(r.get("rejected", [])) for r in rounds)
    flags = sum(len(r.get("update_flags", [])) for r in rounds)
    s = summary.get("dfkd_student", {})
    values = [s.get(k) for k in ("acc", "asr", "asr_floor")]
    finite = all(v is not None and math.isfinite(v) for v in values)
    sane = finite and values[0] > 0.15  # above chance (10 classes) with a margin
    cells = [f"{100 * v:.1f}" if v is not None else "n/a" for v in values]
    return (f"| {case} | {len(rounds)}/{ROUNDS} | {rejected} | {flags} | {'yes' if finite else 'NO'} | "
            f"{'yes' if sane else 'NO'} | {' / '.join(cells)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rerun", action="store_true")
    parser.add_argument("--report", action="store_true", help="the table from finished runs; start none")
    parser.add_argument("--dry-run", action="store_true", help="print the abd-fl commands and exit")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run (after --)")
    args = parser.parse_args()
    out = ROOT / "outputs" / "sweeps" / "faults"
    archive = None if args.overrides else DEFAULT_ARCHIVE
    if args.dry_run:
        for case in args.cases:
            print(" ".join(run_command(out, case, [*BASE, *CASES[case], *args.overrides], args.seed)[1:]))
        return
    out.mkdir(parents=True, exist_ok=True)
    lines = ["| case | rounds completed | replies rejected | update flags | global model finite | sane (Acc > 15%) "
             "| student Acc / ASR / floor % |", "|---|---|---:|---:|---|---|---|"]
    for case in args.cases:
        try:
            summary = run_one(out, case, [*BASE, *CASES[case], *args.overrides], args.seed, resume=not args.rerun,
                              report_only=args.report, archive=archive)
            lines.append(row(case, summary))
        except RunFailed as err:
            lines.append(f"| {case} | run failed or not run: {str(err).splitlines()[0][:120]} | | | | | |")
        (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
