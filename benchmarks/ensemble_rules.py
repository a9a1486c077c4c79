"""Teacher-ensemble rules against scaled attackers (issue 15, item 1): which ``distill.ensemble``
rule should be the default?

    .venv/bin/python benchmarks/ensemble_rules.py --stage ensembles    # every rule, 3 seeds, cheap
    .venv/bin/python benchmarks/ensemble_rules.py --seeds 0            # students: every scenario x rule
    .venv/bin/python benchmarks/ensemble_rules.py --scenarios clean 2of6_x5 --rules mean_logits median_probs
    .venv/bin/python benchmarks/ensemble_rules.py --scenarios 2of6_x5 --rules mean_probs --variants clip krum_selected
    .venv/bin/python benchmarks/ensemble_rules.py --plot               # the trade-off figure, finished runs only
    .venv/bin/python benchmarks/ensemble_rules.py --report             # the tables from finished runs only

``--stage ensembles``: one run per scenario and seed trains the clients' teachers and scores
the teacher ensemble under every rule on those same teachers (``distill.ensemble_report=true``),
with no distillation (``distill.iterations=0``): about a tenth of a student cell's time, so
every rule gets 3 seeds. ``--stage students`` (the default): each cell is one real ``abd-fl`` run (Flower + Ray) of the FL default scenario (one-shot, 6
clients, defense off, so what is measured is the ensemble rule, not ABD; no clean-KD
reference) with one ``distill.ensemble`` rule. Scenarios: no attacker; the default two
attackers of six unscaled; two scaled x5 and x20 (model replacement, ``attack.scale``); one
and three of six scaled x5. Within a scenario and seed the clients train the same teachers
under every rule (same seed), so the rules differ only in the server's ensemble. Reported per
cell: the student's Acc / ASR / floor and the ensemble's, mean (min-max) over seeds. The choice
rule (issue 15): the default must not lose more than 1 point of clean accuracy without an
attacker against ``mean_logits``. Finished runs are read back; their records are archived in
the tracked ``benchmarks/results/ensemble_rules/`` and ``results.md`` is rewritten after
every run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweep import ROOT, RunFailed, fmt, run_command, run_one, write_results_md  # noqa: E402

BASE = ["defense=none", "clean_kd_reference.enabled=false"]
SCENARIOS: dict[str, list[str]] = {
    "clean": ["attack.num_malicious=0"],
    "2of6": [],
    "2of6_x5": ["attack.scale=5"],
    "2of6_x20": ["attack.scale=20"],
    "1of6_x5": ["attack.num_malicious=1", "attack.scale=5"],
    "3of6_x5": ["attack.num_malicious=3", "attack.scale=5"],
}
VARIANTS: dict[str, list[str]] = {
    "plain": [],
    "clip": ["strategy.update_check.action=clip"],
    "reject": ["strategy.update_check.action=reject"],
    "krum_selected": ["strategy=krum", "strategy.teachers=selected"],
    "multikrum_selected": ["strategy=multikrum", "strategy.teachers=selected"],
}
"""The server's other guards, tried with a rule: ``plain`` (the FL default: FedAvg, every valid
reply teaches, ``update_check`` keep); the update check's ``clip`` / ``reject`` of replies out
of line with the round's others; Krum / MultiKrum (f = 2) with only the replies they select
as teachers (``strategy.teachers=selected``)."""
RULES = ("mean_logits", "mean_probs", "standardized_logits", "median_probs", "trimmed_probs")
DEFAULT_ARCHIVE = ROOT / "benchmarks" / "results" / "ensemble_rules"
FIGURE = ROOT / "docs" / "figures" / "ensemble_rules.png"
CANDIDATES = (("plain", "mean_logits"), ("plain", "mean_probs"), ("plain", "median_probs"),
              ("clip", "mean_probs"), ("multikrum_selected", "mean_probs"))
"""The students drawn by ``--plot``: (variant, rule), each without an attacker and with 2 of 6 at x5."""


def cell_overrides(scenario: str, rule: str, extra: list[str], variant: str = "plain") -> list[str]:
    """The Hydra overrides of one cell (scenario x rule x variant), plus the command line's extras."""
    return [*BASE, *SCENARIOS[scenario], *VARIANTS[variant], f"distill.ensemble={rule}", *extra]


def row_name(scenario: str, variant: str) -> str:
    """A table row and a run's name part: the scenario, with the variant unless it is ``plain``."""
    return scenario if variant == "plain" else f"{scenario}+{variant}"


ENSEMBLE_STAGE = ["distill.iterations=0", "distill.ensemble_report=true"]


def ensemble_overrides(scenario: str, extra: list[str]) -> list[str]:
    """The Hydra overrides of one ensembles-stage run (a scenario: every rule on its teachers)."""
    return [*BASE, *SCENARIOS[scenario], *ENSEMBLE_STAGE, *extra]


def ensemble_tables(results: dict[str, list[dict]], scenarios: list[str], rules: list[str]) -> str:
    """Per scenario and rule, the ensemble's Acc, ASR and floor: mean (min-max) over seeds."""
    lines = []
    for key, title in (("acc", "Acc %"), ("asr", "ASR %"), ("asr_floor", "ASR floor %")):
        lines += [f"\nteacher ensemble, {title}: mean (min-max) over seeds", "",
                  "| scenario | n | " + " | ".join(rules) + " |", "|---|---:|" + "---|" * len(rules)]
        for sc in scenarios:
            runs = [r for r in results.get(sc, []) if "ensembles" in r]
            cells = [fmt([r["ensembles"][rule][key] for r in runs]) if runs else "not run" for rule in rules]
            lines.append(f"| {sc} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(runs: list[dict], role: str) -> str:
    if not runs:
        return "not run"
    return " / ".join(fmt([r[role][k] for r in runs]) for k in ("acc", "asr", "asr_floor"))


def tables(results: dict[tuple[str, str], list[dict]], scenarios: list[str], rules: list[str]) -> str:
    lines = []
    for role, title in (("dfkd_student", "data-free KD student"), ("ensemble", "teacher ensemble")):
        lines += [f"\n{title}: Acc / ASR / floor %, mean (min-max) over seeds", "",
                  "| scenario | " + " | ".join(rules) + " |", "|---|" + "---|" * len(rules)]
        for sc in scenarios:
            lines.append(f"| {sc} | " + " | ".join(_cell(results.get((sc, rule), []), role) for rule in rules) + " |")
    return "\n".join(lines) + "\n"


def _finished(out: Path, archive: Path, label: str, overrides: list[str], seeds: list[int]) -> list[dict]:
    runs = []
    for seed in seeds:
        try:
            runs.append(run_one(out, label, overrides, seed, report_only=True, archive=archive))
        except RunFailed:
            pass
    return runs


def plot_tradeoff(out: Path, seeds: list[int], path: Path = FIGURE, archive: Path = DEFAULT_ARCHIVE) -> dict[str, int]:
    """The trade-off figure from finished runs: left, every rule's teacher ensemble (ensembles
    stage), clean Acc against the ASR with 2 of 6 scaled x5, one dot per seed and the mean;
    right, the candidates' students with 2 of 6 at x5, Acc against ASR per seed (legend: the
    clean student's mean Acc), so a seed that collapses shows as a point on its own. Returns
    the number of points drawn per panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_e, ax_s) = plt.subplots(1, 2, figsize=(11, 4.5))
    drawn = {"ensembles": 0, "students": 0}
    for rule in RULES:
        clean, x5 = ({r["_seed"]: r for r in _tagged(_finished(out / "ensembles", archive / "ensembles", f"{sc}-ensembles",
                                                                ensemble_overrides(sc, []), seeds))} for sc in ("clean", "2of6_x5"))
        both = [s for s in sorted(set(clean) & set(x5)) if x5[s]["ensembles"][rule]["asr"] is not None]  # a null ASR has no point
        if not both:
            continue
        xs = [100 * clean[s]["ensembles"][rule]["acc"] for s in both]
        ys = [100 * x5[s]["ensembles"][rule]["asr"] for s in both]
        (line,) = ax_e.plot(xs, ys, "o", alpha=0.4)
        drawn["ensembles"] += len(xs)
        ax_e.plot([sum(xs) / len(xs)], [sum(ys) / len(ys)], "*", ms=14, color=line.get_color(), label=f"{rule} (n={len(both)})")
    ax_e.set(xlabel="clean ensemble Acc % (no attacker)", ylabel="ensemble ASR % (2 of 6 at x5)", title="teacher ensemble, every rule")
    for (variant, rule), marker, size in zip(CANDIDATES, "osD^v", (14, 11, 9, 7, 5)):  # open, shrinking: equal runs stay visible
        attacked = _finished(out, archive, f"{row_name('2of6_x5', variant)}-{rule}", cell_overrides("2of6_x5", rule, [], variant), seeds)
        attacked = [r for r in attacked if r["dfkd_student"]["asr"] is not None]  # a null ASR has no point
        if not attacked:
            continue
        clean = _finished(out, archive, f"{row_name('clean', variant)}-{rule}", cell_overrides("clean", rule, [], variant), seeds)
        drawn["students"] += len(attacked)
        note = f"clean {sum(100 * r['dfkd_student']['acc'] for r in clean) / len(clean):.1f}, n={len(clean)}" if clean else "clean not run"
        ax_s.plot([100 * r["dfkd_student"]["acc"] for r in attacked], [100 * r["dfkd_student"]["asr"] for r in attacked], marker, ms=size, mfc="none", mew=1.5,
                  label=f"{rule}{'' if variant == 'plain' else ' + ' + variant} ({note})")
    ax_s.set(xlabel="student Acc % (2 of 6 at x5)", ylabel="student ASR %", title="distilled student, one point per seed")
    for ax in (ax_e, ax_s):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


def _tagged(runs: list[dict]) -> list[dict]:
    for r in runs:  # the seed, from the run's directory name (``...-seed<k>``)
        r["_seed"] = int(Path(r["_dir"]).name.rsplit("seed", 1)[1])
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=list(RULES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=["plain"], choices=list(VARIANTS),
                        help="the server's other guards tried with each rule (students stage; a table row each)")
    parser.add_argument("--stage", choices=("students", "ensembles"), default="students",
                        help="students: one run per scenario x rule; ensembles: one run per scenario, every rule scored")
    parser.add_argument("--report", action="store_true", help="the tables from finished runs; start none")
    parser.add_argument("--plot", action="store_true", help=f"draw the trade-off figure from finished runs ({FIGURE.relative_to(ROOT)}); start none")
    parser.add_argument("--dry-run", action="store_true", help="print the abd-fl commands and exit")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run (after --)")
    args = parser.parse_args()
    out = ROOT / "outputs" / "sweeps" / "ensemble_rules"
    if args.plot:
        plot_tradeoff(out, args.seeds)
        print(f"wrote {FIGURE}")
        return
    archive = None if args.overrides else DEFAULT_ARCHIVE
    if args.stage == "ensembles":
        out, archive = out / "ensembles", (archive / "ensembles" if archive is not None else None)
        cells = [(seed, sc, "plain", "ensembles") for seed in args.seeds for sc in args.scenarios]
    else:
        cells = [(seed, sc, variant, rule) for seed in args.seeds for sc in args.scenarios
                 for variant in args.variants for rule in args.rules]
    rows = [row_name(sc, variant) for sc in args.scenarios for variant in args.variants]

    def overrides(sc: str, variant: str, rule: str) -> list[str]:
        if args.stage == "ensembles":
            return ensemble_overrides(sc, args.overrides)
        return cell_overrides(sc, rule, args.overrides, variant)

    def render(results: dict[tuple[str, str], list[dict]]) -> str:
        if args.stage == "ensembles":
            return ensemble_tables({sc: results.get((sc, "ensembles"), []) for sc in args.scenarios}, args.scenarios, args.rules)
        return tables(results, rows, args.rules)

    if args.dry_run:
        for seed, sc, variant, rule in cells:
            print(" ".join(run_command(out, f"{row_name(sc, variant)}-{rule}", overrides(sc, variant, rule), seed)[1:]))
        return
    out.mkdir(parents=True, exist_ok=True)
    results: dict[tuple[str, str], list[dict]] = {}
    failures = []
    for seed, sc, variant, rule in cells:
        row = row_name(sc, variant)
        try:
            summary = run_one(out, f"{row}-{rule}", overrides(sc, variant, rule), seed,
                              resume=True, report_only=args.report, archive=archive)
            results.setdefault((row, rule), []).append(summary)
        except RunFailed as err:
            failures.append(f"{row} / {rule} / seed {seed}: {str(err).splitlines()[0][:160]}")
        text = render(results)
        write_results_md(out, text, failures, archive, args.report)
    print(text)
    if failures:
        print("\n".join(failures))
    print(json.dumps({"cells": len(cells), "finished": sum(len(v) for v in results.values())}))


if __name__ == "__main__":
    main()
