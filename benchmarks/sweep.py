"""Issue-3 results: runs ``abd-fl`` over seeds and settings and writes a markdown table of
mean and spread (min-max) of Acc / ASR / ASR floor per role, plus detection AUCs.

    .venv/bin/python benchmarks/sweep.py central --seeds 0 1 2      # one poisoned teacher, ZSKT
    .venv/bin/python benchmarks/sweep.py fl --seeds 0 1 2           # the FL default scenario
    .venv/bin/python benchmarks/sweep.py ablation --seeds 0 1 2     # SV only / SR only / both, 2 triggers
    .venv/bin/python benchmarks/sweep.py table4 --seeds 0 1 2       # the same for grid, square, Trojan WM (issue 12)

Each run is a real ``abd-fl`` invocation (Flower + Ray for ``fl``); results land in
``outputs/sweeps/<name>/`` (every run's directory, and ``results.md``), written as they
are produced. A finished run of the same arguments is read back, not run again
(``--rerun`` runs it anyway), so an interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROLES = ("malicious_teacher", "benign_teachers", "ensemble", "dfkd_student", "abd_student", "abd_ti_student", "sv_student",
         "sr_student", "clean_kd_reference")

SETTINGS = {
    "central": [("badnets_square", ["experiment=central"])],
    "fl": [("badnets_square", [])],
    # issue 12, 5(b): the FL default scenario with no malicious client (what ABD costs without an attacker)
    "fl_clean": [("no_attacker", ["attack.num_malicious=0"])],
    "ablation": [
        (trigger, ["experiment=central", f"attack={trigger}", "defense.ablation=true"])
        for trigger in ("badnets_square", "badnets_grid")
    ],
    # issue 12, 5(a): the paper's Table 4 shape (SV only, SR only, SV then SR = ABD, baseline)
    "table4": [
        (trigger, ["experiment=central", f"attack={trigger}", "defense.ablation=true"])
        for trigger in ("badnets_grid", "badnets_square", "trojan_wm")
    ],
}


def _without_output_dir(args: list[str]) -> list[str]:
    """A run's arguments less ``output_dir`` (a run directory may be moved)."""
    return [a for a in args if not a.startswith("output_dir=")]


class RunFailed(SystemExit):
    """A sweep run that exited non-zero (a ``SystemExit``, so a script that does not catch it
    stops with the message, as before)."""


# What a tracked archive keeps of a finished run: enough to rebuild every table (its
# summary, per-round metrics and resolved config), not its checkpoints and plots.
ARCHIVED = ("summary.json", "metrics.jsonl", "config.yaml")


def _finished_with(run_dir: Path, args: list[str]) -> bool:
    """Whether ``run_dir`` holds a finished run of exactly these ``abd-fl`` arguments."""
    record = run_dir / "sweep_run.json"
    if not (record.is_file() and (run_dir / "latest" / "summary.json").is_file()):
        return False
    return _without_output_dir(json.loads(record.read_text()).get("args", [])) == _without_output_dir(args)


def archive_run(run_dir: Path, archive: Path) -> Path:
    """Copy a finished run's small records (``sweep_run.json`` and the latest run's
    ``ARCHIVED`` files) to ``archive/<run name>/``, laid out as ``run_one`` reads them back,
    so that a tracked folder keeps the results when ``outputs/`` is lost."""
    dest = archive / run_dir.name
    if dest.exists():  # a rerun replaces the whole record, leaving no file of the old one
        shutil.rmtree(dest)
    (dest / "latest").mkdir(parents=True)
    shutil.copyfile(run_dir / "sweep_run.json", dest / "sweep_run.json")
    for name in ARCHIVED:
        src = run_dir / "latest" / name
        if src.is_file():
            shutil.copyfile(src, dest / "latest" / name)
    return dest


def write_results_md(out: Path, text: str, failures: list[str], archive: Path | None, report_only: bool) -> None:
    """Rewrite ``out/results.md`` (the table and any failed runs, one line each) and, unless
    only reporting, the tracked ``archive/results.md`` (the table alone): called after every
    run, so nothing computed is lost."""
    (out / "results.md").write_text(text + ("\n" + "\n".join(failures) + "\n" if failures else ""))
    if archive is not None and not report_only:
        archive.mkdir(parents=True, exist_ok=True)
        (archive / "results.md").write_text(text)


def run_command(out: Path, label: str, overrides: list[str], seed: int) -> list[str]:
    """The ``abd-fl`` command line of one sweep run, as ``run_one`` runs it (its run
    directory is ``out/<label>-seed<seed>``)."""
    run_out = out / f"{label}-seed{seed}"
    return [sys.executable, "-m", "abd_fl.cli", f"seed={seed}", f"output_dir={run_out}", "progress=false", *overrides]


def run_one(
    out: Path,
    label: str,
    overrides: list[str],
    seed: int,
    resume: bool = False,
    report_only: bool = False,
    archive: Path | None = None,
) -> dict:
    """One ``abd-fl`` run in its own process; its summary (plus ``_wall_s``, ``_dir`` where
    its records are, and the last detection record). ``resume``: a finished run with the
    same overrides (``sweep_run.json`` beside its results), in ``out`` or else in
    ``archive``, is read back instead of run again. ``report_only``: read back a finished
    run, never start one (``RunFailed`` "not run yet" where there is none). ``archive``:
    a finished run's records are copied there (``archive_run``)."""
    resume = resume or report_only
    run_out = out / f"{label}-seed{seed}"
    cmd = run_command(out, label, overrides, seed)
    candidates = [run_out] + ([archive / run_out.name] if archive is not None else [])
    source = next((d for d in candidates if _finished_with(d, cmd[3:])), None) if resume else None
    if source is None and report_only:
        raise RunFailed(f"not run yet (no finished run in {' or '.join(map(str, candidates))})")
    if source is None:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RunFailed(f"run failed ({' '.join(cmd)}):\n{proc.stderr[-2000:]}")
        if not (run_out / "latest" / "summary.json").is_file():
            raise RunFailed(f"run wrote no summary ({' '.join(cmd)}):\n{proc.stderr[-2000:]}")
        (run_out / "sweep_run.json").write_text(json.dumps({"args": cmd[3:], "wall_s": time.perf_counter() - t0}))
        source = run_out
    if archive is not None and source == run_out:
        archive_run(run_out, archive)
    summary = json.loads((source / "latest" / "summary.json").read_text())
    summary["_wall_s"] = float(json.loads((source / "sweep_run.json").read_text())["wall_s"])
    summary["_dir"] = str(source)
    metrics = [json.loads(x) for x in (source / "latest" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    det = [m["detection"] for m in metrics if m.get("detection")]
    if det:
        summary["_detection"] = det[-1]
    return summary


def fmt(values: list[float]) -> str:
    vals = [100 * v for v in values if v is not None]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return f"{vals[0]:.1f}"
    return f"{statistics.mean(vals):.1f} ({min(vals):.1f}-{max(vals):.1f})"


def table(label: str, runs: list[dict]) -> str:
    lines = [f"### {label} ({len(runs)} seeds; mean (min-max))", "", "| model | Acc % | ASR % | ASR floor % |", "|---|---:|---:|---:|"]
    for role in ROLES:
        if all(role in r for r in runs):
            cells = [fmt([r[role][k] for r in runs]) for k in ("acc", "asr", "asr_floor")]
            lines.append(f"| {role} | {' | '.join(cells)} |")
    dets = [r["_detection"] for r in runs if "_detection" in r]
    if dets:
        def auc_list(values: list) -> str:
            return ", ".join("n/a" if a is None or a != a else f"{a:.2f}" for a in values)

        for arm in dets[0]:
            if "auc_tail_ratio" in dets[0][arm]:
                aucs = [d[arm]["auc_tail_ratio"] for d in dets if arm in d]
                found = [sum(d[arm]["vaccine_found"]) for d in dets if arm in d]
                lines.append(f"\nPer-client detection ({arm}): ROC AUC of the tail ratio vs. ground truth: "
                             f"{auc_list(aucs)}; vaccines found per run: {found}")
            if "auc_trigger_flip" in dets[0][arm]:
                aucs = [d[arm]["auc_trigger_flip"] for d in dets if arm in d]
                lines.append(f"\nPer-client detection ({arm}): ROC AUC of the student trigger's flip rate per client "
                             f"vs. ground truth: {auc_list(aucs)}")
    walls = [r["_wall_s"] for r in runs]
    lines.append(f"\nWall time per run: {statistics.mean(walls):.0f} s")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("setting", choices=sorted(SETTINGS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rerun", action="store_true", help="run again even where a finished run of the same arguments exists")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args()
    out = ROOT / "outputs" / "sweeps" / args.setting
    out.mkdir(parents=True, exist_ok=True)
    sections = []
    for label, overrides in SETTINGS[args.setting]:
        runs = []
        for seed in args.seeds:
            runs.append(run_one(out, label, [*overrides, *args.overrides], seed, resume=not args.rerun))
            (out / f"{label}-runs.json").write_text(json.dumps(runs, indent=1))
        sections.append(table(f"{args.setting}: {label}", runs))
        (out / "results.md").write_text("\n".join(sections))
    cmd = f"python benchmarks/sweep.py {args.setting} --seeds {' '.join(map(str, args.seeds))} {' '.join(args.overrides)}".strip()
    text = f"<!-- produced by: {cmd} -->\n" + "\n".join(sections)
    (out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
