"""The Acc / ASR / ASR-floor table of a run (markdown, and printed with rich)."""

from __future__ import annotations

from typing import Any, Mapping

ROLE_ORDER = (
    "malicious_teacher",
    "benign_teachers",
    "ensemble",
    "fedavg",
    "dfkd_student",
    "abd_student",
    "abd_ti_student",
    "sv_student",
    "sr_student",
    "clean_kd_reference",
)
ROLE_LABELS = {
    "malicious_teacher": "malicious teacher(s)",
    "benign_teachers": "benign teachers (mean)",
    "ensemble": "teacher ensemble",
    "fedavg": "aggregated model (base strategy)",
    "dfkd_student": "data-free KD student",
    "abd_student": "data-free KD student + ABD",
    "abd_ti_student": "data-free KD student + ABD-TI",
    "sv_student": "data-free KD student + SV",
    "sr_student": "data-free KD student + SR",
    "clean_kd_reference": "clean KD reference (20% real data)",
}


def _pct(value: Any) -> str:
    return "n/a" if value is None else f"{100 * float(value):.1f}"


def summary_rows(summary: Mapping[str, Any]) -> list[tuple[str, str, str, str]]:
    rows = []
    for role in ROLE_ORDER:
        if role in summary and isinstance(summary[role], Mapping):
            m = summary[role]
            rows.append((ROLE_LABELS[role], _pct(m.get("acc")), _pct(m.get("asr")), _pct(m.get("asr_floor"))))
    return rows


def markdown_table(summary: Mapping[str, Any]) -> str:
    lines = ["| model | Acc % | ASR % | ASR floor % |", "|---|---:|---:|---:|"]
    lines += [f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} |" for r in summary_rows(summary)]
    return "\n".join(lines) + "\n"


def print_table(summary: Mapping[str, Any], title: str = "Results") -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col, justify in (("model", "left"), ("Acc %", "right"), ("ASR %", "right"), ("ASR floor %", "right")):
        table.add_column(col, justify=justify)
    for row in summary_rows(summary):
        table.add_row(*row)
    Console().print(table)
