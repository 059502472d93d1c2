"""`taxonomist evaluate`: run a checkpoint over a dataset split → metrics.json, predictions.csv, report.html."""
from __future__ import annotations

EXAMPLE = """\
examples:
  taxonomist evaluate runs/first --data data/synth
  taxonomist evaluate runs/first --data data/synth --decision min-risk --candidates all --out runs/first/min-risk
  taxonomist evaluate runs/first/checkpoints/best.safetensors --data data/fungi --critical "Amanita phalloides"
  taxonomist evaluate runs/first --data data/synth --decision backoff --thresholds species=0.6,genus=0.7
  taxonomist evaluate runs/first --data data/synth --model-ood odin mc-dropout --ensemble runs/second
  taxonomist evaluate model.onnx --data data/synth --out evaluation/     # an exported model (taxonomist export)
  taxonomist evaluate runs/first --data data/sites --priors priors.csv --decision min-risk --candidates all --out ev/

Writes metrics.json (mhd, top1, log_loss, macro_f1, hierarchical_accuracy, per_rank, ece, ece_uncalibrated, n,
per-label precision/recall/F1, ood when the dataset has ood rows and the checkpoint OOD scorers),
predictions.csv (path,label,prediction,confidence,distance + label_/prediction_/confidence_<rank>) and the
self-contained report.html into --out (default: the run directory). The decision defaults to the run's
decide.* config (argmax unless set); the checkpoint's temperature, when calibrated, is applied first.

The new metrics.json, predictions.csv (and taxonomy.csv) replace the old ones as a set, metrics.json last, and the
old report.html is removed before the new one is written: after a kill the folder holds the old evaluation, the
new one, or no metrics.json (refused by readers), never a mix. --out may not be the dataset folder or hold a file
evaluate reads. A checkpoint naming a backbone that imports code is refused unless --trust-code.
"""


def register(sub, formatter):
    from taxonomist.cli.predict import add_prior_arguments

    p = sub.add_parser("evaluate", help="evaluate a run on a dataset split → metrics.json, predictions.csv, report.html",
                       description="Evaluate a trained run or checkpoint on a held-out split.", epilog=EXAMPLE,
                       formatter_class=formatter)
    p.add_argument("run", metavar="RUN_OR_CHECKPOINT",
                   help="a run directory, a .safetensors checkpoint, an exported .onnx model, a Hub folder or "
                        "hf-hub:ORG/NAME[@REVISION] (these two need --out)")
    p.add_argument("--data", metavar="DATASET", help="dataset directory (default: the run's data.root)")
    p.add_argument("--split", default="test", help="split to evaluate (test falls back to val when there is none)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: the run directory)")
    p.add_argument("--decision", choices=["argmax", "min-risk", "backoff", "selective", "rollup", "common-ancestor"],
                   help="decision rule (default: the run's decide.decision, else argmax)")
    p.add_argument("--candidates", metavar="FILE|all|fathomnet2025",
                   help="nodes the answers may be (default: the training labels; back-off and selective: every node)")
    p.add_argument("--thresholds", metavar="RANK=P,…|P",
                   help="back-off thresholds per rank or depth (species=0.55,genus=0.6), or the one threshold of "
                        "selective, rollup or common-ancestor")
    p.add_argument("--top-k", type=int, default=None, metavar="N",
                   help="rollup and common-ancestor: how many of the most probable labels count (default 5 and 15)")
    p.add_argument("--critical", nargs="+", action="extend", default=[], metavar="TAXON",
                   help="taxa whose accuracy at every rank of their lineage the report details")
    p.add_argument("--model-ood", nargs="+", action="extend", default=[], metavar="METHOD",
                   choices=["odin", "mc-dropout"],
                   help="OOD scores that rerun the model on the ood rows: odin (input perturbation, T=1000), "
                        "mc-dropout (predictive entropy over 10 dropout passes)")
    p.add_argument("--ensemble", nargs="+", action="extend", default=[], metavar="RUN_OR_CHECKPOINT",
                   help="other checkpoints with the same labels: adds ood.ensemble (their disagreement)")
    p.add_argument("--tta", nargs="?", const="rot2+flip", default=None, metavar="SPEC",
                   help="test-time augmentation as in predict; alone = rot2+flip (4 views), or e.g. rot4, d4")
    p.add_argument("--tta-mode", choices=("mean_probs", "mean_logits"), default="mean_probs",
                   help="merge TTA views by their mean probabilities or mean logits")
    add_prior_arguments(p, "the dataset's `context` column")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=-1, help="DataLoader workers; -1 = chosen for the machine")
    p.add_argument("--no-report", action="store_true", help="write metrics.json and predictions.csv only")
    p.add_argument("--trust-code", action="store_true",
                   help="load checkpoints whose backbone imports code (module:PKG:FACTORY) or fetches it "
                        "(open_clip:hf-hub:…); only for model files you trust (refused without it)")
    p.set_defaults(func=run)


def run(args) -> int:
    import sys

    from taxonomist.decide import parse_thresholds
    from taxonomist.deploy.hub import is_hub_source, resolve_model_source
    from taxonomist.errors import ConfigError
    from taxonomist.evaluate.run import evaluate_run, run_decision_options

    if args.out is None and is_hub_source(args.run):
        raise ConfigError(f"{args.run}: a Hub model has no run directory to write into (its folder is the download "
                          "cache or an export); give --out DIR")
    args.run = str(resolve_model_source(args.run))  # hf-hub:… → the cached copy
    args.ensemble = [str(resolve_model_source(m)) for m in args.ensemble]
    if args.critical and not args.no_report:
        _check_critical(args.run, args.critical)  # before minutes of inference, not after
    replaced = args.out is None and _earlier_evaluation(args.run)
    # the run's decide config with the flags given in its place; the priors file is read and checked here, before
    # minutes of inference
    options = run_decision_options(args.run, decision=args.decision, candidates=args.candidates,
                                   thresholds=parse_thresholds(args.thresholds), top_k=args.top_k, tta=args.tta,
                                   tta_mode=args.tta_mode, priors=args.priors,
                                   prior_strength=args.prior_strength, prior_floor=args.prior_floor)
    ev = evaluate_run(args.run, data=args.data, split=args.split, out=args.out, device=args.device,
                      batch_size=args.batch_size, num_workers=args.num_workers, progress=sys.stderr.isatty(),
                      model_ood=args.model_ood, ensemble=args.ensemble, trust_code=args.trust_code,
                      options=options)
    from taxonomist.pipeline import record_step_done, run_step
    record_step_done(ev.out_dir, "evaluate")  # a run whose evaluation had failed is whole again
    print(ev.summary())
    print(f"metrics      {ev.out_dir / 'metrics.json'}")
    print(f"predictions  {ev.out_dir / 'predictions.csv'}")
    if not args.no_report:
        from taxonomist.errors import PostTrainingError
        from taxonomist.report import write_report
        report, failure = run_step(ev.out_dir, "report",
                                   lambda: write_report([ev.out_dir], ev.out_dir / "report.html",
                                                        critical=args.critical))
        if failure is not None:  # the evaluation is on disk: say so, and how to write the report alone
            raise PostTrainingError(f"the evaluation is written ({ev.out_dir / 'metrics.json'}), but the report "
                                    f"failed: {failure.error} — traceback in {failure.log}; redo it with: "
                                    f"{failure.redo}", step="report", redo=failure.redo, log=failure.log)
        print(f"report       {report}")
    if replaced:
        written = "metrics.json, predictions.csv" + ("" if args.no_report else ", report.html")
        print(f"note: replaced the evaluation that was in {ev.out_dir} ({written}); "
              "--out DIR writes a new evaluation beside it instead")
    return 0


def _earlier_evaluation(run_or_checkpoint: str) -> bool:
    """Whether evaluating without --out replaces an evaluation already in the run directory (training's own,
    or an earlier `taxonomist evaluate`)."""
    from pathlib import Path

    path = Path(run_or_checkpoint)
    folder = path if path.is_dir() else (path.parent.parent if path.parent.name == "checkpoints" else path.parent)
    return (folder / "metrics.json").is_file()


def _check_critical(run_or_checkpoint: str, names: list[str]) -> None:
    from taxonomist.errors import UnknownLabelError
    from taxonomist.taxonomy import suggest
    from taxonomist.inference.model_file import read_card

    taxonomy = read_card(run_or_checkpoint).taxonomy
    for name in names:
        if name not in taxonomy:
            raise UnknownLabelError(f"--critical {name!r} is not a taxon of the model{suggest(name, taxonomy.names)}")
