"""The HTML validation report: one self-contained file (figures and thumbnails embedded) per run, or
several runs side by side. Reads what `evaluate` wrote; needs no model and no torch.
"""
from taxonomist.report.html import render_report, write_report
from taxonomist.report.runs import RunResults, load_run

__all__ = ["RunResults", "load_run", "render_report", "write_report"]
