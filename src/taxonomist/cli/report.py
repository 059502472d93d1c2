"""`taxonomist report`: the self-contained HTML report of one evaluated run, or several side by side."""
from __future__ import annotations

EXAMPLE = """\
examples:
  taxonomist report runs/first --out runs/first/report.html
  taxonomist report runs/stock runs/finetuned --out compare.html
  taxonomist report runs/flat runs/multirank runs/flat/min-risk --out compare.html --critical "Amanita phalloides"

Each RUN is a folder written by `taxonomist evaluate` (a run directory or its --out folder): the report reads
its metrics.json and predictions.csv, and its metrics.csv, config.yaml and taxonomy.csv when present. The
images of the galleries come from the evaluated dataset; when it is not on this machine the galleries
show names only. With several runs the first is the baseline: the summary table gives each metric's delta
against it and marks the best run per metric.
"""


def register(sub, formatter):
    p = sub.add_parser("report", help="HTML report of evaluated runs (one, or several side by side)",
                       description="Write one self-contained HTML report of one or several evaluated runs.",
                       epilog=EXAMPLE, formatter_class=formatter)
    p.add_argument("runs", nargs="+", metavar="RUN", help="evaluated run directories (or evaluate --out folders)")
    p.add_argument("--out", required=True, metavar="report.html", help="the HTML file to write")
    p.add_argument("--critical", nargs="+", action="extend", default=[], metavar="TAXON",
                   help="taxa whose accuracy at every rank of their lineage the report details")
    p.add_argument("--title", help="report title (default: the run names)")
    p.set_defaults(func=run)


def run(args) -> int:
    import time
    from pathlib import Path

    from taxonomist.report import write_report

    start = time.time()
    out = write_report(args.runs, args.out, critical=args.critical, title=args.title)
    if len(args.runs) == 1 and Path(out).resolve() == (Path(args.runs[0]) / "report.html").resolve():
        from taxonomist.pipeline import record_step_done
        record_step_done(args.runs[0], "report")  # a run whose report had failed is whole again
    print(f"report of {len(args.runs)} run{'s' if len(args.runs) > 1 else ''} written in {time.time() - start:.1f} s")
    print(out)
    return 0
