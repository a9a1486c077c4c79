"""Table-2 sweep (issue 13; ABD paper Table 2): datasets x teacher architectures.

    .venv/bin/python benchmarks/table2.py --seeds 0 1 2                  # every cell, 3 seeds
    .venv/bin/python benchmarks/table2.py --dry-run                      # the abd-fl commands, nothing run
    .venv/bin/python benchmarks/table2.py --cells digits mnist5k/lenet   # some cells (the rest read back)
    .venv/bin/python benchmarks/table2.py --defense abd_ti               # another defense arm
    .venv/bin/python benchmarks/table2.py --attack trojan_wm --cells mnist5k/lenet   # another trigger
    .venv/bin/python benchmarks/table2.py --data-root /data              # + CIFAR-10 and GTSRB (paper presets)
    .venv/bin/python benchmarks/table2.py --report                       # table + figure from finished runs only
    .venv/bin/python benchmarks/table2.py --cells digits/cnn -- distill.iterations=2   # budget overrides

Every cell is the centralized experiment (one poisoned teacher, BadNets square on the
embedded datasets, BadNets grid in the paper presets; 10% poisoned, target 0) run by one
``abd-fl`` process per seed, which distils the undefended ZSKT student (``dfkd_student``),
the defended one (``<defense>_student``, default ``abd_student``) and the clean-KD
reference (``clean_kd_reference``) from the same teacher. Cells:

- digits (8x8): ``cnn`` -> ``cnn_small`` (``experiment=central``) and WRN-16-2 -> WRN-16-1
  at 8x8 (the paper's own pair; ``experiment=central`` with the model pair and the
  vaccine's 5 last convs overridden);
- mnist5k (28x28): ``model=mnist_lenet`` and ``model=mnist_wrn`` (``experiment=mnist_central``);
- with ``--data-root DIR``: cifar10 and gtsrb (``experiment=cifar10_paper|gtsrb_paper``
  ``dataset.root=DIR``): the presets' WRN-16-2 -> WRN-16-1 and WRN-40-2 -> WRN-16-1 (ZSKT's
  CIFAR-10 teacher; the vaccine shuffles its last stage, 13 convs).

Resumes by default (a finished run with the same overrides, in ``--out`` or in the
archive, is read back, not run again; ``--no-resume`` reruns). Writes ``--out``
(``outputs/sweeps/table2/``): every run's directory, ``results.md`` rewritten after every
run (so nothing computed is lost) and ``table2.png`` (ASR per cell for ZSKT, ZSKT+defense
and clean KD, floors hatched, Acc written on the bars, the teacher's ASR marked). Every
finished run's summary, metrics and resolved config are copied to the tracked
``benchmarks/results/table2/`` (``--archive``; by default only for runs without extra
overrides, so a smoke run never replaces documented runs); when the whole grid is
tabulated (no ``--cells``) its ``results.md`` is written there too and the figure to
``docs/figures/table2.png``. Another defense writes ``results-<defense>.md`` and
``table2-<defense>.png``; another trigger (``--attack``, default: each cell's own) its own
run directories and ``results[-<defense>]-<attack>.md`` (the cell's poison rate is kept, so
the clean-label ``sig`` and ``cl`` poison 10% of the whole set, not half the target class as
Table 1 does). Cells not selected or not run are read back from finished runs,
or listed as not run yet, so every table shows the whole grid.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweep import ROOT, RunFailed, _finished_with, fmt, run_command, run_one  # noqa: E402
from sv_tradeoff import inversion_info  # noqa: E402
from table3 import cell as arm_cell  # noqa: E402

DEFAULT_ARCHIVE = ROOT / "benchmarks" / "results" / "table2"
DEFAULT_OUT = ROOT / "outputs" / "sweeps" / "table2"
FIGURES = ROOT / "docs" / "figures"
DEFENSES = ("abd", "abd_ti", "sv", "sr")  # every defense that distils a defended student arm
ATTACKS = tuple(sorted(p.stem for p in (ROOT / "configs" / "attack").glob("*.yaml") if p.stem != "none"))


@dataclass(frozen=True)
class Cell:
    """One cell of the table: a dataset and a teacher -> student pair, and the Hydra
    overrides that select them."""

    dataset: str
    teacher: str
    student: str
    overrides: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.dataset}/{self.teacher}"

    def label(self, defense: str, attack: str | None = None) -> str:
        """The run directories' prefix (``<label>-seed<k>``): one per cell, trigger (``None``:
        the cell's own, left out of the name) and defense."""
        return f"{self.dataset}-{self.teacher}-{defense}" if attack is None else f"{self.dataset}-{self.teacher}-{attack}-{defense}"


EMBEDDED = (
    Cell("digits", "cnn", "cnn_small", ("experiment=central",)),
    # WRN-16-2 runs at 8x8 (strides 1, 2, 2: 8 -> 4 -> 2 px); the central preset sets the
    # model pair in its body, so the values are overridden, not the model group.
    Cell("digits", "wrn16_2", "wrn16_1",
         ("experiment=central", "model.client=wrn16_2", "model.student=wrn16_1", "model.shuffle_layers=5")),
    Cell("mnist5k", "lenet", "lenet_small", ("experiment=mnist_central", "model=mnist_lenet")),
    Cell("mnist5k", "wrn16_2", "wrn16_1", ("experiment=mnist_central", "model=mnist_wrn")),
)
PAPER_PRESETS = {"cifar10": "cifar10_paper", "gtsrb": "gtsrb_paper"}


def grid(data_root: str | None = None) -> list[Cell]:
    """Every cell: the embedded datasets, plus CIFAR-10 and GTSRB when ``data_root`` is given."""
    cells = list(EMBEDDED)
    if data_root:
        for dataset, preset in PAPER_PRESETS.items():
            base = (f"experiment={preset}", f"dataset.root={data_root}")
            cells.append(Cell(dataset, "wrn16_2", "wrn16_1", base))
            # WRN-40-2's last group: 6 blocks of 2 convs plus the 1x1 shortcut = 13 convs
            cells.append(Cell(dataset, "wrn40_2", "wrn16_1", (*base, "model.client=wrn40_2", "model.shuffle_layers=13")))
    return cells


def select(cells: list[Cell], names: list[str] | None) -> list[Cell]:
    """The cells named ``dataset`` (all its teachers) or ``dataset/teacher``; all when None."""
    if not names:
        return list(cells)
    known = {c.name for c in cells} | {c.dataset for c in cells}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown cell(s) {', '.join(unknown)}; choose from: {', '.join(sorted(known))}")
    return [c for c in cells if c.name in names or c.dataset in names]


def run_overrides(cell: Cell, defense: str, user: list[str], attack: str | None = None) -> list[str]:
    """The Hydra overrides of one run of ``cell``: the cell's, the trigger (when not the
    cell's own), the defense, the user's."""
    return [*cell.overrides, *([f"attack={attack}"] if attack else []), f"defense={defense}", *user]


def defense_found(run_dir: Path, arm: str) -> str:
    """What the defended arm's defense found in one run: abd_ti's suspected trigger classes;
    else whether the Shuffling Vaccine was searched and accepted ("unverified": with
    ``search=off``, the reference's CIFAR-10 setting and the default, SV acts from step 0
    without a search, so the report's ``found`` says nothing); "n/a" without either."""
    records = [json.loads(x) for x in (run_dir / "latest" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    mine = [r for r in records if r.get("role") == arm]
    inv = inversion_info(mine)
    if inv:
        suspects = sorted({s for s in inv["suspects"] if s is not None})
        return "trigger " + ",".join(map(str, suspects)) if suspects else "no trigger"
    report = (mine[-1].get("defense") or {}) if mine else {}
    teachers = report.get("teachers") or []
    if not teachers or not report.get("config", {}).get("use_sv", True):
        return "n/a"
    t = teachers[0]
    if not t.get("searched"):
        return "SV unverified"
    return "vaccine" if t.get("found") else "no vaccine"


def _suffix(defense: str, attack: str | None = None) -> str:
    """Result files' suffix: none for the default defense and each cell's own trigger, so
    another defense or trigger never replaces its table."""
    return ("" if defense == "abd" else f"-{defense}") + (f"-{attack}" if attack else "")


def _defended(defense: str) -> str:
    """The defended arm's column name: ZSKT+ABD, ZSKT+abd_ti, ..."""
    return "ZSKT+ABD" if defense == "abd" else f"ZSKT+{defense}"


def write_results(
    paths: list[Path], cells: list[Cell], results: dict[str, list[dict]], seeds: list[int], defense: str, cmd: str,
    failures: list[str] | None = None, missing: list[str] | None = None, attack: str | None = None,
) -> str:
    """The table (one row per cell, every cell of the grid), written to every path in ``paths``."""
    arm = f"{defense}_student"
    lines = [
        f"<!-- produced by: {cmd} -->",
        f"### Table 2: datasets x teacher architectures ({len(seeds)} seed(s): {', '.join(map(str, seeds))}; "
        "centralized, one poisoned teacher; "
        + (f"trigger `{attack}`; " if attack else "")
        + "Acc / ASR in %, mean (min-max); floor: mean share of clean "
        "non-target images predicted as the target)",
        "",
        f"| dataset | teacher -> student | teacher Acc / ASR | ZSKT | {_defended(defense)} | clean KD "
        "| defense found (per seed) | wall s |",
        "|---|---|---|---|---|---|---|---:|",
    ]
    for c in cells:
        runs = results.get(c.name, [])
        pair = f"{c.teacher} -> {c.student}"
        if not runs:
            lines.append(f"| {c.dataset} | {pair} | not run yet | | | | | |")
            continue
        if len(runs) != len(seeds):
            pair += f" (n={len(runs)})"
        teachers = [r["malicious_teacher"] for r in runs if "malicious_teacher" in r]
        teacher = f"{fmt([t['acc'] for t in teachers])} / {fmt([t['asr'] for t in teachers])}" if teachers else "n/a"
        wall = statistics.mean(r["_wall_s"] for r in runs)
        lines.append(
            f"| {c.dataset} | {pair} | {teacher} | {arm_cell(runs, 'dfkd_student')} | {arm_cell(runs, arm)} "
            f"| {arm_cell(runs, 'clean_kd_reference')} | {' / '.join(r.get('_found', 'n/a') for r in runs)} | {wall:.0f} |"
        )
    lines += [
        "",
        "ZSKT: the undefended student (`dfkd_student`); ZSKT+defense: the defended student from the same "
        f"teacher (`{arm}`); clean KD: KD from the same teacher on 20% of the real training images "
        "(`clean_kd_reference`). Defense found, per seed: `vaccine` / `no vaccine` where ABD's Shuffling "
        "Vaccine search ran (then Self-Retrospection runs where none is accepted), `SV unverified` where SV "
        "acts from step 0 without a search (`defense.params.search=off`, the default), `trigger <classes>` / "
        "`no trigger` for abd_ti's targeted retrospection.",
    ]
    if missing:
        lines += ["", "Not run yet:", *[f"- {m}" for m in missing]]
    if failures:
        lines += ["", "Failed runs (left out of the means above):", *[f"- {f}" for f in failures]]
    text = "\n".join(lines) + "\n"
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return text


def save_plot(paths: list[Path], cells: list[Cell], results: dict[str, list[dict]], defense: str) -> bool:
    """Grouped bars of ASR per cell (ZSKT, ZSKT+defense, clean KD; min-max whiskers, floors
    hatched, each bar's mean Acc written on it, the teacher's ASR as a black tick).
    False (nothing written) when no cell has a run."""
    shown = [c for c in cells if results.get(c.name)]
    if not shown:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    roles = (("dfkd_student", "ZSKT"), (f"{defense}_student", _defended(defense)), ("clean_kd_reference", "clean KD"))
    x = np.arange(len(shown))
    width = 0.27
    fig, ax = plt.subplots(figsize=(max(6.5, 1.6 * len(shown)), 3.8))
    for k, (role, name) in enumerate(roles):
        pos = x + (k - 1) * width
        stats = []
        for c in shown:
            ms = [r[role] for r in results[c.name] if role in r]
            stats.append([100 * np.array([m[key] for m in ms]) if ms else np.array([np.nan])
                          for key in ("asr", "acc", "asr_floor")])
        asr = np.array([np.mean(s[0]) for s in stats])
        err = np.array([[np.mean(s[0]) - np.min(s[0]) for s in stats], [np.max(s[0]) - np.mean(s[0]) for s in stats]])
        ax.bar(pos, np.nan_to_num(asr), width, yerr=np.nan_to_num(err), capsize=2, label=name, color=f"C{k}")
        ax.bar(pos, np.nan_to_num([np.mean(s[2]) for s in stats]), width, fill=False, hatch="//", edgecolor="black",
               linewidth=0.5)
        for p, a, s in zip(pos, asr, stats):
            if not np.isnan(a):
                ax.text(p, min(a, 100) + 2, f"Acc {np.mean(s[1]):.0f}", rotation=90, ha="center", va="bottom", fontsize=6.5)
    teacher = [100 * np.mean([r["malicious_teacher"]["asr"] for r in results[c.name] if "malicious_teacher" in r] or [np.nan])
               for c in shown]
    ax.scatter(x, teacher, marker="_", s=900, color="black", zorder=3, label="teacher ASR")
    ax.set_xticks(x, [f"{c.dataset}\n{c.teacher}->{c.student}" for c in shown], fontsize=8)
    ax.set_ylabel("ASR % (hatched: floor)")
    ax.set_title(f"Table 2: ASR per dataset and teacher (ZSKT, {_defended(defense)}, clean KD; whiskers: min-max)",
                 fontsize=9)
    ax.set_ylim(0, 125)
    ax.set_yticks(range(0, 101, 20))
    ax.legend(fontsize=7, ncol=4, loc="upper center")
    fig.tight_layout()
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--defense", choices=DEFENSES, default="abd", help="the defended arm (default abd)")
    parser.add_argument("--attack", choices=ATTACKS, default=None,
                        help="the trigger of every cell (default: each cell's own: BadNets square on the embedded "
                             "datasets, grid in the paper presets)")
    parser.add_argument("--data-root", default=None,
                        help="folder holding CIFAR-10 and GTSRB (torchvision layout): adds their cells")
    parser.add_argument("--cells", nargs="+", default=None,
                        help="run only these cells: a dataset (all its teachers) or dataset/teacher; the table "
                             "still shows every cell, read back from finished runs")
    parser.add_argument("--no-resume", action="store_true", help="rerun finished runs instead of reading them back")
    parser.add_argument("--report", action="store_true",
                        help="only rebuild results.md and the figure from finished runs (in --out or the archive); "
                             "start none")
    parser.add_argument("--dry-run", action="store_true", help="print every run's abd-fl command; run nothing")
    parser.add_argument("--archive", type=Path, default=None,
                        help="folder keeping every finished run's summary, metrics and config (default: the tracked "
                             "benchmarks/results/table2/, used only without extra overrides)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="run directories, results.md and table2.png")
    parser.add_argument("--figure", type=Path, default=None,
                        help="also write the figure here (default: docs/figures/table2.png when the whole grid is "
                             "tabulated with the default archive)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run (after --)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> str:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    cells = grid(args.data_root)
    chosen = select(cells, args.cells)
    archive = args.archive or (None if args.overrides else DEFAULT_ARCHIVE)
    out = args.out
    if args.dry_run:
        lines = []
        for c in chosen:
            for seed in args.seeds:
                label = c.label(args.defense, args.attack)
                cmd = run_command(out, label, run_overrides(c, args.defense, args.overrides, args.attack), seed)
                run_dir = out / f"{label}-seed{seed}"
                done = [d for d in [run_dir] + ([archive / run_dir.name] if archive else []) if _finished_with(d, cmd[3:])]
                note = f"  # finished in {done[0]}: read back" if done and not args.no_resume else ""
                lines.append(shlex.join(cmd) + note)
        text = "\n".join(lines)
        print(text)
        return text

    out.mkdir(parents=True, exist_ok=True)
    suffix = _suffix(args.defense, args.attack)
    whole = args.cells is None
    md_paths = [out / f"results{suffix}.md"] + ([archive / f"results{suffix}.md"] if archive and whole else [])
    fig_paths = [out / f"table2{suffix}.png"]
    if args.figure is not None:
        fig_paths.append(args.figure)
    elif archive is not None and archive.resolve() == DEFAULT_ARCHIVE.resolve() and whole:
        fig_paths.append(FIGURES / f"table2{suffix}.png")
    cmd = "python benchmarks/table2.py " + shlex.join(argv) if argv else "python benchmarks/table2.py"
    t0 = time.perf_counter()
    results: dict[str, list[dict]] = {c.name: [] for c in cells}
    failures: list[str] = []
    missing: list[str] = []
    for c in cells:
        overrides = run_overrides(c, args.defense, args.overrides, args.attack)
        label = c.label(args.defense, args.attack)
        start = c in chosen and not args.report
        for seed in args.seeds:
            try:
                summary = run_one(out, label, overrides, seed, resume=not args.no_resume, report_only=not start,
                                  archive=archive)
            except RunFailed as err:  # keep going: one failed run must not lose the rest of the sweep
                if start:
                    print(f"{label} seed {seed}: {err}", file=sys.stderr)
                    failures.append(f"{label} seed {seed}: {str(err).splitlines()[-1] if str(err) else 'failed'}")
                else:
                    missing.append(f"{label} seed {seed}")
                write_results(md_paths, cells, results, args.seeds, args.defense, cmd, failures, missing, args.attack)
                continue
            summary["_found"] = defense_found(Path(summary["_dir"]), f"{args.defense}_student")
            results[c.name].append(summary)
            write_results(md_paths, cells, results, args.seeds, args.defense, cmd, failures, missing, args.attack)
    text = write_results(md_paths, cells, results, args.seeds, args.defense, cmd, failures, missing, args.attack)
    save_plot(fig_paths, cells, results, args.defense)
    print(text)
    print(f"total wall time: {time.perf_counter() - t0:.0f} s")
    if failures:
        sys.exit(f"{len(failures)} run(s) failed: see {md_paths[0]}")
    return text


if __name__ == "__main__":
    main()
