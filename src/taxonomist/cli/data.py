"""`taxonomist data synth|download|prepare|convert|explore|split|fathomnet`: everything before training."""
from __future__ import annotations

import argparse

SYNTH_EXAMPLE = """\
examples:
  taxonomist data synth data/synth                        # the demo dataset
  taxonomist data synth data/big --taxa 60 --per-class 80 --image-size 128 --seed 1
  taxonomist data synth data/easy --phyla 6 --difficulty 0.5 --no-context --format png
  taxonomist data synth data/sites --sites 3         # + a context column and priors.csv (each site's species)

Phylum sets the body plan, class the colour, order the pattern, family/genus/species subtler marks.
Writes annotations.csv, taxonomy.csv, images/<label>/ and context/<label>/ (scenes twice the size with
habitat cues). Re-running into an earlier synth output replaces it; other non-empty folders are refused.
"""

DOWNLOAD_EXAMPLE = """\
examples:
  taxonomist data download dataset_test.json fathomnet/images --workers 16

Fetches every image's `coco_url` into OUT_DIR/<file_name>. Files already present and decodable are
skipped, so an interrupted download resumes where it stopped. Failures are listed at the end and written
to OUT_DIR/download_failures.csv.
"""

PREPARE_EXAMPLE = """\
examples:
  taxonomist data prepare train.json fathomnet/images data/fathomnet --context 1,3,full

Cuts one ROI crop per annotation (scale 1 = the box) into OUT_DIR/images/ plus context crops at the
other scales into OUT_DIR/context/<scale>/ (3 = a square 3× the box's longer side, `full` = the whole
frame), clipped to the image, and writes OUT_DIR/annotations.csv. Degenerate boxes and missing or
unreadable frames are skipped and listed in OUT_DIR/prepare_skipped.csv.
"""

CONVERT_EXAMPLE = """\
examples:
  taxonomist data convert photos/ data/photos --format imagefolder --taxonomy fathomnet2025
  taxonomist data convert photos/ data/photos --format imagefolder --resolve-worms
  taxonomist data convert FungiTastic-Mini-Train.csv data/fungi --format rank-csv \\
      --image-root FungiTastic-Mini/train/300p
  taxonomist data convert data/fungi --format rank-csv --train FungiTastic-Train.csv \\
      --val FungiTastic-Val.csv --test FungiTastic-Test.csv --image-root 'FungiTastic/{split}/300p'

--link relative (default) copies nothing: annotations.csv paths are relative to OUT_DIR and point at the
original files (../photos/Sebastes/001.jpg). --link symlink fills OUT_DIR/images with symlinks, --link copy
with copies, --link none writes annotations.csv into the image folder itself (OUT_DIR = that folder).
With --train/--val/--test the CSVs become one dataset with a `split` column; `{split}` in --image-root
stands for each split's name. An empty rank cell means no name at that rank: the row's label is its
deepest named rank, and a missing rank in between is skipped in the lineage.
"""

EXPLORE_EXAMPLE = """\
examples:
  taxonomist data explore data/synth --out reports/explore
"""

SPLIT_EXAMPLE = """\
examples:
  taxonomist data split data/synth --val 0.15 --test 0.15
  taxonomist data split data/synth --test 0.2 --solution solution.csv    # + the test rows' answers, for score
  taxonomist data split data/fathomnet --folds 5 --ood-taxa 3 --seed 0
  taxonomist data split data/fathomnet --ood-taxa "Sebastes,Chionoecetes tanneri"
  taxonomist data split data/big --classes 20 --min-per-class 10 --max-per-class 50 --out data/big-20
  taxonomist data split data/synth --classes 5 --max-per-class 8 --out data/smoke   # a smoke-test subset

Writes `split` (train/val/test/ood) and, with --folds, `fold` columns into annotations.csv. Each label
gives round(n*test) examples to test, round(n*val) to val and at least one to train. With an image_id
column whole images move together. K folds: test is held out first, the other rows are `train` with a
fold 0..K-1, stratified by label and grouped by image_id (ROIs of one frame never straddle folds).
--ood-taxa N holds out N labels chosen by seed (never a whole phylum if avoidable); names hold out a
label or every label below an internal node. The filters drop rows, so they need --out.
"""

FATHOMNET_EXAMPLE = """\
examples:
  taxonomist data fathomnet scan fathomnet-scan            # figures + plot + concept_counts.csv
  taxonomist data fathomnet select --min 200 --max 20000 --classes 30 --under Actinopterygii \\
      --counts fathomnet-scan --out fish.txt
  taxonomist data fathomnet fetch fish.txt fathomnet-fish --max-per-class 300
  taxonomist data download fathomnet-fish/fathomnet.json fathomnet-fish/images
  taxonomist data prepare fathomnet-fish/fathomnet.json fathomnet-fish/images data/fish

Counts are boxes (localizations) per concept, the unit the database counts by. `fetch` keeps each
concept's answer in OUT_DIR/concepts/, so a run stopped by a timeout or a server error resumes where it
stopped, and another --max-per-class or --seed needs no new request.
"""


def register(sub, formatter):
    data = sub.add_parser("data", help="make, fetch, prepare, explore and split datasets",
                          description="Everything between raw images and a training-ready dataset.",
                          formatter_class=formatter)
    dsub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    s = dsub.add_parser("synth", help="generate a synthetic hierarchical image dataset",
                        description="Generate organism-like images whose appearance follows a taxonomy.",
                        epilog=SYNTH_EXAMPLE, formatter_class=formatter)
    s.add_argument("out_dir", metavar="OUT_DIR")
    s.add_argument("--taxa", type=int, default=24, help="number of labels (taxa)")
    s.add_argument("--per-class", type=int, default=40, help="images per label")
    s.add_argument("--image-size", type=int, default=96, help="image side in pixels")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--phyla", type=int, default=4, help="phyla, one body plan each (1-6)")
    s.add_argument("--species-per-genus", type=float, default=2.0, help="mean species per genus")
    s.add_argument("--internal-fraction", type=float, default=0.15,
                   help="share of labels at genus/family rank (0 = species only)")
    s.add_argument("--difficulty", type=float, default=1.0,
                   help="scales noise, blur, occlusion, colour cast and individual variation (0 = clean)")
    s.add_argument("--no-context", dest="context", action="store_false", default=argparse.SUPPRESS,
                   help="skip the context scenes (written by default)")
    s.add_argument("--format", dest="image_format", choices=("jpg", "png"), default="jpg",
                   help="image files: JPEG quality 90 or lossless PNG")
    s.add_argument("--sites", type=int, default=0, metavar="N",
                   help="take each image at one of N sites, each holding about half the taxa: a `context` column "
                        "(site=1…N) and priors.csv, the sites' species lists, for predict --priors (default 0: none)")
    s.set_defaults(func=run_synth)

    d = dsub.add_parser("download", help="download the images of a COCO JSON (FathomNet)",
                        description="Download the images of a COCO file from their coco_url.",
                        epilog=DOWNLOAD_EXAMPLE, formatter_class=formatter)
    d.add_argument("coco_json", metavar="COCO_JSON")
    d.add_argument("out_dir", metavar="OUT_DIR")
    d.add_argument("--workers", type=int, default=8, help="parallel downloads")
    d.add_argument("--retries", type=int, default=4, help="retries per file (exponential backoff, honours Retry-After)")
    d.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    d.add_argument("--allow-private-addresses", action="store_true",
                   help="also fetch from loopback, link-local and private addresses (a mirror on your network); "
                        "refused by default, redirects included, so that a COCO file cannot reach this machine's "
                        "network")
    d.set_defaults(func=run_download)

    p = dsub.add_parser("prepare", help="COCO JSON + images → dataset (ROI and context crops)",
                        description="Turn a COCO file and its images into the taxonomist dataset format.",
                        epilog=PREPARE_EXAMPLE, formatter_class=formatter)
    p.add_argument("coco_json", metavar="COCO_JSON")
    p.add_argument("images_dir", metavar="IMAGES_DIR")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--context", default="1,3,full",
                   help="crop scales: 1 = the box, N = a square N× the box side, full = the whole frame")
    p.add_argument("--taxonomy", default="", help="taxonomy to copy into the dataset (a CSV or fathomnet2025)")
    p.add_argument("--min-size", type=float, default=2.0,
                   help="boxes whose width or height after clipping is at most this (px) are skipped")
    p.add_argument("--full-max-side", type=int, default=1024,
                   help="longer side of the `full` context frames in px (0 = keep the frame size)")
    p.add_argument("--format", dest="image_format", choices=["jpeg", "png"], default="jpeg",
                   help="crop file format (JPEG quality 95, or lossless PNG)")
    p.add_argument("--workers", type=int, default=4, help="frames decoded and cut in parallel")
    p.set_defaults(func=run_prepare)

    c = dsub.add_parser("convert", help="an image folder or a rank-column CSV → dataset (no copies by default)",
                        description="Write annotations.csv and taxonomy.csv for an ImageFolder (root/<label>/*.jpg) "
                                    "or a CSV with one column per rank (FungiTastic style).",
                        epilog=CONVERT_EXAMPLE, formatter_class=formatter)
    c.add_argument("source", metavar="SOURCE", nargs="?", default=None,
                   help="the image folder, or the CSV (leave out with --train/--val/--test)")
    c.add_argument("out_dir", metavar="OUT_DIR")
    c.add_argument("--format", required=True, choices=("imagefolder", "rank-csv"))
    c.add_argument("--link", default="relative", choices=("relative", "symlink", "copy", "none"),
                   help="how the dataset reaches the images (see below)")
    c.add_argument("--taxonomy", default="",
                   help="imagefolder: a taxonomy CSV or fathomnet2025 holding the folder names")
    c.add_argument("--resolve-worms", action="store_true", help="imagefolder: resolve the folder names through WoRMS")
    c.add_argument("--cache", default="", metavar="DIR", help="WoRMS cache folder; empty = ~/.cache/taxonomist")
    c.add_argument("--offline", action="store_true", help="WoRMS: use the cache only")
    c.add_argument("--image-column", default="", metavar="NAME",
                   help="rank-csv: the image path column; empty = the first of path, image_path, filename, …")
    c.add_argument("--image-root", default="", metavar="DIR",
                   help="rank-csv: folder the image paths are relative to; empty = the CSV's folder")
    c.add_argument("--rank-column", action="append", default=[], metavar="RANK=COLUMN",
                   help="rank-csv: read RANK from COLUMN (repeatable), e.g. species=scientificName")
    c.add_argument("--skip-missing", action="store_true", help="rank-csv: leave out rows whose image is missing")
    for split in ("train", "val", "test"):
        c.add_argument(f"--{split}", default="", metavar="CSV",
                       help=f"rank-csv: the {split} CSV; its rows get split={split} (instead of SOURCE)")
    c.set_defaults(func=run_convert)

    e = dsub.add_parser("explore", help="counts, imbalance, sizes, duplicates → PNG plots + summary.json",
                        description="Explore a dataset: what is in it and what is wrong with it.",
                        epilog=EXPLORE_EXAMPLE, formatter_class=formatter)
    e.add_argument("dataset", metavar="DATASET")
    e.add_argument("--out", required=True, metavar="DIR")
    e.set_defaults(func=run_explore)

    sp = dsub.add_parser("split", help="write train/val/test/ood splits and K folds into annotations.csv",
                         description="Seeded, stratified splits written as split/fold columns.",
                         epilog=SPLIT_EXAMPLE, formatter_class=formatter)
    sp.add_argument("dataset", metavar="DATASET")
    sp.add_argument("--val", type=float, default=argparse.SUPPRESS,
                    help="share of each label for validation: 0.15 when not given; not with --folds")
    sp.add_argument("--test", type=float, default=0.15, help="share of each label for test")
    sp.add_argument("--folds", type=int, default=0, help="K stratified folds grouped by image_id (0 = none)")
    sp.add_argument("--ood-taxa", default="", metavar="N|NAME,NAME…",
                    help="hold out whole taxa as split `ood`: a count (chosen by seed) or names")
    sp.add_argument("--classes", type=int, default=0, help="keep the N labels with most examples (after the filters)")
    sp.add_argument("--min-per-class", type=int, default=0, help="drop labels with fewer examples")
    sp.add_argument("--max-per-class", type=int, default=0, help="keep at most N examples per label (0 = all)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--out", default="", metavar="DIR",
                    help="write the split dataset here (annotations.csv + taxonomy.csv, paths to the same "
                         "images) instead of in place; needed when the filters drop rows")
    sp.add_argument("--solution", default="", metavar="FILE",
                    help="also write the test rows' true names to FILE (annotation_id,concept_name): the "
                         "SOLUTION.csv that `taxonomist score` compares a --format kaggle submission with")
    sp.set_defaults(func=run_split)

    fn = dsub.add_parser("fathomnet", help="the FathomNet database at the source: scan, select, fetch COCO",
                         description="Database-wide figures, concept selection and COCO export from "
                                     "database.fathomnet.org (needs the [fathomnet] extra and internet).",
                         epilog=FATHOMNET_EXAMPLE, formatter_class=formatter)
    fsub = fn.add_subparsers(dest="fathomnet_command", metavar="ACTION", required=True)
    fs = fsub.add_parser("scan", help="concepts, images, boxes per concept → scan.json, scan.png, concept_counts.csv",
                         formatter_class=formatter)
    fs.add_argument("out_dir", metavar="OUT_DIR")
    fs.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    fs.set_defaults(func=run_fathomnet_scan)
    fl = fsub.add_parser("select", help="concepts with enough boxes (optionally under a taxon) → a name list",
                         formatter_class=formatter)
    fl.add_argument("--min", dest="min_count", type=int, default=1, help="fewest boxes a concept needs")
    fl.add_argument("--max", dest="max_count", type=int, default=0, help="most boxes a concept may have (0 = no bound)")
    fl.add_argument("--classes", type=int, default=0, help="keep the N concepts with most boxes (0 = all)")
    fl.add_argument("--under", default="", metavar="TAXON", help="only the taxon and its WoRMS descendants")
    fl.add_argument("--counts", default="", metavar="FILE_OR_DIR",
                    help="select offline from a scan's concept_counts.csv (or its folder)")
    fl.add_argument("--out", required=True, metavar="FILE", help="the concept list, one name a line")
    fl.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    fl.set_defaults(func=run_fathomnet_select)
    ff = fsub.add_parser("fetch", help="the boxes of chosen concepts → OUT_DIR/fathomnet.json (COCO), resumable",
                         formatter_class=formatter)
    ff.add_argument("concepts", metavar="CONCEPTS",
                    help="a file from `select` (one name a line) or names joined by commas")
    ff.add_argument("out_dir", metavar="OUT_DIR")
    ff.add_argument("--max-per-class", type=int, default=0, help="at most N boxes per concept (0 = all)")
    ff.add_argument("--seed", type=int, default=0, help="which boxes the cap keeps")
    ff.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    ff.add_argument("--retries", type=int, default=2,
                    help="retries after a timeout or server error (backoff 1 s, 2 s, …)")
    ff.set_defaults(func=run_fathomnet_fetch)


def run_fathomnet_scan(args) -> int:
    from taxonomist.data.fathomnet_db import FathomNetAPI, scan_database
    print(scan_database(args.out_dir, client=FathomNetAPI(timeout=args.timeout)))
    return 0


def run_fathomnet_select(args) -> int:
    from taxonomist.data.fathomnet_db import FathomNetAPI, select_concepts
    client = FathomNetAPI(timeout=args.timeout) if not args.counts or args.under else None
    print(select_concepts(args.min_count, args.max_count, args.classes, args.under or None,
                          counts=args.counts or None, out=args.out, client=client))
    return 0


def run_fathomnet_fetch(args) -> int:
    from taxonomist.data.fathomnet_db import FathomNetAPI, fetch_coco
    print(fetch_coco(args.concepts, args.out_dir, args.max_per_class, args.seed,
                     client=FathomNetAPI(timeout=args.timeout, retries=args.retries), progress=True))
    return 0


def run_synth(args) -> int:
    from taxonomist.data.synth import synthesize
    summary = synthesize(args.out_dir, n_taxa=args.taxa, per_class=args.per_class, image_size=args.image_size,
                         seed=args.seed, n_phyla=args.phyla, species_per_genus=args.species_per_genus,
                         internal_fraction=args.internal_fraction, difficulty=args.difficulty,
                         context=getattr(args, "context", True), image_format=args.image_format, progress=True,
                         sites=args.sites)
    print(summary)
    return 0


def run_download(args) -> int:
    from taxonomist.data.download import download_coco_images
    summary = download_coco_images(args.coco_json, args.out_dir, workers=args.workers, retries=args.retries,
                                   timeout=args.timeout, progress=True,
                                   allow_private_addresses=args.allow_private_addresses)
    print(summary)
    return 0 if summary.ok else 1


def run_prepare(args) -> int:
    from taxonomist.data.coco import prepare_coco
    summary = prepare_coco(args.coco_json, args.images_dir, args.out_dir, context=args.context,
                           taxonomy=args.taxonomy or None, min_size=args.min_size,
                           full_max_side=args.full_max_side, image_format=args.image_format,
                           workers=args.workers, progress=True)
    print(summary)
    return 0


def run_convert(args) -> int:
    import sys
    import warnings
    from taxonomist.data.readers import convert_to_dataset
    from taxonomist.errors import ConfigError
    rank_columns = {}
    for item in args.rank_column:
        rank, sep, column = item.partition("=")
        if not sep or not rank.strip() or not column.strip():
            raise ConfigError(f"--rank-column {item!r}: expected RANK=COLUMN, e.g. species=scientificName")
        rank_columns[rank.strip()] = column.strip()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = convert_to_dataset(args.source, args.out_dir, format=args.format, link=args.link,
                                     taxonomy=args.taxonomy or None, resolve_worms=args.resolve_worms,
                                     image_column=args.image_column or None, image_root=args.image_root or None,
                                     rank_columns=rank_columns or None, skip_missing=args.skip_missing,
                                     splits={k: getattr(args, k) for k in ("train", "val", "test")
                                             if getattr(args, k)} or None,
                                     worms_cache=args.cache or None, offline=args.offline, progress=True)
    for w in caught:  # one line each, like errors
        print(f"warning: {w.message}", file=sys.stderr)
    print(summary)
    return 0


def run_explore(args) -> int:
    from taxonomist.data.explore import explore_dataset
    summary = explore_dataset(args.dataset, args.out, progress=True)
    print(summary)
    return 0


def run_split(args) -> int:
    from taxonomist.data.split import split_dataset
    # --val is absent unless given: its default depends on --folds (0.15 without, none with)
    summary = split_dataset(args.dataset, val=getattr(args, "val", None), test=args.test, folds=args.folds,
                            ood_taxa=args.ood_taxa, classes=args.classes, min_per_class=args.min_per_class,
                            max_per_class=args.max_per_class, seed=args.seed, out=args.out or None)
    print(summary)
    if args.solution:
        from taxonomist.data.split import write_solution
        n = write_solution(summary.path, args.solution)
        print(f"wrote {args.solution}: the true names of the {n} test rows, for `taxonomist score`")
    return 0
