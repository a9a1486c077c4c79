"""Table-3 sweep (issue 5; ABD paper Table 3): every data-free KD method, baseline and +ABD.

    .venv/bin/python benchmarks/table3.py --seeds 0 1 2                 # everything
    .venv/bin/python benchmarks/table3.py --part central --seeds 0      # centralized only
    .venv/bin/python benchmarks/table3.py --methods zskt ood -- experiment=tiny   # smoke test
    .venv/bin/python benchmarks/table3.py --part fl --seeds 0 1 2 --resume   # reuse finished runs
    .venv/bin/python benchmarks/table3.py --seeds 0 1 2 --report         # tables from finished runs only

Centralized (the paper's own setting, ``experiment=central``): one poisoned teacher
distilled by ZSKT, CMI, OOD patches and DENSE. Federated (the FL default scenario, Flower
+ Ray): the one-shot ZSKT default, and the strategy presets DENSE, FedFTG, FedDF and
FedGen (the multi-round presets: 2 rounds of 15 local epochs, half the distillation
iterations per round). Every run distils the undefended arm (``dfkd_student``) and the ABD arm
(``abd_student``) from the same teachers, beside the clean-KD reference.

Writes ``outputs/sweeps/table3/``: every run's directory, ``results.md`` (rewritten after
every run, so nothing computed is lost) and ``table3.png`` (Acc and ASR per method, floors
hatched). Every finished run's summary, metrics and resolved config are also copied to the
tracked ``benchmarks/results/table3/`` (``--archive``; runs with extra Hydra overrides are
not archived there), with the latest whole ``results.md``:
``--resume`` and ``--report`` read runs back from there too, so a fresh clone rebuilds the
table without rerunning anything.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweep import ROOT, RunFailed, fmt, run_one  # noqa: E402

CENTRAL = {
    "zskt": ["experiment=central", "distill=zskt"],
    "cmi": ["experiment=central", "distill=cmi"],
    "ood": ["experiment=central", "distill=ood"],
    "dense": ["experiment=central", "distill=dense"],
}
# Multi-round presets split a one-shot run's budgets over ROUNDS rounds: the local epochs
# and their synthesizer's iterations per round are those of the composed config divided
# by ROUNDS (default 30 -> 15 epochs; DENSE 150 -> 75, OOD patches 500 -> 250, FedGen's
# ZSKT repair 500 -> 250 iterations), so every FL method gets the same local training and
# the same total distillation budget. FedGen needs a second round for its generator to
# reach the clients (it is trained after round 1's aggregation and sent with round 2's model).
ROUNDS = 2
MULTI_ROUND = ("fedftg", "feddf", "fedgen")
FL = {
    "dense": ["strategy=dense"],
    "fedftg": ["strategy=fedftg"],
    "feddf": ["strategy=feddf"],
    "fedgen": ["strategy=fedgen"],
    "zskt_one_shot": [],  # the FL default scenario (also docs/results.md, results item 2)
}
PARTS = {"central": CENTRAL, "fl": FL}
DEFAULT_ARCHIVE = ROOT / "benchmarks" / "results" / "table3"


def run_overrides(part: str, method: str, user: list[str]) -> list[str]:
    """The Hydra overrides of one run: the method's, the user's, then (multi-round FL
    presets) the per-round budgets computed from the config those two compose to."""
    base = [*PARTS[part][method], *user]
    if part != "fl" or method not in MULTI_ROUND:
        return base
    from abd_fl.paths import compose_config

    cfg = compose_config(base)

    def per_round(n: int) -> int:
        return max(1, int(n) // ROUNDS)

    split = [f"simulation.rounds={ROUNDS}", f"simulation.local_epochs={per_round(cfg['simulation']['local_epochs'])}"]
    if method == "fedgen":
        iters = cfg["strategy"]["fedgen"].get("defense_iterations") or cfg["distill"]["iterations"]
        split.append(f"strategy.fedgen.defense_iterations={per_round(iters)}")
    else:
        split.append(f"distill.iterations={per_round(cfg['distill']['iterations'])}")
    return [*base, *split]


ROLES = (("dfkd_student", "baseline"), ("abd_student", "+ABD"), ("clean_kd_reference", "clean KD"))


def vaccine_report(run_dir: Path) -> dict | None:
    """What ABD's vaccine search found in a run (the last round of an FL run): per teacher
    whether a vaccine was accepted, and which teachers were malicious (FL; the centralized
    run has one poisoned teacher)."""
    report, malicious = None, None
    for line in (run_dir / "latest" / "metrics.jsonl").read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if "distill" in rec and "abd_student" in rec["distill"]:  # federated: one record per round
            report = rec["distill"]["abd_student"]["defense"]
            malicious = [bool(t["malicious"]) for t in rec["teacher_info"]]
        elif rec.get("role") == "abd_student":  # centralized
            report, malicious = rec.get("defense") or {}, [True]
    if report is None or not report.get("teachers"):
        return None
    found = [bool(t.get("found")) for t in report["teachers"]]
    return {"found": found, "malicious": malicious[: len(found)]}


def vaccine_cell(runs: list[dict]) -> str:
    """Per seed: vaccines found / teachers, and how many of those were malicious teachers."""
    parts = []
    for r in runs:
        v = r.get("_vaccines")
        if v is None:
            parts.append("n/a")
            continue
        hits = sum(f and m for f, m in zip(v["found"], v["malicious"]))
        parts.append(f"{sum(v['found'])}/{len(v['found'])} ({hits} mal.)")
    return ", ".join(parts)


def cell(runs: list[dict], role: str) -> str:
    ms = [r[role] for r in runs if role in r]
    if not ms:
        return "n/a"
    floor = sum(m["asr_floor"] for m in ms) / len(ms)
    return f"{fmt([m['acc'] for m in ms])} / {fmt([m['asr'] for m in ms])} (floor {100 * floor:.1f})"


def write_results(
    out: Path, results: dict[str, dict[str, list[dict]]], seeds: list[int], cmd: str, failures: list[str] | None = None
) -> str:
    lines = [
        f"<!-- produced by: {cmd} -->",
        f"### Table 3 on embedded digits ({len(seeds)} seed(s): {', '.join(map(str, seeds))}; "
        "Acc / ASR in %, mean (min-max); floor: mean share of clean non-target images predicted as the target)",
        "",
        "| setting | method | baseline | +ABD | clean KD | ABD target met | vaccines found per seed | wall s |",
        "|---|---|---|---|---|---|---|---:|",
    ]
    for part, methods in results.items():
        for method, runs in methods.items():
            if not runs:
                continue
            base = [r["dfkd_student"] for r in runs if "dfkd_student" in r]
            abd = [r["abd_student"] for r in runs if "abd_student" in r]
            verdict = "n/a"
            if base and abd:
                b_asr = sum(m["asr"] for m in base) / len(base)
                drop = sum(m["acc"] for m in base) / len(base) - sum(m["acc"] for m in abd) / len(abd)
                a_asr = sum(m["asr"] for m in abd) / len(abd)
                verdict = "baseline ASR < 50%" if b_asr < 0.5 else ("yes" if a_asr <= 0.10 and drop <= 0.05 else "no")
            wall = sum(r["_wall_s"] for r in runs) / len(runs)
            name = method if len(runs) == len(seeds) else f"{method} (n={len(runs)})"  # some runs failed
            lines.append(
                f"| {part} | {name} | {cell(runs, 'dfkd_student')} | {cell(runs, 'abd_student')} "
                f"| {cell(runs, 'clean_kd_reference')} | {verdict} | {vaccine_cell(runs)} | {wall:.0f} |"
            )
    lines += [
        "",
        "Vaccines found: teachers for which ABD's Shuffling Vaccine search (Algorithm 1) accepted a "
        "vaccine in the (last) round, and how many of them were malicious; where none is found, "
        "Algorithm 2 runs Self-Retrospection instead. FedGen's baseline is the FedAvg model that "
        "FedGen trains (not distilled); its +ABD arm is the data-free repair of it (README).",
    ]
    if failures:
        lines += ["", "Failed or missing runs (left out of the means above):", *[f"- {f}" for f in failures]]
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    return text


def save_plot(out: Path, results: dict[str, dict[str, list[dict]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [f"{part}:{m}" for part, ms in results.items() for m, rs in ms.items() if rs]
    runs = [rs for ms in results.values() for rs in ms.values() if rs]
    if not runs:
        return
    fig, axes = plt.subplots(1, 2, figsize=(max(7, 1.3 * len(labels)), 3.4))
    x = np.arange(len(labels))
    width = 0.27
    for ax, key in zip(axes, ("acc", "asr")):
        for k, (role, name) in enumerate(ROLES):
            vals = [100 * np.mean([r[role][key] for r in rs if role in r]) if any(role in r for r in rs) else 0 for rs in runs]
            ax.bar(x + (k - 1) * width, vals, width, label=name, color=f"C{k}")
            if key == "asr":
                floors = [100 * np.mean([r[role]["asr_floor"] for r in rs if role in r]) if any(role in r for r in rs) else 0
                          for rs in runs]
                ax.bar(x + (k - 1) * width, floors, width, fill=False, hatch="//", edgecolor="black", linewidth=0.5)
        ax.set_xticks(x, labels, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel(f"{key.upper()} %" + (" (hatched: floor)" if key == "asr" else ""))
        ax.set_ylim(0, 100)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "table3.png", dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("central", "fl", "both"), default="both")
    parser.add_argument("--methods", nargs="+", default=None, help="a subset of the method names (either part)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--resume", action="store_true",
                        help="reuse a finished run of the same method, seed and overrides instead of running it again")
    parser.add_argument("--report", action="store_true",
                        help="only rebuild results.md and table3.png from finished runs; start none "
                             "(a missing run is listed as not run yet)")
    parser.add_argument("--archive", type=Path, default=None,
                        help="folder that keeps every finished run's summary, metrics and config (default: the "
                             "tracked benchmarks/results/table3/, used only without extra overrides, so a smoke "
                             "run never replaces the documented runs; --report also archives finished runs it "
                             "finds in outputs/)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run (after --)")
    args = parser.parse_args()
    out = ROOT / "outputs" / "sweeps" / "table3"
    out.mkdir(parents=True, exist_ok=True)
    cmd = "python benchmarks/table3.py " + " ".join(filter(None, [
        f"--part {args.part}", f"--methods {' '.join(args.methods)}" if args.methods else "",
        f"--seeds {' '.join(map(str, args.seeds))}", ("-- " + " ".join(args.overrides)) if args.overrides else ""]
    )) + (" (table rebuilt from its finished runs with --report)" if args.report else "")
    parts = PARTS if args.part == "both" else {args.part: PARTS[args.part]}
    archive = args.archive or (None if args.overrides else DEFAULT_ARCHIVE)
    t0 = time.perf_counter()
    results: dict[str, dict[str, list[dict]]] = {}
    failures: list[str] = []
    for part, methods in parts.items():
        for method in methods:
            if args.methods and method not in args.methods:
                continue
            overrides = run_overrides(part, method, args.overrides)
            label = f"{part}-{method}"
            runs = results.setdefault(part, {}).setdefault(method, [])
            for seed in args.seeds:
                try:
                    summary = run_one(out, label, overrides, seed, resume=args.resume, report_only=args.report,
                                      archive=archive)
                except RunFailed as err:  # keep going: one failed run must not lose the rest of a long sweep
                    print(f"{label} seed {seed}: {err}", file=sys.stderr)
                    failures.append(f"{label} seed {seed}: {str(err).splitlines()[-1] if str(err) else 'failed'}")
                    write_results(out, results, args.seeds, cmd, failures)
                    continue
                summary["_vaccines"] = vaccine_report(Path(summary["_dir"]))
                runs.append(summary)
                (out / "runs.json").write_text(json.dumps(results, indent=1))
                write_results(out, results, args.seeds, cmd, failures)
    text = write_results(out, results, args.seeds, cmd, failures)
    save_plot(out, results)
    if archive is not None and args.part == "both" and not args.methods and not failures:
        archive.mkdir(parents=True, exist_ok=True)
        (archive / "results.md").write_text(text)  # only a whole table replaces the whole table
    print(text)
    print(f"total wall time: {time.perf_counter() - t0:.0f} s")
    if failures:
        sys.exit(f"{len(failures)} run(s) failed: see {out / 'results.md'}")


if __name__ == "__main__":
    main()
