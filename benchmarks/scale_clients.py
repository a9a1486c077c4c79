"""Time and memory of a federated round against the number of clients (issue 16, item 4).

    .venv/bin/python benchmarks/scale_clients.py                     # 6, 12, 25, 50, 100 clients
    .venv/bin/python benchmarks/scale_clients.py --clients 6 100      # a subset
    .venv/bin/python benchmarks/scale_clients.py --report             # table and plot from finished runs

Each point is one real ``abd-fl`` run (Flower + Ray) of ``experiment=fl100`` with
``simulation.num_clients=N``: the digits split iid, 30 local epochs per client, two
malicious clients (BadNets square), one-shot ZSKT distillation of every client teacher into
the student (``distill.iterations`` as configured, 500 by default), the undefended arm only
(``defense=none``, no clean-KD reference) so that what is timed is the server's per-client
cost, not ABD's. From each run's ``metrics.jsonl``: the round's wall time split into the wait
for the clients' replies (Ray + Flower + the clients' local work), the server's distillation
and its evaluation; the clients' median local work; the server process's peak RSS
(``server_memory``). The cost per extra client is the least-squares slope of each against N.

Writes ``outputs/sweeps/scale_clients/`` (runs, ``results.md``) and archives finished runs in
the tracked ``benchmarks/results/scale_clients/`` (read back by ``--report`` and on a rerun);
the plot goes to ``docs/figures/scale_clients.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweep import ROOT, RunFailed, run_one, write_results_md  # noqa: E402

BASE = ["experiment=fl100", "defense=none", "clean_kd_reference.enabled=false"]
DEFAULT_CLIENTS = (6, 12, 25, 50, 100)
DEFAULT_ARCHIVE = ROOT / "benchmarks" / "results" / "scale_clients"
FIGURE = ROOT / "docs" / "figures" / "scale_clients.png"


def point_overrides(clients: int, extra: list[str]) -> list[str]:
    """The Hydra overrides of the run with ``clients`` clients."""
    return [*BASE, f"simulation.num_clients={clients}", *extra]


def read_point(run_dir: Path) -> dict[str, float]:
    """One run's figures: seconds of the round (wait for replies, distillation, evaluation,
    total), the clients' median local work, the server's peak RSS, the run's wall time."""
    lines = [json.loads(x) for x in (run_dir / "latest" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rounds = [r for r in lines if "round" in r]
    if not rounds:
        raise RunFailed(f"{run_dir}: no round in metrics.jsonl")
    rec = rounds[-1]
    t = rec["timings"]
    distill_s = sum(v for k, v in t.items() if k.endswith("_student_s"))
    work = [i["train_s"] for i in rec["teacher_info"] if "train_s" in i]
    summary = json.loads((run_dir / "latest" / "summary.json").read_text())
    return {
        "clients": len(rec["teacher_info"]),
        "wait_s": float(t.get("replies_wait_s", float("nan"))),
        "distill_s": distill_s,
        "evaluate_s": float(t.get("evaluate_s", 0.0)),
        "round_s": float(sum(t.values())),
        "client_work_median_s": statistics.median(work) if work else float("nan"),
        "peak_rss_mb": float(rec.get("server_memory", {}).get("peak_rss_mb", float("nan"))),
        "run_wall_s": float(summary["wall_s"]),
        "student_acc": float(summary["dfkd_student"]["acc"]),
    }


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ``ys`` against ``xs`` (NaN with fewer than two points)."""
    if len(xs) < 2:
        return float("nan")
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else float("nan")


def table(points: list[dict[str, float]]) -> str:
    """The Markdown table of the points and the per-client slopes."""
    keys = [("wait_s", "wait for replies s"), ("distill_s", "distillation s"), ("evaluate_s", "evaluation s"),
            ("round_s", "round s"), ("client_work_median_s", "one client's local work s (median)"),
            ("peak_rss_mb", "server peak RSS MB"), ("run_wall_s", "whole run s"), ("student_acc", "student Acc")]
    lines = ["| clients | " + " | ".join(title for _, title in keys) + " |", "|---:|" + "---:|" * len(keys)]
    for p in sorted(points, key=lambda p: p["clients"]):
        cells = [f"{100 * p[k]:.1f}" if k == "student_acc" else f"{p[k]:.1f}" if k != "peak_rss_mb" else f"{p[k]:.0f}"
                 for k, _ in keys]
        lines.append(f"| {int(p['clients'])} | " + " | ".join(cells) + " |")
    xs = [p["clients"] for p in points]
    per = [f"{title}: {slope(xs, [p[k] for p in points]):.2f}" for k, title in keys[:4] + keys[5:7]]
    return "\n".join(lines) + "\n\ncost per extra client (least-squares slope): " + "; ".join(per) + "\n"


def plot(points: list[dict[str, float]], path: Path) -> None:
    """Time (stacked: wait for replies, distillation, evaluation) and server peak RSS against N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted(points, key=lambda p: p["clients"])
    xs = [p["clients"] for p in pts]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    bottom = [0.0] * len(pts)
    for key, label in (("wait_s", "wait for replies (Ray + Flower + clients)"), ("distill_s", "server distillation"),
                       ("evaluate_s", "server evaluation")):
        ys = [p[key] for p in pts]
        ax_t.fill_between(xs, bottom, [b + y for b, y in zip(bottom, ys)], alpha=0.6, label=label)
        bottom = [b + y for b, y in zip(bottom, ys)]
    ax_t.plot(xs, bottom, "k.-")
    ax_t.set(xlabel="clients", ylabel="seconds per round", title="round time vs clients")
    ax_t.legend(fontsize=8, loc="upper left")
    ax_m.plot(xs, [p["peak_rss_mb"] for p in pts], "o-")
    ax_m.set(xlabel="clients", ylabel="MB", title="server peak RSS vs clients")
    for ax in (ax_t, ax_m):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=list(DEFAULT_CLIENTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report", action="store_true", help="the table and plot from finished runs; start none")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run (after --)")
    args = parser.parse_args()
    bad = [n for n in args.clients if n < 2]
    if bad:
        parser.error(f"--clients must be at least 2 (two clients are malicious), got {bad}")
    out = ROOT / "outputs" / "sweeps" / "scale_clients"
    archive = None if args.overrides else DEFAULT_ARCHIVE
    out.mkdir(parents=True, exist_ok=True)
    points, failures = [], []
    for n in args.clients:
        try:
            summary = run_one(out, f"clients{n}", point_overrides(n, args.overrides), args.seed,
                              resume=True, report_only=args.report, archive=archive)
            points.append(read_point(Path(summary["_dir"])))
        except RunFailed as err:
            failures.append(f"{n} clients: {str(err).splitlines()[0][:160]}")
        text = table(points) if points else "no finished run yet\n"
        write_results_md(out, text, failures, archive, args.report)
    print(text)
    if failures:
        print("\n".join(failures))
    if points and not args.overrides:
        plot(points, FIGURE)
        print(f"plot: {FIGURE.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
