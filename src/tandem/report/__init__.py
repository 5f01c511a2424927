"""Run reports: results.json, report.md (a table) and a plot of accuracy against cost."""
from .plot import pareto_front, plot_accuracy_vs_cost
from .results import write_report, markdown_table

__all__ = ["write_report", "markdown_table", "plot_accuracy_vs_cost", "pareto_front"]
