"""`taxonomist score`: mean taxonomic distance of a Kaggle-style submission, as the leaderboard computes it."""
from __future__ import annotations

EXAMPLE = """\
examples:
  taxonomist score solution.csv submission.csv                       # FathomNet 2025 rule and names
  taxonomist score solution.csv submission.csv --taxonomy data/taxonomy.csv --metric lca

Both files are `annotation_id,concept_name` CSVs. The submission is validated first (same ids, each once;
every name an accepted label); each problem is reported on its own line. The mean distance is printed on
the last line.
"""


def register(sub, formatter):
    p = sub.add_parser("score", help="score a submission CSV against a solution CSV",
                       description="Mean taxonomic distance of a submission against a solution.",
                       epilog=EXAMPLE, formatter_class=formatter)
    p.add_argument("solution", metavar="SOLUTION.csv")
    p.add_argument("submission", metavar="SUBMISSION.csv")
    p.add_argument("--taxonomy", default="fathomnet2025", metavar="TAXONOMY_CSV|fathomnet2025",
                   help="taxonomy whose labels are the accepted names")
    p.add_argument("--metric", choices=["auto", "fathomnet2025", "lca"], default="auto",
                   help="auto: fathomnet2025 for ranked taxonomies, lca otherwise")
    p.add_argument("--allow-unknown", action="store_true",
                   help="score a name outside the accepted labels as the maximum distance (as Kaggle does) "
                        "instead of rejecting the file")
    p.set_defaults(func=run)


def run(args) -> int:
    from taxonomist.evaluate.score import score_submission
    from taxonomist.taxonomy import default_metric, read_taxonomy

    tax = read_taxonomy(args.taxonomy)
    metric = default_metric(tax) if args.metric == "auto" else args.metric
    res = score_submission(args.solution, args.submission, tax, metric, allow_unknown=args.allow_unknown)
    if res.unknown_predictions:
        print(f"{res.unknown_predictions} prediction(s) outside the accepted labels scored the maximum")
    print(f"annotations: {res.n}  metric: {metric}")
    print(f"{res.mean_distance:.4f}")
    return 0
