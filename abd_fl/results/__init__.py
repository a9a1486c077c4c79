"""Run outputs: directory and files, the results table, plots."""

from abd_fl.results.plots import plot_rounds, plot_summary
from abd_fl.results.report import finish_run
from abd_fl.results.run_dir import RunDir
from abd_fl.results.table import ROLE_ORDER, markdown_table, print_table

__all__ = ["RunDir", "finish_run", "plot_rounds", "plot_summary", "markdown_table", "print_table", "ROLE_ORDER"]
