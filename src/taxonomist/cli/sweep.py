"""`taxonomist sweep`: search hyperparameters with Optuna; each trial is an ordinary training run."""
from __future__ import annotations

EXAMPLE = """\
examples:
  taxonomist sweep --config base.yaml --space space.yaml --trials 20 --out sweeps/lr
  taxonomist sweep --config base.yaml --space space.yaml --trials 20 --out sweeps/lr     # again: continues
  taxonomist sweep --config base.yaml --space space.yaml --trials 200 --out sweeps/big \\
      --storage postgresql://user:pass@db/optuna --study big        # the same command on every machine

SPACE.yaml maps config keys to distributions:
  train.lr: {loguniform: [1e-5, 1e-2]}
  loss.distance_weight: {uniform: [0, 1]}          # [low, high] or [low, high, step]
  train.batch_size: {int: [16, 64, 16]}            # low, high, step
  model.head: {choice: [flat, multirank]}

Each trial trains in OUT/trials/NNNN and reports its validation metric every epoch, so that the pruner stops
poor trials early; a trial that fails (e.g. out of memory) is recorded as failed and the sweep goes on.
--trials is the total the study should hold, not the number to add: re-running the command (after Ctrl-C, or
on another machine) continues the study until it holds N finished trials; interrupted trials are run again.
OUT gets trials.csv, best.yaml (`taxonomist train --config OUT/best.yaml` retrains the best trial into
OUT/best) and report.html. The default storage is OUT/study.journal (several processes on one disk may share
it); --storage takes a journal file path or a database URL Optuna accepts (sqlite:///…, postgresql://…).
"""


def register(sub, formatter):
    from taxonomist.sweep.run import METRICS, PRUNERS, SAMPLERS

    p = sub.add_parser("sweep", help="hyperparameter search with Optuna → ranked trials, best.yaml, report",
                       description="Search hyperparameters with Optuna: every trial is a training run.",
                       epilog=EXAMPLE, formatter_class=formatter)
    p.add_argument("--config", metavar="BASE.yaml", help="the base training config (every key the space leaves)")
    p.add_argument("--space", metavar="SPACE.yaml", required=True, help="config keys → distributions")
    p.add_argument("--trials", type=int, required=True, metavar="N",
                   help="total number of trials the study should hold (finished ones count, also from earlier "
                        "runs of this command and from other workers)")
    p.add_argument("--out", required=True, metavar="DIR", help="sweep directory (trials/, trials.csv, best.yaml, "
                                                               "report.html, study.journal)")
    p.add_argument("--storage", metavar="URL",
                   help="Optuna storage shared by several workers: a database URL (postgresql://…, sqlite:///…) "
                        "or a journal file path; without it, DIR/study.journal")
    p.add_argument("--study", metavar="NAME", help="study name; without it, the name of DIR")
    p.add_argument("--sampler", choices=SAMPLERS, default="tpe",
                   help="tpe: Optuna's TPE; random; grid: every combination of choice lists and stepped ranges")
    p.add_argument("--pruner", choices=PRUNERS, default="median",
                   help="median: stop a trial whose epoch value is worse than the median of earlier trials at "
                        "that epoch (after 3 full trials, from epoch 2); hyperband; none")
    p.add_argument("--metric", choices=list(METRICS), default="mhd",
                   help="validation metric to optimise (mhd and log_loss: lower is better; top1: higher)")
    p.add_argument("--timeout", type=float, metavar="S",
                   help="start no new trial after S seconds (the running one finishes)")
    p.add_argument("--seed", type=int, metavar="N",
                   help="seed of the sampler (default: random; give each parallel worker its own)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="key=value",
                   help="override a key of the base config, e.g. --set train.epochs=5 (repeatable)")
    p.add_argument("--no-report", action="store_true", help="skip report.html")
    p.set_defaults(func=run)


def run(args) -> int:
    import sys

    from taxonomist.config import load_config
    from taxonomist.sweep.run import run_sweep
    from taxonomist.sweep.space import load_space

    params = load_space(args.space)
    base = load_config(args.config, args.overrides)
    result = run_sweep(base, params, args.trials, args.out, storage=args.storage, study_name=args.study,
                       sampler=args.sampler, pruner=args.pruner, metric=args.metric, timeout=args.timeout,
                       seed=args.seed, progress=sys.stderr.isatty(), report=not args.no_report)
    print(result.summary())
    return 0
