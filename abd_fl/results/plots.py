"""PNG plots of Acc and ASR per round for every role recorded in ``metrics.jsonl``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

ROLES = ("ensemble", "fedavg", "dfkd_student", "abd_student", "abd_ti_student", "sv_student", "sr_student")


def plot_rounds(records: Sequence[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """Write ``acc.png`` and ``asr.png`` (one line per role over rounds); returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    rounds = [r["round"] for r in records if "round" in r]
    paths = []
    for metric, label in (("acc", "clean accuracy (%)"), ("asr", "attack success rate (%)")):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for role in ROLES:
            ys = [r.get(role, {}).get(metric) for r in records if "round" in r]
            if any(y is not None for y in ys):
                ax.plot(rounds, [None if y is None else 100 * y for y in ys], marker="o", label=role)
        if metric == "asr":
            floors = [r.get("dfkd_student", {}).get("asr_floor") for r in records if "round" in r]
            if any(f is not None for f in floors):
                ax.plot(rounds, [None if f is None else 100 * f for f in floors], "k:", marker="x", label="ASR floor (student)")
        ax.set_xlabel("round")
        ax.set_xticks(rounds)
        ax.set_ylabel(label)
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{metric}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_summary(summary: dict[str, Any], out_dir: str | Path) -> Path:
    """``summary.png``: Acc, ASR and ASR floor of every role of the run, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from abd_fl.results.table import ROLE_ORDER

    roles = [r for r in ROLE_ORDER if isinstance(summary.get(r), dict)]
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(roles)), 3.8))
    width = 0.27
    for k, (metric, label) in enumerate((("acc", "Acc"), ("asr", "ASR"), ("asr_floor", "ASR floor"))):
        values = [100 * float(summary[r].get(metric) or 0.0) for r in roles]
        ax.bar([i + (k - 1) * width for i in range(len(roles))], values, width, label=label)
    ax.set_xticks(range(len(roles)))
    ax.set_xticklabels([r.replace("_", "\n") for r in roles], fontsize=7)
    ax.set_ylabel("%")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(out_dir) / "summary.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
