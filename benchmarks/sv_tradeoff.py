"""Issue 12, item 3: the Shuffling Vaccine's accuracy / ASR trade-off, centralized ZSKT.

Runs ``abd-fl experiment=central`` with ``defense=sv`` (SV only; ``search=off`` by default,
i.e. SV from step 0 as the reference's CIFAR-10 runs) for a grid of SV settings (and a few
points with SR: ``sr_only``, ``abd``, ``abd_bw``), beside the undefended baseline of the same
teacher and seed, and writes every run's Acc / ASR / floor
and the vaccine's flag rate on target-labelled vs other generator samples to
``<out>/results.jsonl`` as it finishes; ``--report`` rebuilds ``results.md`` and the figure
(``docs/figures/sv_tradeoff.png``) from it.

    .venv/bin/python benchmarks/sv_tradeoff.py --triggers badnets_grid --seeds 0 1 2 --jobs 2
    .venv/bin/python benchmarks/sv_tradeoff.py --report

Each point is a named list of Hydra overrides (``POINTS``); ``--points`` picks some.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from threading import Lock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweep import RunFailed, run_one  # noqa: E402

P = "defense.params"
POINTS: dict[str, list[str]] = {
    "baseline": ["defense=none"],
    "ref": ["defense=sv"],  # coef 0.1, last conv shuffled (model.shuffle_layers=1), 3 shuffles, hard phi
    "coef0.03": ["defense=sv", f"{P}.generator_coef=0.03"],
    "coef0.01": ["defense=sv", f"{P}.generator_coef=0.01"],
    "coef0.3": ["defense=sv", f"{P}.generator_coef=0.3"],
    "layers2": ["defense=sv", "model.shuffle_layers=2"],
    "layers3": ["defense=sv", "model.shuffle_layers=3"],
    "shuffles1": ["defense=sv", f"{P}.num_shuffles=1"],
    "shuffles8": ["defense=sv", f"{P}.num_shuffles=8"],
    "soft": ["defense=sv", f"{P}.mask=soft"],
    "soft_coef0.03": ["defense=sv", f"{P}.mask=soft", f"{P}.generator_coef=0.03"],
    "batchnorm": ["defense=sv", f"{P}.generator_norm=batch"],
    "batchnorm_coef1": ["defense=sv", f"{P}.generator_norm=batch", f"{P}.generator_coef=1.0"],
    "weights": ["defense=sv", f"{P}.weights=paper"],  # + the paper's KD weights on flagged samples (1/10)
    "batchnorm_weights": ["defense=sv", f"{P}.generator_norm=batch", f"{P}.weights=paper"],
    "weights_only": ["defense=sv", f"{P}.generator_coef=0.0", f"{P}.weights=paper"],
    # with Self-Retrospection: SR only, the reference's ABD (SV then SR), and ABD on a calibrated SV
    "sr_only": ["defense=sr"],
    "abd": ["defense=abd"],
    "abd_bw": ["defense=abd", f"{P}.generator_norm=batch", f"{P}.weights=paper"],
    "abd_bnbatch": ["defense=abd", f"{P}.sr_config.bn_mode=batch"],  # SR without updating BN running statistics
    # ours (defense=abd_ti): targeted retrospection + purified teacher inputs + class balance, and its parts
    "abd_ti": ["defense=abd_ti"],
    "balance_only": ["defense=abd_ti", f"{P}.inversion=off"],  # the class-balance term alone: the fair control
    "ti_only": ["defense=abd_ti", f"{P}.class_balance=0.0"],  # targeted retrospection without class balance
}
TARGET = 0  # the configs' attack.target_label
# the regulariser's coefficient, point by point: drawn as one dashed curve in the figure
COEF_CURVE: list[tuple[str, float]] = [("coef0.01", 0.01), ("coef0.03", 0.03), ("ref", 0.1), ("coef0.3", 0.3)]


def flag_rates(run_dir: Path) -> dict[str, float | None]:
    """The SV arm's flag rate on generator samples the teacher labels as the target vs. the rest."""
    metrics = [json.loads(x) for x in (run_dir / "latest" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    for m in metrics:
        per_class = (m.get("defense") or {}).get("flag_rate_per_class")
        if per_class:
            tgt = [c for c in per_class if c["class"] == TARGET]
            rest = [c for c in per_class if c["class"] != TARGET]
            n_rest = sum(c["samples"] for c in rest)
            flagged_rest = sum(c["samples"] * (c["flag_rate"] or 0.0) for c in rest)
            n_tgt = sum(c["samples"] for c in tgt)
            return {
                **inversion_info(metrics),
                "flag_target": tgt[0]["flag_rate"] if tgt else None,
                "flag_other": flagged_rest / n_rest if n_rest else None,
                "target_share": n_tgt / (n_tgt + n_rest) if n_tgt + n_rest else None,
                "flagged_share": m["defense"].get("flagged_share"),
            }
    return inversion_info(metrics)


def inversion_info(metrics: list[dict]) -> dict:
    """The targeted retrospection's outcome (defense=abd_ti): classes suspected per scan, the
    best class's flip-rate ratio to the median class per scan, purified pixels."""
    for m in metrics:
        inv = (m.get("defense") or {}).get("inversion")
        if inv:
            scans = inv.get("scans") or []
            return {"suspects": [s["suspect"] for s in scans], "ratios": [s["ratio"] for s in scans],
                    "purify_pixels": inv.get("purify_pixels")}
    return {}


def attack_overrides(trigger: str) -> list[str]:
    """``clean``: a teacher trained without poison (ASR measured with BadNets grid): the no-attacker control."""
    if trigger == "clean":
        return ["attack=badnets_grid", "attack.poison_rate=0.0"]
    return [f"attack={trigger}"]


def one(out: Path, trigger: str, point: str, seed: int, extra: list[str]) -> dict:
    overrides = ["experiment=central", *attack_overrides(trigger), "clean_kd_reference.enabled=false",
                 "defense.compare_baseline=false", *POINTS[point], *extra]
    summary = run_one(out, f"{trigger}-{point}", overrides, seed, resume=True)
    defense = next(o.split("=", 1)[1] for o in POINTS[point] if o.startswith("defense="))
    arm = "dfkd_student" if defense == "none" else f"{defense}_student"
    row = {"trigger": trigger, "point": point, "seed": seed, "overrides": overrides,
           "teacher": summary["malicious_teacher"], **{k: summary[arm][k] for k in ("acc", "asr", "asr_floor")},
           "wall_s": summary["_wall_s"]}
    row.update(flag_rates(Path(summary["_dir"])))
    return row


ACC_DROP, ASR_MAX = 0.03, 0.05  # issue 12's central target: ASR <= 5% at <= 3 points Acc drop vs the baseline


def _found(row: dict) -> str:
    """What the defense found in one run: abd_ti's suspected classes, or '-'."""
    if "suspects" not in row:
        return "-"
    found = sorted({s for s in row["suspects"] if s is not None})
    return ",".join(map(str, found)) if found else "none"


def report(out: Path, figure: Path | None = None) -> str:
    """``results.md``: the mean (min-max) table, then per trigger and defense each seed against the
    same seed's baseline with the verdict of the central target; and the figure (default
    ``docs/figures/<out's name>.png``)."""
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines() if x.strip()]
    latest: dict[tuple, dict] = {}
    for r in rows:
        latest[(r["trigger"], r["point"], r["seed"])] = r
    rows = list(latest.values())
    lines = ["| trigger | point | n | Acc % | ASR % | floor % | flag rate target / other % | trigger found (per seed) |",
             "|---|---|---:|---|---|---|---|---|"]

    def cell(vals: list[float]) -> str:
        vals = [100 * v for v in vals if v is not None]
        if not vals:
            return "n/a"
        return f"{statistics.mean(vals):.1f}" + (f" ({min(vals):.1f}-{max(vals):.1f})" if len(vals) > 1 else "")

    for trigger in sorted({r["trigger"] for r in rows}):
        for point in POINTS:
            sel = sorted((r for r in rows if r["trigger"] == trigger and r["point"] == point), key=lambda r: r["seed"])
            if not sel:
                continue
            flags = f"{cell([r.get('flag_target') for r in sel])} / {cell([r.get('flag_other') for r in sel])}"
            found = " / ".join(_found(r) for r in sel) if any("suspects" in r for r in sel) else "-"
            lines.append(f"| {trigger} | {point} | {len(sel)} | {cell([r['acc'] for r in sel])} | "
                         f"{cell([r['asr'] for r in sel])} | {cell([r['asr_floor'] for r in sel])} | "
                         f"{flags if point != 'baseline' else '-'} | {found} |")
    lines += ["", f"Per seed against the same seed's baseline (target: ASR <= {100 * ASR_MAX:.0f}% at <= "
              f"{100 * ACC_DROP:.0f} points Acc drop; 'no transfer' where the baseline's ASR is below 50%):", "",
              "| trigger | point | seed | baseline Acc / ASR | Acc / ASR (floor) | Acc drop | target |", "|---|---|---:|---|---|---:|---|"]
    base = {(r["trigger"], r["seed"]): r for r in rows if r["point"] == "baseline"}
    for trigger in sorted({r["trigger"] for r in rows}):
        for point in POINTS:
            if point == "baseline":
                continue
            for r in sorted((r for r in rows if r["trigger"] == trigger and r["point"] == point), key=lambda r: r["seed"]):
                b = base.get((trigger, r["seed"]))
                if b is None:
                    continue
                drop = b["acc"] - r["acc"]
                verdict = ("no transfer" if b["asr"] < 0.5 else
                           "met" if r["asr"] <= ASR_MAX and drop <= ACC_DROP else "missed")
                lines.append(f"| {trigger} | {point} | {r['seed']} | {100 * b['acc']:.1f} / {100 * b['asr']:.1f} | "
                             f"{100 * r['acc']:.1f} / {100 * r['asr']:.1f} ({100 * r['asr_floor']:.1f}) | "
                             f"{100 * drop:+.1f} | {verdict} |")
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    save_figure(rows, figure or ROOT / "docs" / "figures" / f"{out.name}.png")  # sv_tradeoff.png, table4.png, ...
    return text


def save_figure(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    triggers = sorted({r["trigger"] for r in rows})
    fig, axes = plt.subplots(1, len(triggers), figsize=(7.0 * len(triggers), 4.5), squeeze=False)
    present = [p for p in POINTS if any(r["point"] == p for r in rows)]  # colours by the points drawn, so none repeats
    for ax, trigger in zip(axes[0], triggers):
        for i, point in enumerate(present):
            sel = [r for r in rows if r["trigger"] == trigger and r["point"] == point]
            if not sel:
                continue
            acc = [100 * r["acc"] for r in sel]
            asr = [100 * r["asr"] for r in sel]
            ax.errorbar(statistics.mean(acc), statistics.mean(asr),
                        xerr=[[statistics.mean(acc) - min(acc)], [max(acc) - statistics.mean(acc)]],
                        yerr=[[statistics.mean(asr) - min(asr)], [max(asr) - statistics.mean(asr)]],
                        fmt="s" if point == "baseline" else "o^vD"[i % 4], color=plt.cm.tab20(i % 20), capsize=3,
                        label=f"{point} (n={len(sel)})")
        base = [100 * r["acc"] for r in rows if r["trigger"] == trigger and r["point"] == "baseline"]
        if base:  # the central target: ASR <= 5% at <= 3 points below the baseline's mean Acc
            ax.fill_between([statistics.mean(base) - 100 * ACC_DROP, 100], -1, 100 * ASR_MAX, color="tab:green",
                            alpha=0.15, zorder=0, label="target (vs baseline mean)")
        curve = [(coef, [r for r in rows if r["trigger"] == trigger and r["point"] == point])
                 for point, coef in COEF_CURVE]
        curve = [(coef, sel) for coef, sel in curve if sel]
        if len(curve) >= 2:  # the coefficient's trade-off: means joined in coefficient order
            xs = [statistics.mean(100 * r["acc"] for r in sel) for _, sel in curve]
            ys = [statistics.mean(100 * r["asr"] for r in sel) for _, sel in curve]
            ax.plot(xs, ys, "--", color="0.4", lw=1, zorder=0, label="SV coefficient (mean)")
            for (coef, _), x, y in zip(curve, xs, ys):
                ax.annotate(f"{coef:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color="0.3")
        ax.set_xlabel("clean accuracy % (mean, min-max over seeds)")
        ax.set_ylabel("ASR %")
        ax.set_title(f"SV / SR variants, central ZSKT, {trigger}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--triggers", nargs="+", default=["badnets_grid"], help="attack configs, or clean (no poison)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--points", nargs="+", default=list(POINTS), choices=list(POINTS))
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (each with one torch thread)")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "sv_tradeoff")
    parser.add_argument("--report", action="store_true", help="rebuild results.md and the figure only")
    parser.add_argument("--figure", type=Path, default=None,
                        help="where the figure goes (default docs/figures/<--out's name>.png)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report:
        print(report(args.out, args.figure))
        return
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    lock = Lock()
    jobs = [(t, p, s) for s in args.seeds for t in args.triggers for p in args.points]
    failed = 0
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(one, args.out, t, p, s, args.overrides): (t, p, s) for t, p, s in jobs}
        for fut in as_completed(futures):
            try:
                row = fut.result()
            except RunFailed as err:
                failed += 1
                print(f"FAILED {futures[fut]}: {str(err)[:300]}", flush=True)
                continue
            with lock, (args.out / "results.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{row['trigger']} {row['point']} seed {row['seed']}: acc {row['acc']:.3f} asr {row['asr']:.3f} "
                  f"floor {row['asr_floor']:.3f} flags {row.get('flag_target')}/{row.get('flag_other')} "
                  f"({row['wall_s']:.0f} s)", flush=True)
    print(report(args.out, args.figure))
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
