"""Speed and scale of the server's distillation (issue 16), measured side by side in one run.

    .venv/bin/python benchmarks/perf.py                       # every part, 2 threads
    .venv/bin/python benchmarks/perf.py --parts loop scale    # a subset

Parts (each prints a Markdown table):

* ``loop``: the project's distillation (:func:`abd_fl.distill.distill`, the default ZSKT
  settings, one teacher, no defense) against a bare PyTorch loop written below that does
  the same passes with the same modules and settings (per iteration: one generator step
  through student and teacher, gradient clipped, then ``student_steps`` student steps on
  the generator's images of the same z, the teacher's logits computed once); alternating
  order, median of ``--repeats``. Target (issue 16): ratio <= 1.10.
* ``levers``: what the layout of the convolutions buys (``distill.memory_format``
  ``contiguous`` vs ``channels_last``, our loop, baseline and ABD, one teacher and the
  6-client ensemble), and every lever on the bare loop: ``torch.inference_mode`` for the
  teacher's no-grad pass, ``torch.compile``, channels-last, channels-last with compile.
* ``fixed``: the clean-KD reference (fixed inputs) with the teachers' targets computed once
  per image and looked up, against computed on every student step (the loop before).
* ``abd``: ABD / baseline wall time for one poisoned teacher and the FL ensemble
  (:mod:`benchmarks.overhead`'s pairs; teachers trained first). Targets <= 1.10 and <= 1.25.
* ``profile``: where ABD's extra time goes (cProfile of one ABD distillation with the
  default settings, one teacher and the 6-client ensemble, untrained teachers): the
  vaccine's generator term, Self-Retrospection's steps (delta search and hypergradient),
  the vaccine's scoring, against the undefended passes of the same run.
* ``scale``: the server's seconds per distillation iteration and its peak memory for 6, 24
  and 100 client teachers (the default ``cnn`` client model, untrained: the cost does not
  depend on the weights), teachers run one by one (``distill.ensemble_vectorize=off``) and
  as one ``vmap``-ed call (``on``); each point in a fresh process (peak RSS of that
  process); the slope (seconds per extra teacher per iteration) of each. And the vaccine
  search's seconds per teacher (:func:`abd_fl.defense.vaccine.search_vaccine` with the
  default ABD settings on ``surrogate_batches`` generator-sized batches).
* ``floor``: why vectorising cannot cut the slope 3x on a CPU: the floating-point work one
  extra teacher adds to a distillation iteration (``torch.utils.flop_counter`` over whole
  :func:`abd_fl.distill.distill` calls with 2 and 4 teachers), and the rate this CPU does
  that teacher's passes at (forward with input gradient, backward, no-grad forward) with
  the distillation batch and with 8x and 32x that batch, as one stacked ensemble would see
  it. The work divided by the best rate is the slope of an ideal vectorised forward; the
  loop's slope (part ``scale``, when run in the same call) over it bounds what any
  vectorising can gain here.
* ``memory``: what one extra client teacher adds to the server's memory during a
  distillation step: its weights, and the tensors autograd keeps from its forward pass for
  the generator's backward (``torch.autograd.graph.saved_tensors_hooks`` over one forward of
  the default ``cnn`` client model at the distillation batch, input requiring grad as in
  the generator step; storages shared between saved tensors counted once). Compare with
  the peak-RSS slope of ``benchmarks/scale_clients.py``.
* ``round``: where a default FL round's time goes, read from a finished run's
  ``metrics.jsonl`` (``--run-dir``; default: the newest run under ``outputs/`` that records
  ``replies_wait_s``): the server's distillation, evaluation and aggregation, the clients'
  local work (``train-s``) and what is left of the wait for replies: Flower + Ray.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from abd_fl.distill import distill  # noqa: E402
from abd_fl.distill.losses import kd_kl_per_sample  # noqa: E402
from abd_fl.distill.settings import distill_settings  # noqa: E402
from abd_fl.experiment import build_bundle, build_named_model, distill_config  # noqa: E402
from abd_fl.models.generators import ConvGenerator  # noqa: E402
from abd_fl.paths import compose_config  # noqa: E402

PARTS = ("loop", "levers", "fixed", "abd", "profile", "scale", "floor", "round", "memory")


# ---- (a) our loop vs a bare loop -----------------------------------------------------------
def bare_zskt(
    teacher: torch.nn.Module, student: torch.nn.Module, cfg: dict, image_shape: tuple[int, int, int], lever: str = "none"
) -> None:
    """The passes of our ZSKT distillation written as a plain PyTorch loop (no defense, no
    hooks, no logging): what :func:`loop_vs_bare` compares :func:`abd_fl.distill.distill` with.

    ``lever`` (part ``levers``): ``none`` (the plain loop), ``inference_mode`` for the
    teacher's no-grad pass, ``compile`` (``torch.compile`` of generator, student and teacher;
    the first call compiles), ``channels_last`` (the three modules' 4-D weights channels-last,
    as ``distill.memory_format``) or ``channels_last+compile``. The teacher is left as it was."""
    d = cfg["distill"]
    sp = d["synthesizer_params"]
    dcfg = distill_config(cfg)
    iterations, steps, batch = dcfg.iterations, dcfg.student_steps, dcfg.batch_size
    torch.manual_seed(dcfg.seed)
    c, h, _ = image_shape
    gen = ConvGenerator(int(sp["z_dim"]), h, c, int(d.get("generator_width") or 64), sp["output_activation"])
    g_opt = torch.optim.Adam(gen.parameters(), lr=float(sp["lr"]))
    g_sched = torch.optim.lr_scheduler.CosineAnnealingLR(g_opt, max(1, iterations))
    s_opt = torch.optim.Adam(student.parameters(), lr=dcfg.lr)
    s_sched = torch.optim.lr_scheduler.CosineAnnealingLR(s_opt, max(1, iterations * steps))
    teacher.eval().requires_grad_(False)
    if lever.startswith("channels_last"):
        for module in (gen, student, teacher):
            module.to(memory_format=torch.channels_last)
    G, S, T = (torch.compile(m) for m in (gen, student, teacher)) if lever.endswith("compile") else (gen, student, teacher)
    no_grad = torch.inference_mode if lever == "inference_mode" else torch.no_grad
    for _ in range(iterations):
        gen.train()
        student.eval()
        z = torch.randn(batch, int(sp["z_dim"]))
        x = G(z)
        loss = -kd_kl_per_sample(S(x), T(x), float(sp["temperature"]), sp["kl_reduction"]).mean()
        g_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(gen.parameters(), float(sp["clip_grad_norm"]))
        g_opt.step()
        g_sched.step()
        student.zero_grad(set_to_none=True)
        student.train()
        with no_grad():
            xs = G(z)
            t_logits = T(xs)
        if lever == "inference_mode":  # inference tensors cannot be saved for the student's backward
            xs, t_logits = xs.clone(), t_logits.clone()
        for _ in range(steps):
            loss = kd_kl_per_sample(S(xs), t_logits, dcfg.temperature, dcfg.kl_reduction).mean()
            s_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), float(dcfg.clip_grad_norm))
            s_opt.step()
            s_sched.step()


def loop_vs_bare(iterations: int, repeats: int) -> list[str]:
    cfg = compose_config([f"distill.iterations={iterations}", "defense=none"])
    bundle = build_bundle(cfg)
    teacher = build_named_model(cfg, bundle, "client", seed=1).eval()
    walls: dict[str, list[float]] = {"ours": [], "bare": []}
    warm = compose_config(["distill.iterations=2", "defense=none"])  # first calls (allocator, kernels) untimed
    distill([teacher], build_named_model(warm, bundle, "student"), distill_settings(warm["distill"]).build_synthesizer(),
            config=distill_config(warm), image_shape=bundle.train.shape)
    bare_zskt(teacher, build_named_model(warm, bundle, "student"), warm, bundle.train.shape)
    for r in range(repeats):
        for arm in (("ours", "bare") if r % 2 == 0 else ("bare", "ours")):
            student = build_named_model(cfg, bundle, "student")
            t0 = time.perf_counter()
            if arm == "ours":
                distill([teacher], student, distill_settings(cfg["distill"]).build_synthesizer(), config=distill_config(cfg),
                        image_shape=bundle.train.shape)
            else:
                bare_zskt(teacher, student, cfg, bundle.train.shape)
            walls[arm].append(time.perf_counter() - t0)
    ours, bare = statistics.median(walls["ours"]), statistics.median(walls["bare"])
    return [
        f"\n(a) our loop vs a bare PyTorch loop: ZSKT, {iterations} iterations x {cfg['distill']['student_steps']} student steps, "
        f"one {cfg['model']['client']} teacher, median of {repeats} alternating runs after one untimed warm-up of each",
        "| loop | s | s / iteration | ratio to bare |",
        "|---|---:|---:|---:|",
        f"| bare PyTorch | {bare:.2f} | {bare / iterations:.4f} | 1.00 |",
        f"| abd_fl.distill | {ours:.2f} | {ours / iterations:.4f} | {ours / bare:.2f} |",
    ]


# ---- (a') levers: memory format, inference mode, torch.compile ---------------------------------
def levers(iterations: int, repeats: int, teacher_counts: tuple[int, ...] = (1, 6)) -> list[str]:
    """Our distillation (baseline and ABD, one teacher and the 6-client ensemble, untrained cnn
    teachers) with ``distill.memory_format=contiguous`` (the layout before) and ``channels_last``,
    alternating, median of ``repeats``; then the bare loop with the levers the loop does not
    use (``inference_mode``, ``torch.compile``) against the plain bare loop."""
    from abd_fl.experiment import build_defense

    out = [f"\n(a') levers: ZSKT {iterations} iterations, untrained cnn teachers, median of {repeats} alternating runs",
           "| setting | contiguous s/it | channels_last s/it | speed-up |", "|---|---:|---:|---:|"]
    per_it: dict[tuple[str, int, str], float] = {}
    for defense in ("none", "abd"):
        for n in teacher_counts:
            walls: dict[str, list[float]] = {"contiguous": [], "channels_last": []}
            for r in range(repeats + 1):  # the first round is an untimed warm-up
                for fmt in (("contiguous", "channels_last") if r % 2 == 0 else ("channels_last", "contiguous")):
                    cfg = compose_config([f"distill.iterations={iterations if r else 2}", f"defense={defense}",
                                          f"distill.memory_format={fmt}"])
                    bundle = build_bundle(cfg)
                    teachers = [build_named_model(cfg, bundle, "client", seed=1 + i).eval() for i in range(n)]
                    dcfg = distill_config(cfg)
                    t0 = time.perf_counter()
                    distill(teachers, build_named_model(cfg, bundle, "student"), distill_settings(cfg["distill"]).build_synthesizer(),
                            defense=build_defense(cfg, defense, dcfg.seed) if defense != "none" else None, config=dcfg,
                            image_shape=bundle.train.shape)
                    if r:
                        walls[fmt].append((time.perf_counter() - t0) / iterations)
            for fmt, w in walls.items():
                per_it[(defense, n, fmt)] = statistics.median(w)
            c, cl = per_it[(defense, n, "contiguous")], per_it[(defense, n, "channels_last")]
            label = f"{'ABD' if defense == 'abd' else 'baseline'}, {n} teacher{'s' if n > 1 else ''}"
            out.append(f"| {label} | {c:.4f} | {cl:.4f} | {c / cl:.2f}x |")
    for n in teacher_counts:
        out.append(f"| ABD / baseline, {n} teacher{'s' if n > 1 else ''} | "
                   f"{per_it[('abd', n, 'contiguous')] / per_it[('none', n, 'contiguous')]:.2f} | "
                   f"{per_it[('abd', n, 'channels_last')] / per_it[('none', n, 'channels_last')]:.2f} | |")
    cfg = compose_config([f"distill.iterations={iterations}", "defense=none"])
    bundle = build_bundle(cfg)
    teacher = build_named_model(cfg, bundle, "client", seed=1).eval()
    walls = {lever: [] for lever in ("none", "inference_mode", "compile", "channels_last", "channels_last+compile")}
    warm_s: dict[str, float] = {}
    for r in range(repeats + 1):
        for lever in (list(walls) if r % 2 == 0 else list(walls)[::-1]):
            t0 = time.perf_counter()
            bare_zskt(copy.deepcopy(teacher), build_named_model(cfg, bundle, "student"), cfg if r else compose_config(
                ["distill.iterations=2", "defense=none"]), bundle.train.shape, lever)
            if r:
                walls[lever].append((time.perf_counter() - t0) / iterations)
            else:
                warm_s[lever] = time.perf_counter() - t0
    plain = statistics.median(walls["none"])
    out += ["", "| bare loop, one teacher | s/it | speed-up | first 2 iterations s (compiling) |", "|---|---:|---:|---:|"]
    out += [f"| {'plain (contiguous)' if lever == 'none' else lever} | {statistics.median(walls[lever]):.4f} | "
            f"{plain / statistics.median(walls[lever]):.2f}x | {warm_s[lever]:.1f} |" for lever in walls]
    return out


def fixed_targets(iterations: int, repeats: int, teachers: int = 6) -> list[str]:
    """The clean-KD reference's distillation (the default run's images and budget per
    iteration, ``teachers`` untrained cnn teachers) with the teachers' targets looked up
    (computed once per image, the loop's default for fixed inputs) against computed on every
    student step (the loop before), alternating, median of ``repeats``."""
    import abd_fl.distill.loop as loop_module
    from abd_fl.clean_kd_reference import distill_clean_kd_reference

    cfg = compose_config([f"clean_kd_reference.iterations={iterations}"])
    bundle = build_bundle(cfg)
    models = [build_named_model(cfg, bundle, "client", seed=1 + i).eval() for i in range(teachers)]
    lookup = loop_module._fixed_targets
    walls: dict[str, list[float]] = {"per step": [], "once": []}
    for r in range(repeats + 1):  # the first round is an untimed warm-up
        for arm in (("per step", "once") if r % 2 == 0 else ("once", "per step")):
            loop_module._fixed_targets = lookup if arm == "once" else (lambda *_args: None)
            try:
                t0 = time.perf_counter()
                distill_clean_kd_reference(cfg, bundle, models, "cpu")
                if r:
                    walls[arm].append(time.perf_counter() - t0)
            finally:
                loop_module._fixed_targets = lookup
    before, after = statistics.median(walls["per step"]), statistics.median(walls["once"])
    n = round(float(cfg["clean_kd_reference"]["fraction"]) * len(bundle.train))
    return [f"\n(a'') the clean-KD reference: {n} clean images, {iterations} iterations x "
            f"{cfg['clean_kd_reference']['student_steps']} student steps, {teachers} untrained cnn teachers, "
            f"median of {repeats} alternating runs",
            "| teachers' targets | s | speed-up |", "|---|---:|---:|",
            f"| computed on every student step (before) | {before:.1f} | 1.00x |",
            f"| computed once per image, looked up | {after:.1f} | {before / after:.2f}x |"]


# ---- (b) ABD / baseline ------------------------------------------------------------------
def abd_overhead(iterations: int, repeats: int) -> list[str]:
    from abd_fl.centralized import train_poisoned_teacher
    from benchmarks.overhead import fl_teachers, time_pair

    base = [f"distill.iterations={iterations}", "defense=abd"]
    central = compose_config(["experiment=central", *base])
    fl = compose_config(base)
    rows = [
        ("one teacher (centralized)", time_pair(central, [train_poisoned_teacher(central, torch.device("cpu"))], repeats)),
        (f"ensemble of {fl['simulation']['num_clients']} client teachers", time_pair(fl, fl_teachers(fl), repeats)),
    ]
    out = [f"\n(b) ABD / baseline: ZSKT {iterations} iterations, median of {repeats} alternating runs",
           "| setting | baseline s | ABD s | ratio | ABD's own s (defense_s) |", "|---|---:|---:|---:|---:|"]
    out += [f"| {name} | {r['baseline_s']:.1f} | {r['abd_s']:.1f} | {r['ratio']:.2f} | {r['defense_s']:.1f} |" for name, r in rows]
    return out


# ---- (b') where ABD's time goes ----------------------------------------------------------------
PROFILED = {  # (file suffix, function name) -> label
    ("abd_fl/defense/abd.py", "_sv_term"): "SV: the vaccine's generator term",
    ("abd_fl/defense/abd.py", "add_student_gradient"): "SR: delta search + hypergradient",
    ("abd_fl/defense/retrospection.py", "synthesize_delta"): "  of which the delta search",
    ("abd_fl/defense/retrospection.py", "_hypergradient"): "  of which the hypergradient",
    ("abd_fl/defense/abd.py", "on_iteration"): "vaccine scoring (once, for the report and detection AUC) or search",
    ("abd_fl/distill/synthesizers/zskt.py", "generator_round"): "generator steps (SV term included)",
}


def abd_profile(iterations: int, teacher_counts: tuple[int, ...] = (1, 6)) -> list[str]:
    import cProfile
    import pstats

    from abd_fl.experiment import build_defense

    out = [f"\n(b') where ABD's time goes: cProfile of one ABD distillation, ZSKT {iterations} iterations (SR in the last "
           "sr_fraction of them, as at 500), untrained cnn teachers",
           "| part | " + " | ".join(f"{n} teacher{'s' if n > 1 else ''} s (share)" for n in teacher_counts) + " |",
           "|---|" + "---:|" * len(teacher_counts)]
    columns = []
    for n in teacher_counts:
        cfg = compose_config([f"distill.iterations={iterations}", "defense=abd"])
        bundle = build_bundle(cfg)
        teachers = [build_named_model(cfg, bundle, "client", seed=1 + i).eval() for i in range(n)]
        dcfg = distill_config(cfg)
        prof = cProfile.Profile()
        prof.enable()
        result = distill(teachers, build_named_model(cfg, bundle, "student"), distill_settings(cfg["distill"]).build_synthesizer(),
                         defense=build_defense(cfg, "abd", dcfg.seed), config=dcfg, image_shape=bundle.train.shape)
        prof.disable()
        stats = pstats.Stats(prof).stats
        found = {label: 0.0 for label in PROFILED.values()}
        for (filename, _line, func), (_cc, _nc, _tt, cum, _callers) in stats.items():
            for (suffix, name), label in PROFILED.items():
                if func == name and filename.endswith(suffix):
                    found[label] += cum
        found["defense total (defense_s)"] = result.defense_s
        found["whole distillation"] = result.wall_s
        columns.append(found)
    for label in columns[0]:
        cells = [f"{c[label]:.1f} ({c[label] / c['whole distillation']:.0%})" for c in columns]
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return out


# ---- (c) scaling in the number of teachers ------------------------------------------------
def scale_point(teachers: int, vectorize: str, iterations: int) -> dict[str, float]:
    """One point, run in this (fresh) process: seconds per iteration and peak RSS."""
    cfg = compose_config([f"distill.iterations={iterations}", "defense=none", f"distill.ensemble_vectorize={vectorize}"])
    bundle = build_bundle(cfg)
    models = [build_named_model(cfg, bundle, "client", seed=100 + i).eval() for i in range(teachers)]
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    student = build_named_model(cfg, bundle, "student")
    warm = compose_config(["distill.iterations=1", "defense=none", f"distill.ensemble_vectorize={vectorize}"])
    distill(models, build_named_model(cfg, bundle, "student"), distill_settings(warm["distill"]).build_synthesizer(),
            config=distill_config(warm), image_shape=bundle.train.shape)
    t0 = time.perf_counter()
    distill(models, student, distill_settings(cfg["distill"]).build_synthesizer(), config=distill_config(cfg),
            image_shape=bundle.train.shape)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    weights_mb = sum(p.numel() * p.element_size() for m in models for p in m.state_dict().values()) / 2**20
    return {"s_per_it": wall / iterations, "peak_rss_mb": peak / 1024, "rss_before_mb": rss_before / 1024,
            "teacher_weights_mb": weights_mb}


def vaccine_search_seconds(teachers: int) -> float:
    from abd_fl.defense.settings import defense_settings
    from abd_fl.defense.vaccine import search_vaccine

    cfg = compose_config([])
    params = defense_settings(cfg["defense"]).params
    bundle = build_bundle(cfg)
    models = [build_named_model(cfg, bundle, "client", seed=200 + i).eval() for i in range(teachers)]
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(int(cfg["distill"]["batch_size"]), *bundle.train.shape, generator=g)
               for _ in range(int(params.surrogate_batches))]
    t0 = time.perf_counter()
    for i, m in enumerate(models):
        search_vaccine(m, batches, num_layers=int(params.num_layers), num_shuffles=int(params.num_shuffles),
                       threshold=float(params.threshold), max_tries=int(params.max_tries), seed=i)
    return (time.perf_counter() - t0) / teachers


def _slope(xs: list[int], ys: list[float]) -> float:
    mx, my = statistics.mean(xs), statistics.mean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


LAST_LOOP_SLOPE: list[float] = []  # the loop's slope from part scale, for part floor


def scaling(counts: list[int], iterations: int, threads: int) -> list[str]:
    points: dict[tuple[int, str], dict] = {}
    for n in counts:
        for vec in ("off", "on"):
            proc = subprocess.run([sys.executable, __file__, "--_point", str(n), vec, "--iterations", str(iterations),
                                   "--threads", str(threads)], capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"scaling point {n} teachers, vectorize={vec} failed:\n{proc.stderr[-3000:]}")
            points[(n, vec)] = json.loads(proc.stdout.strip().splitlines()[-1])
    out = [f"\n(c) server distillation vs number of client teachers: ZSKT, {iterations} timed iterations after one warm-up, "
           "no defense, each point a fresh process",
           "| teachers | teachers' weights MB | loop s/it | vmap s/it | vmap / loop | loop peak RSS MB | vmap peak RSS MB |",
           "|---:|---:|---:|---:|---:|---:|---:|"]
    for n in counts:
        a, b = points[(n, "off")], points[(n, "on")]
        out.append(f"| {n} | {a['teacher_weights_mb']:.1f} | {a['s_per_it']:.3f} | {b['s_per_it']:.3f} | "
                   f"{b['s_per_it'] / a['s_per_it']:.2f} | {a['peak_rss_mb']:.0f} | {b['peak_rss_mb']:.0f} |")
    if len(counts) > 1:
        s_off = _slope(counts, [points[(n, "off")]["s_per_it"] for n in counts])
        s_on = _slope(counts, [points[(n, "on")]["s_per_it"] for n in counts])
        LAST_LOOP_SLOPE.append(s_off)
        out.append(f"\nslope, seconds per extra teacher per iteration: loop {s_off:.4f}, vmap {s_on:.4f} "
                   f"(ratio loop / vmap {s_off / s_on:.2f}; target >= 3)")
    per = vaccine_search_seconds(min(6, max(counts)))
    out.append(f"vaccine search (default ABD settings, search on): {per:.2f} s per teacher")
    return out


# ---- (c') the compute floor of one extra teacher -------------------------------------------
def teacher_flops_per_iteration(teacher_counts: tuple[int, int] = (2, 4), iterations: int = 2) -> float:
    """Floating-point operations one extra client teacher adds to a ZSKT iteration
    (default settings, no defense): the difference of whole-distillation counts."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = compose_config([f"distill.iterations={iterations}", "defense=none"])
    bundle = build_bundle(cfg)
    totals = []
    for n in teacher_counts:
        models = [build_named_model(cfg, bundle, "client", seed=100 + i).eval() for i in range(n)]
        with FlopCounterMode(display=False) as counter:
            distill(models, build_named_model(cfg, bundle, "student"), distill_settings(cfg["distill"]).build_synthesizer(),
                    config=distill_config(cfg), image_shape=bundle.train.shape)
        totals.append(counter.get_total_flops() / iterations)
    return (totals[1] - totals[0]) / (teacher_counts[1] - teacher_counts[0])


def teacher_pass_rate(batch: int, repeats: int) -> dict[str, float]:
    """One client teacher's passes of a distillation iteration at ``batch`` images (forward
    with input gradient and its backward, then a no-grad forward): FLOPs, seconds, rate."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = compose_config(["defense=none"])
    bundle = build_bundle(cfg)
    teacher = build_named_model(cfg, bundle, "client", seed=1).eval().requires_grad_(False)
    x = torch.rand(batch, *bundle.train.shape, generator=torch.Generator().manual_seed(0))

    def passes() -> None:
        teacher(x.clone().requires_grad_(True)).sum().backward()
        with torch.no_grad():
            teacher(x)

    with FlopCounterMode(display=False) as counter:
        passes()
    passes()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        passes()
    seconds = (time.perf_counter() - t0) / repeats
    flops = float(counter.get_total_flops())
    return {"batch": batch, "flops": flops, "seconds": seconds, "gflops": flops / seconds / 1e9}


def compute_floor(loop_slope_s: float | None, multiples: tuple[int, ...] = (1, 8, 32)) -> list[str]:
    per_teacher = teacher_flops_per_iteration()
    batch = int(compose_config([])["distill"]["batch_size"])
    rates = [teacher_pass_rate(batch * m, repeats=max(3, 32 // m)) for m in multiples]
    out = ["\n(c') the compute floor of one extra client teacher (default cnn teacher, ZSKT, no defense)",
           f"work per extra teacher per iteration: {per_teacher / 1e6:.0f} MFLOP (flop counter, whole distill() calls)",
           "| images per call | MFLOP | ms | GFLOP/s | ms per distillation batch |", "|---:|---:|---:|---:|---:|"]
    for r in rates:
        out.append(f"| {r['batch']} | {r['flops'] / 1e6:.0f} | {1e3 * r['seconds']:.1f} | {r['gflops']:.1f} | "
                   f"{1e3 * r['seconds'] * batch / r['batch']:.1f} |")
    best = max(rates, key=lambda r: r["gflops"])
    floor_s = per_teacher / (best["gflops"] * 1e9)
    out.append(f"\nfloor of an ideal vectorised ensemble: {1e3 * floor_s:.1f} ms per extra teacher per iteration "
               f"(the work at the best rate, {best['gflops']:.1f} GFLOP/s at {best['batch']} images)")
    if loop_slope_s is not None:
        out.append(f"loop slope (part scale) {1e3 * loop_slope_s:.1f} ms = {loop_slope_s / floor_s:.2f}x that floor: "
                   "the most any vectorising can gain on this CPU (target: a slope 3x smaller)")
    return out


# ---- (e) memory per teacher ---------------------------------------------------------------
def teacher_memory_bytes(batch: int) -> tuple[int, int, int]:
    """(weights, autograd-saved activation bytes, distinct saved storages) of one default client
    teacher's forward at ``batch``, its input requiring grad as in the generator step."""
    cfg = compose_config([])
    bundle = build_bundle(cfg)
    teacher = build_named_model(cfg, bundle, "client", seed=0).eval().requires_grad_(False)
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    x = torch.rand(batch, *bundle.train.shape, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = teacher(x)
    storages.pop(x.untyped_storage().data_ptr(), None)  # the generator's images, shared by every teacher
    for t in teacher.state_dict().values():  # weights saved for the input gradient: counted as weights
        storages.pop(t.untyped_storage().data_ptr(), None)
    del logits
    weights = sum(t.numel() * t.element_size() for t in teacher.state_dict().values())
    return weights, sum(storages.values()), len(storages)


def teacher_memory(batch: int | None = None) -> list[str]:
    """Part ``memory``'s table: one teacher's weights and saved activations, in MiB."""
    cfg = compose_config([])
    batch = int(batch or cfg["distill"]["batch_size"])
    weights, saved, n = teacher_memory_bytes(batch)
    return [f"\n(e) server memory per client teacher: default `{cfg['model']['client']}` client model, "
            f"distillation batch {batch}",
            "| weights MB | activations autograd keeps for the generator's backward MB (distinct storages) | total MB |",
            "|---:|---:|---:|",
            f"| {weights / 2**20:.2f} | {saved / 2**20:.2f} ({n}) | {(weights + saved) / 2**20:.2f} |"]


# ---- (d) a default round's time -------------------------------------------------------------
def _newest_run_with_waits() -> Path | None:
    found = []
    for metrics in (ROOT / "outputs").rglob("metrics.jsonl"):
        try:
            first = json.loads(metrics.read_text().splitlines()[0])
        except (IndexError, json.JSONDecodeError, OSError):
            continue
        if "replies_wait_s" in first.get("timings", {}) and (metrics.parent / "summary.json").exists():
            found.append((metrics.stat().st_mtime, metrics.parent))
    return max(found)[1] if found else None


def round_shares(run_dir: Path | None) -> list[str]:
    import yaml

    run_dir = run_dir or _newest_run_with_waits()
    if run_dir is None:
        return ["\n(d) no finished run records replies_wait_s yet (runs made before this benchmark existed do not)"]
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    slots = max(1, int((os.cpu_count() or 1) // max(1e-9, float(cfg["simulation"]["client_resources"]["num_cpus"]))))
    out = [f"\n(d) where a round's time goes: {run_dir.relative_to(ROOT) if run_dir.is_relative_to(ROOT) else run_dir} "
           f"({cfg['simulation']['num_clients']} clients, {slots} at a time on this machine's {os.cpu_count()} CPUs)",
           "| round | round s | server KD + evaluation s | clients' local work s (critical path) | Flower + Ray s (at most) | Flower + Ray share |",
           "|---:|---:|---:|---:|---:|---:|"]
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "round" not in rec:
            continue
        t = rec["timings"]
        if "replies_wait_s" not in t:
            out.append(f"| {rec['round']} | not recorded (a run made before replies_wait_s existed) | | | | |")
            continue
        server = sum(v for k, v in t.items() if k != "replies_wait_s")
        work = [i["train_s"] for i in rec["teacher_info"] if "train_s" in i]
        critical = max(max(work, default=0.0), sum(work) / slots)
        flower = max(0.0, t["replies_wait_s"] - critical)
        total = t["replies_wait_s"] + server
        out.append(f"| {rec['round']} | {total:.1f} | {server:.1f} | {critical:.1f} | {flower:.1f} | {flower / total:.1%} |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--iterations", type=int, default=50, help="distillation iterations per timed run (loop, abd)")
    parser.add_argument("--profile-iterations", type=int, default=100, help="ABD iterations profiled (part profile)")
    parser.add_argument("--fixed-iterations", type=int, default=200,
                        help="clean-KD reference iterations per timed run (part fixed; 200 = the default run's)")
    parser.add_argument("--scale-iterations", type=int, default=5, help="timed iterations per scaling point")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--teachers", type=int, nargs="+", default=[6, 24, 100])
    parser.add_argument("--loop-slope", type=float, default=None,
                        help="part floor without part scale: the loop's measured slope, seconds per teacher per iteration")
    parser.add_argument("--run-dir", type=Path, default=None, help="the finished FL run of part 'round'")
    parser.add_argument("--_point", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args._point:
        print(json.dumps(scale_point(int(args._point[0]), args._point[1], args.iterations)))
        return
    print(f"benchmarks/perf.py on {os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} threads, "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    for part in args.parts:
        if part == "loop":
            lines = loop_vs_bare(args.iterations, args.repeats)
        elif part == "levers":
            lines = levers(args.iterations, args.repeats)
        elif part == "fixed":
            lines = fixed_targets(args.fixed_iterations, args.repeats)
        elif part == "abd":
            lines = abd_overhead(args.iterations, args.repeats)
        elif part == "profile":
            lines = abd_profile(args.profile_iterations)
        elif part == "scale":
            lines = scaling(sorted(args.teachers), args.scale_iterations, args.threads)
        elif part == "floor":
            lines = compute_floor(LAST_LOOP_SLOPE[-1] if LAST_LOOP_SLOPE else args.loop_slope)
        elif part == "memory":
            lines = teacher_memory()
        else:
            lines = round_shares(args.run_dir)
        print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
