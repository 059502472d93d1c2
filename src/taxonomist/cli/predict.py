"""`taxonomist predict`: run one checkpoint, an exported ONNX model or an ensemble over images and write a
decisions CSV, a Kaggle submission, Darwin Core or JSON lines, and optionally the images' embeddings as Parquet
(`taxonomist.inference.predict`); under torchrun, sharded over processes."""
from __future__ import annotations

#: decide.DECISIONS and inference.predict.PREDICT_OOD_METHODS, spelled out so that `--help` needs no
#: numpy/scipy import (tests/cli/test_predict_cli.py checks that they match)
DECISION_CHOICES = ("argmax", "min-risk", "backoff", "selective", "rollup", "common-ancestor")
OOD_CHOICES = ("auto", "msp", "max-logit", "energy", "mahalanobis", "knn", "relative-mahalanobis", "vim",
               "react-energy", "odin", "mc-dropout", "ensemble")
#: inference.formats.FORMATS (checked by tests/inference/test_formats.py)
FORMAT_CHOICES = ("csv", "kaggle", "dwc", "jsonl")
#: inference.onnx_model.ENGINES (checked by tests/inference/test_engine.py)
ENGINE_CHOICES = ("auto", "torch", "onnx")
ENGINE_HELP = ("what runs a checkpoint: auto = onnxruntime on CPU (the checkpoint exported to ONNX once, cached in "
               "$XDG_CACHE_HOME/taxonomist/onnx by its SHA-256) when the onnx extra is installed and no option needs "
               "PyTorch (--ood odin, mc-dropout), else PyTorch (always on CUDA/MPS); torch or onnx force one")

EXAMPLE = """\
examples:
  taxonomist predict runs/demo/run --images photos/ --out p.csv
  taxonomist predict RUN/checkpoints/best.safetensors --images DIR --decision min-risk --out p.csv
  taxonomist predict RUN --images test.csv --decision min-risk --candidates fathomnet2025 --format kaggle --out sub.csv
  taxonomist predict RUN --images frames.csv --decision min-risk --candidates all --format dwc --out occurrences.csv
  taxonomist predict RUN --images DIR --format jsonl --out answers.jsonl --embeddings features.parquet
  taxonomist predict RUN --images DIR --decision min-risk --candidates all --ood energy --ood-tpr 0.95 --out p.csv
  taxonomist predict fold_0 fold_1 fold_2 --images DIR --ensemble-mode geometric --tta --out p.csv
  taxonomist predict RUN --images DIR --decision min-risk --candidates all --ood odin --out p.csv
  taxonomist predict RUN --images sites.csv --priors priors.csv --decision min-risk --candidates all --out p.csv
  taxonomist predict fold_0 fold_1 fold_2 --images DIR --ood ensemble --ood-threshold 0.05 --out p.csv
  taxonomist predict model.onnx --images DIR --out p.csv                  # exported with `taxonomist export`
  taxonomist predict hf-hub:my-lab/plankton@v2 --images DIR --out p.csv   # from the Hugging Face Hub (or its cache)
  torchrun --nproc_per_node 4 -m taxonomist.cli.main predict RUN --images DIR --out p.csv --resume

--images takes a folder (searched recursively), a CSV with a `path` column relative to the CSV's folder
(its other columns, e.g. annotation_id, are kept), or a dataset directory (annotations.csv).

Output (csv): path,prediction,confidence, one column per rank (per depth for unranked trees) holding the
answer's ancestor there, expected_distance (the answer's expected distance under the probabilities), with
--ood also ood_score,unknown, then the input's other columns. Unreadable images get no row and are listed.
--format kaggle writes annotation_id,concept_name for every input row, validated first (each id once, every
name a candidate); there an unreadable image is an error unless --fill-unreadable.
--format dwc writes Darwin Core terms only, one identification per answered image: occurrenceID (the input's
occurrenceID or annotation_id column, else the path), identificationID, associatedMedia (the input's
associatedMedia or url column, else the path), scientificName, verbatimIdentification,
identificationQualifier (open nomenclature: 'sp.' for a genus, 'indet.' above it, and a species answer with
P < 0.5 or flagged unknown is published at its genus as 'cf. epithet'), taxonRank, kingdom ... genus,
specificEpithet, identificationRemarks (rule, P, OOD verdict), identifiedBy (taxonomist version, model name and
SHA-256), dateIdentified (the run's UTC time). An unranked tree leaves the rank columns empty.
--format jsonl writes one JSON object per answered image: path, the answer as `serve` returns it (decision,
confidence, rank, lineage with P per level, top labels, OOD score, rule) and `input` (the other input columns).
--embeddings FILE.parquet also writes each answered image's pooled features (pip install 'taxonomist[parquet]'):
path, the input's id columns, and `embedding` (a list of floats; `embedding_0`, `embedding_1`, ... for an
ensemble's members; with --tta the mean over the views); the file's metadata names model, SHA-256 and width.

Context priors: --priors priors.csv reweights each image by its `context` (e.g. region=Monterey;depth=200-400,
keys joined by ';', each with its own rows): p(y|x,c) ∝ p(y|x)·(π_c(y)/π_train(y))^λ, before the decision. A
blocked species' probability goes to the labels that remain, so min-risk with --candidates all answers their
genus rather than an arbitrary sibling. A context absent from the file changes nothing. The csv output adds
raw_prediction (the answer without the priors) and prior_applied (docs/decisions.md, "Context priors").

Decisions: argmax (most probable label), min-risk (least expected taxonomic distance over the candidates),
backoff (climb from the top label until a rank's threshold is met: --thresholds species=0.55,genus=0.6,…),
selective (deepest node with P >= --selective-threshold); two heuristics of other tools, for users coming
from them: rollup (SpeciesNet: the deepest node holding --thresholds 0.65 of the top --top-k 5 labels) and
common-ancestor (iNaturalist: the finest node holding 0.78 of the top 15, renormalised). --candidates:
without it the training labels for argmax/min-risk and --format kaggle, every node for the others; `all`,
`fathomnet2025` or a file.

OOD: --ood METHOD adds ood_score (higher = more unknown) and unknown (score >= threshold). The threshold is
--ood-threshold T, or the one keeping --ood-tpr (default 0.95) of the known validation images, stored at
calibration. auto (mahalanobis: the best on held-out plankton taxa, docs/decisions.md), msp, max-logit,
energy, mahalanobis, knn, relative-mahalanobis, vim and react-energy come from the statistics every
calibrated checkpoint stores. odin (a gradient step on the input, 3 passes) and mc-dropout (10 passes with dropout on)
run the PyTorch model again; their thresholds are stored when trained with --set decide.model_ood=odin,...
ensemble: the disagreement (mutual information) of 2+ checkpoints; give --ood-threshold T, e.g. the
ood.ensemble.threshold that `taxonomist evaluate RUN --ensemble OTHER` reports. With min-risk/backoff/selective an unknown's answer falls back to its ancestor at
--ood-fallback (default: order, or depth 1 for unranked trees) when that is a candidate, so use
--candidates all (or a list with coarse names) for the fallback to climb.

--tta alone averages 4 views (identity, h-flip, v-flip, 180° turn: 'rot2+flip'); or name views:
rot2 (the FathomNet 2nd place's 2 views), flip, rot4, d4, scales=0.875,1.0,1.125, joined with '+'.
Put --tta after the checkpoints, or give it a spec, so that it does not swallow a checkpoint path.

Engine: on CPU a checkpoint runs on onnxruntime (3-4x faster than PyTorch there) when the onnx extra is
installed ('taxonomist[onnx]'): the first run exports it (seconds to a minute) to
$XDG_CACHE_HOME/taxonomist/onnx/ (~/.cache/...), keyed by the checkpoint's SHA-256, and later runs reuse
the file; delete that folder to clear it. --ood odin/mc-dropout, backbones that are code, CUDA and MPS run
PyTorch, and so does a failed export; --engine torch always does, --engine onnx refuses what onnxruntime
cannot run. Answers are the same; probabilities agree to about 1e-5 (docs/deploy.md, "Which engine runs
the model").

A model file is data: a checkpoint naming a backbone that imports code (module:PKG:FACTORY) is refused unless
--trust-code. --out may not be one of the inputs (images CSV, annotations.csv, a model file, …).

Chunks and resume: the input is predicted in chunks of --chunk-size rows whose decisions are written to
OUT.parts/ as they finish (removed once OUT is written). After a kill, the same command with --resume keeps
the finished chunks. Under torchrun (WORLD_SIZE > 1) chunk c goes to rank c mod WORLD_SIZE (gloo on CPU,
nccl on CUDA) and rank 0 merges the parts: the output is that of one process. On several nodes, OUT must be
on a filesystem every node shares.
"""


def register(sub, formatter):
    p = sub.add_parser("predict",
                       help="predict images with a checkpoint or an ensemble → CSV, Darwin Core, JSON lines",
                       description="Predict images with one checkpoint or an ensemble and write the decisions.",
                       epilog=EXAMPLE, formatter_class=formatter)
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                   help="a .safetensors checkpoint, a run directory (its best checkpoint), an exported .onnx "
                        "model, a Hub folder or hf-hub:ORG/NAME[@REVISION]; several = an ensemble")
    p.add_argument("--images", required=True, metavar="DIR_OR_CSV",
                   help="a folder of images, a CSV with a path column, or a dataset directory")
    p.add_argument("--out", required=True, metavar="FILE", help="output file, in --format (written atomically)")
    p.add_argument("--decision", choices=DECISION_CHOICES, default="argmax", help="decision rule")
    p.add_argument("--candidates", metavar="FILE|all|fathomnet2025", default=None,
                   help="names an answer may take (default: see below)")
    p.add_argument("--thresholds", metavar="RANK=P,…", default=None,
                   help="backoff thresholds per rank (or depthN=P), or one number; default: the config ladder "
                        "species 0.55 … kingdom 0.85; rollup/common-ancestor: one number (0.65 / 0.78)")
    p.add_argument("--selective-threshold", type=float, default=None, metavar="P",
                   help="selective: answer the deepest node with P(node) >= P (default 0.5)")
    p.add_argument("--top-k", type=int, default=None, metavar="N",
                   help="rollup and common-ancestor: how many of the most probable labels count (default 5 and 15)")
    p.add_argument("--ood", choices=OOD_CHOICES, default=None, metavar="METHOD",
                   help=f"flag unknown taxa with an OOD score: {', '.join(OOD_CHOICES)}")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--ood-threshold", type=float, default=None, metavar="T",
                       help="flag when the OOD score >= T (one checkpoint, or --ood ensemble)")
    group.add_argument("--ood-tpr", type=float, default=None, metavar="0.95",
                       help="threshold keeping this share of known validation images unflagged (default 0.95)")
    p.add_argument("--ood-fallback", default="auto", metavar="RANK|depthN|P",
                   help="answer a flagged image with its ancestor at this rank/depth, or the deepest ancestor "
                        "with P >= this probability (min-risk, backoff, selective); auto = order or depth 1")
    p.add_argument("--tta", nargs="?", const="rot2+flip", default=None, metavar="SPEC",
                   help="test-time augmentation; alone = rot2+flip (4 views)")
    add_prior_arguments(p, "each image's `context` column (a CSV or dataset input)")
    p.add_argument("--tta-mode", choices=("mean_probs", "mean_logits"), default="mean_probs",
                   help="merge TTA views by their mean probabilities or mean logits")
    p.add_argument("--format", dest="fmt", choices=FORMAT_CHOICES, default="csv",
                   help="csv: decisions with per-rank columns; kaggle: annotation_id,concept_name; dwc: Darwin Core "
                        "identifications (GBIF, OBIS); jsonl: one JSON answer per image, as serve gives it")
    p.add_argument("--embeddings", default=None, metavar="FILE.parquet",
                   help="also write each image's pooled features to this Parquet file (for clustering, "
                        "deduplication, active learning; needs the parquet extra)")
    p.add_argument("--fill-unreadable", action="store_true",
                   help="kaggle: answer unreadable images with the candidate nearest to all labels instead of failing")
    p.add_argument("--strict", action="store_true",
                   help="stop at the first unreadable image, naming it, instead of skipping and listing it")
    p.add_argument("--weights", default=None, metavar="W,W,…", help="ensemble weights, one per checkpoint")
    p.add_argument("--ensemble-mode", choices=("arithmetic", "geometric"), default="arithmetic",
                   help="mean of the members' probabilities: arithmetic, or geometric (renormalised)")
    p.add_argument("--split", default=None, metavar="NAME", help="dataset directory: predict only this split")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="auto (cuda → mps → cpu), cpu, cuda or mps")
    p.add_argument("--engine", choices=ENGINE_CHOICES, default="auto", help=ENGINE_HELP)
    p.add_argument("--workers", type=int, default=-1, help="image-loading processes; -1 = chosen for the machine")
    p.add_argument("--chunk-size", type=int, default=1024, metavar="N",
                   help="rows per chunk: the unit written to OUT.parts/, dealt to torchrun ranks and kept by --resume")
    p.add_argument("--resume", action="store_true",
                   help="keep the chunks an interrupted run with the same models, options and images finished")
    p.add_argument("--trust-code", action="store_true",
                   help="load checkpoints whose backbone imports code (module:PKG:FACTORY) or fetches it "
                        "(open_clip:hf-hub:…); only for model files you trust (refused without it)")
    p.set_defaults(func=run)


def add_prior_arguments(p, where: str) -> None:
    """--priors, --prior-strength, --prior-floor (predict, evaluate, serve)."""
    p.add_argument("--priors", default=None, metavar="PRIORS.csv",
                   help=f"context priors: a CSV context,taxon,weight (0 blocks, 1 allows, other values are relative "
                        f"frequencies or counts; a taxon's weight applies to every label under it), applied to {where} "
                        "as a prior shift before the decision; the answer without it is kept as raw_prediction")
    p.add_argument("--prior-strength", type=float, default=1.0, metavar="λ",
                   help="how much the priors count: 1 = Bayes' rule (default), 0 = not at all")
    p.add_argument("--prior-floor", type=float, default=0.1, metavar="F",
                   help="weight of a label an allow list or count table does not name, as a share of the mean "
                        "listed weight (default 0.1: site lists are never complete)")


def decision_options(args, **extra):
    """The `DecisionOptions` of the decision and OOD flags that predict and serve share (checked there, each
    message naming its flag)."""
    from taxonomist.decide import DecisionOptions

    return DecisionOptions(decision=args.decision, candidates=args.candidates, thresholds=args.thresholds,
                           selective_threshold=args.selective_threshold, top_k=args.top_k, ood=args.ood,
                           ood_threshold=args.ood_threshold, ood_tpr=args.ood_tpr, ood_fallback=args.ood_fallback,
                           priors=args.priors, prior_strength=args.prior_strength, prior_floor=args.prior_floor,
                           **extra)


def run(args) -> int:
    import sys

    from taxonomist.errors import ConfigError
    from taxonomist.inference.predict import predict

    options = decision_options(args, tta=args.tta, tta_mode=args.tta_mode)  # before any download
    weights = None
    if args.weights:
        try:
            weights = [float(w) for w in args.weights.split(",")]
        except ValueError:
            raise ConfigError(f"--weights {args.weights!r}: expected numbers separated by commas") from None
    from taxonomist.deploy.hub import resolve_model_source

    args.checkpoints = [str(resolve_model_source(c)) for c in args.checkpoints]  # hf-hub:… → the cached copy
    summary = predict(
        args.checkpoints, args.images, args.out, options, fmt=args.fmt, fill_unreadable=args.fill_unreadable,
        batch_size=args.batch_size, device=args.device, num_workers=args.workers,
        ensemble_mode=args.ensemble_mode, weights=weights, split=args.split, progress=sys.stderr.isatty(),
        chunk_size=args.chunk_size, resume=args.resume, strict=args.strict, trust_code=args.trust_code,
        engine=args.engine, embeddings=args.embeddings)
    print(summary.summary())
    return 0
