"""PNG plots of Acc and ASR per round for every role recorded in ``metrics.jsonl``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

ROLES = ("ensemble", "fedavg", "dfkd_student", "abd_student", "sv_student", "sr_student")


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
                ax.plot(rounds, [None if f is None else 100 * f for f in floors], "k:", label="ASR floor (student)")
        ax.set_xlabel("round")
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
