"""`taxonomist taxonomy resolve|distances`: build a taxonomy from names, write distance matrices."""
from __future__ import annotations

import csv
import io
import sys
from pathlib import Path

from taxonomist.errors import TaxonomistError

RESOLVE_EXAMPLE = """\
examples:
  taxonomist taxonomy resolve Sebastes Sebastolobus "Funiculina" --out taxonomy.csv
  taxonomist taxonomy resolve --names labels.txt --out taxonomy.csv --cache ~/.cache/taxonomist
  taxonomist taxonomy resolve --names labels.txt --out taxonomy.csv --offline   # cache only, no network

Names are looked up in WoRMS through fathomnet-py (pip install 'taxonomist[worms]'); each lineage is
reduced to the seven ranks kingdom … species. Names that cannot be resolved are listed and the command
exits with status 1 after writing the others.
"""

DISTANCES_EXAMPLE = """\
examples:
  taxonomist taxonomy distances fathomnet2025 --metric fathomnet2025 --out matrix.csv
  taxonomist taxonomy distances data/taxonomy.csv --metric lca --nodes all --out matrix.csv

The output is a square CSV: header `concept_name,<name1>,<name2>,…`, one row per name in the same order.
"""


def register(sub, formatter):
    tax = sub.add_parser("taxonomy", help="resolve names into a taxonomy; write distance matrices",
                         description="Work with taxonomies: resolve names through WoRMS, write distance matrices.",
                         formatter_class=formatter)
    tsub = tax.add_subparsers(dest="taxonomy_command", metavar="SUBCOMMAND", required=True)

    r = tsub.add_parser("resolve", help="names → seven-rank lineages (WoRMS) → taxonomy.csv",
                        description="Resolve taxon names to kingdom…species lineages through WoRMS.",
                        epilog=RESOLVE_EXAMPLE, formatter_class=formatter)
    r.add_argument("names", nargs="*", metavar="NAME", help="taxon names (quote names with spaces)")
    r.add_argument("--names", dest="names_file", metavar="FILE", help="text file with one name per line")
    r.add_argument("--out", required=True, help="taxonomy CSV to write (rank columns)")
    r.add_argument("--offline", action="store_true", help="use the cache only; no network")
    r.add_argument("--cache", metavar="DIR", default=None, help="cache folder (default: ~/.cache/taxonomist)")
    r.set_defaults(func=run_resolve)

    d = tsub.add_parser("distances", help="write the distance matrix of a taxonomy as CSV",
                        description="Write the taxonomic distance between every pair of names as a square CSV.",
                        epilog=DISTANCES_EXAMPLE, formatter_class=formatter)
    d.add_argument("taxonomy", metavar="TAXONOMY_CSV", help="taxonomy CSV, or `fathomnet2025` (built in)")
    d.add_argument("--metric", required=True, choices=["fathomnet2025", "lca"],
                   help="fathomnet2025: the official Kaggle rule; lca: edges to the lowest common ancestor")
    d.add_argument("--nodes", choices=["labels", "all"], default="labels",
                   help="rows/columns: the labels (concept_name rows) or every node of the tree")
    d.add_argument("--rank-weights", default="", metavar="RANK=W,…",
                   help="lca only: weight of an edge by the rank of its lower node, e.g. species=0.5,genus=0.75")
    d.add_argument("--out", required=True, help="CSV file to write")
    d.set_defaults(func=run_distances)


def _read_names(args) -> list[str]:
    names = list(args.names)
    if args.names_file:
        path = Path(args.names_file)
        if not path.is_file():
            raise TaxonomistError(f"{path}: names file not found")
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError:
            raise TaxonomistError(f"{path}: not UTF-8 text") from None
        names += [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not names:
        raise TaxonomistError("no names given: pass NAME… or --names FILE")
    return list(dict.fromkeys(names))


def run_resolve(args) -> int:
    from taxonomist.taxonomy import write_taxonomy
    from taxonomist.taxonomy.worms import resolve_names

    names = _read_names(args)
    res = resolve_names(names, cache_dir=args.cache, offline=args.offline, progress=sys.stderr.isatty())
    for name, why in res.unresolved.items():
        print(f"unresolved: {name}: {why}", file=sys.stderr)
    if res.lineages:
        write_taxonomy(res.to_taxonomy(), args.out)
        print(f"wrote {args.out}: {len(res.lineages)} of {len(names)} names resolved")
    else:
        print(f"no name could be resolved; {args.out} was not written", file=sys.stderr)
    return 1 if res.unresolved else 0


def _parse_weights(text: str) -> dict[str, float]:
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise TaxonomistError(f"--rank-weights {part!r}: expected RANK=WEIGHT, e.g. species=0.5")
        k, v = part.split("=", 1)
        try:
            out[k.strip()] = float(v)
        except ValueError:
            raise TaxonomistError(f"--rank-weights {part!r}: {v!r} is not a number") from None
    return out


def run_distances(args) -> int:
    from taxonomist.taxonomy import distance_matrix, read_taxonomy
    from taxonomist.utils.files import atomic_write_text

    tax = read_taxonomy(args.taxonomy)
    nodes = list(tax.labels) if args.nodes == "labels" else list(tax.names)
    kwargs = {}
    if args.rank_weights:
        if args.metric != "lca":
            raise TaxonomistError("--rank-weights applies to --metric lca only")
        kwargs["rank_weights"] = _parse_weights(args.rank_weights)
    D = distance_matrix(tax, args.metric, nodes, nodes, **kwargs)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["concept_name", *nodes])
    for name, row in zip(nodes, D):
        w.writerow([name, *(f"{v:.10g}" for v in row)])
    atomic_write_text(args.out, buf.getvalue())
    print(f"wrote {args.out}: {len(nodes)}×{len(nodes)} {args.metric} distances (max {D.max():g})")
    return 0
