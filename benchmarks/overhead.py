"""Wall-time overhead of ABD over the undefended data-free KD, measured side by side.

For one poisoned teacher (the paper's setting) and for the FL ensemble of client teachers,
runs the same ZSKT distillation (same seed, budgets and teachers) without a defense and
with ABD, alternating the order over ``--repeats`` runs, and prints the wall times, the
ratio ABD / baseline and where ABD's time goes (its ``defense_s``).

    .venv/bin/python benchmarks/overhead.py --iterations 100 --repeats 2
    .venv/bin/python benchmarks/overhead.py --defense abd_ti --iterations 500 --repeats 1

``--defense`` picks the defended arm (``abd``, ``abd_ti``, ``sv``, ``sr``). ``abd_ti``'s class
scans cost the same whatever the run's length, so time it at the full 500 iterations.

Targets (issue 3): ratio <= 1.10 for one teacher, <= 1.25 for the ensemble.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from abd_fl.experiment import (
    build_bundle,
    build_defense,
    build_named_model,
    build_synthesizer_from_config,
    distill_config,
)
from abd_fl.local_update import client_train_data
from abd_fl.centralized import train_poisoned_teacher
from abd_fl.distill import distill
from abd_fl.paths import compose_config
from abd_fl.train import train_classifier


def fl_teachers(cfg: dict) -> list[torch.nn.Module]:
    bundle = build_bundle(cfg)
    sim = cfg["simulation"]
    teachers = []
    for pid in range(int(sim["num_clients"])):
        data, _ = client_train_data(cfg, pid)
        model = build_named_model(cfg, bundle, "client")
        train_classifier(model, data, epochs=int(sim["local_epochs"]), lr=float(sim["local_lr"]),
                         batch_size=int(sim["local_batch_size"]), seed=int(cfg["seed"]) * 1000 + pid)
        teachers.append(model.eval())
    return teachers


def time_pair(cfg: dict, teachers: list[torch.nn.Module], repeats: int, defense: str = "abd") -> dict:
    bundle = build_bundle(cfg)
    walls: dict[str, list[float]] = {"none": [], defense: []}
    defense_s: list[float] = []
    reports = []
    for r in range(repeats):
        for name in (("none", defense) if r % 2 == 0 else (defense, "none")):
            student = build_named_model(cfg, bundle, "student")
            dcfg = distill_config(cfg)
            t0 = time.perf_counter()
            result = distill(teachers, student, build_synthesizer_from_config(cfg), defense=build_defense(cfg, name, dcfg.seed),
                             config=dcfg, image_shape=bundle.train.shape)
            walls[name].append(time.perf_counter() - t0)
            if name == defense:
                defense_s.append(result.defense_s)
                reports.append(result.defense_report)
    base, abd = statistics.median(walls["none"]), statistics.median(walls[defense])
    inversion = reports[-1].get("inversion") or {}
    return {"baseline_s": base, "abd_s": abd, "ratio": abd / base, "defense_s": statistics.median(defense_s),
            "vaccines_found": reports[-1].get("vaccines_found"), "sr_active": reports[-1].get("sr_active"),
            "suspects": inversion.get("suspects", "-")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--defense", default="abd", choices=["abd", "abd_ti", "sv", "sr"])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both settings")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = [f"distill.iterations={args.iterations}", f"defense={args.defense}", *args.overrides]
    rows = []
    central = compose_config(["experiment=central", *base])
    rows.append(("one teacher (centralized)", time_pair(central, [train_poisoned_teacher(central, torch.device("cpu"))], args.repeats,
                                                                args.defense)))
    fl = compose_config(base)
    rows.append((f"ensemble of {fl['simulation']['num_clients']} client teachers", time_pair(fl, fl_teachers(fl), args.repeats, args.defense)))
    print(f"\ndefense={args.defense} overhead, ZSKT {args.iterations} iterations, median of {args.repeats} alternating runs, "
          f"{args.threads} threads")
    print("| setting | baseline s | defended s | ratio defended/baseline | defense_s | vaccines found | SR active | suspects |")
    print("|---|---:|---:|---:|---:|---:|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['baseline_s']:.1f} | {r['abd_s']:.1f} | {r['ratio']:.2f} | {r['defense_s']:.1f} | "
              f"{r['vaccines_found']} | {r['sr_active']} | {r['suspects']} |")


if __name__ == "__main__":
    main()
