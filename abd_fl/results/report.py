"""The end of a run: summary files, plots and the printed table."""

from __future__ import annotations

from abd_fl.results.plots import plot_rounds, plot_summary
from abd_fl.results.run_dir import RunDir
from abd_fl.results.table import markdown_table, print_table


def finish_run(run: RunDir, summary: dict, title: str) -> None:
    """Write ``summary.json``, ``results.md`` and ``summary.png`` (plus the per-round plots
    when the run has rounds) and print the table."""
    run.write_json("summary.json", summary)
    run.write_text("results.md", markdown_table(summary))
    records = run.read_metrics()
    if any("round" in r for r in records):
        plot_rounds(records, run.path)
    plot_summary(summary, run.path)
    print_table(summary, title=title)

