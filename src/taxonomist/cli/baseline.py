"""`taxonomist baseline stock|bioclip`: evaluate a model without fine-tuning → a run directory for `report`."""
from __future__ import annotations

EXAMPLE = """\
examples:
  taxonomist baseline stock timm/resnet50.a1_in1k --data data/fish --out runs/stock
  taxonomist baseline stock timm/vit_base_patch14_reg4_dinov2 --pretrained fungitastic.pth \\
      --class-names fungitastic_classes.txt --data data/fungi --out runs/stock
  taxonomist baseline bioclip --data data/fungi --out runs/bioclip
  taxonomist report runs/stock runs/bioclip runs/finetuned --out compare.html

stock: the model's own head is kept; its classes are mapped to the dataset's labels by name (comma-separated
synonyms as in timm's ImageNet names; a binomial whose species is not a node rolls up to its genus), the
unmapped ones dropped (counted in metrics.json baseline.mapping), several summed, probabilities renormalised.
bioclip: zero-shot over one prompt per label built from its lineage ("a photo of Animalia Chordata … Genus
epithet."). Both write config.yaml, taxonomy.csv, metrics.json, predictions.csv (and report.html) into --out.
"""


def register(sub, formatter):
    p = sub.add_parser("baseline", help="evaluate a stock classifier or BioCLIP zero-shot, no fine-tuning",
                       description="Evaluate a model trained elsewhere, as is, like a run.", epilog=EXAMPLE,
                       formatter_class=formatter)
    kinds = p.add_subparsers(dest="kind", metavar="KIND", required=True)
    stock = kinds.add_parser("stock", help="a timm classifier with its own label set, mapped by name",
                             formatter_class=formatter, epilog=EXAMPLE)
    stock.add_argument("model", metavar="timm/NAME", help="timm model name (with or without the timm/ prefix)")
    stock.add_argument("--class-names", metavar="FILE",
                       help="one class name per line, in output order (default: timm's ImageNet names)")
    bio = kinds.add_parser("bioclip", help="BioCLIP zero-shot over lineage prompts", formatter_class=formatter,
                           epilog=EXAMPLE)
    bio.add_argument("--model", default="hf-hub:imageomics/bioclip", help="open_clip model name")
    bio.add_argument("--template", action="append", metavar="TEXT",
                     help="prompt template with {} for the lineage (repeatable; default 'a photo of {}.')")
    for q in (stock, bio):
        q.add_argument("--data", metavar="DATASET", required=True, help="dataset directory")
        q.add_argument("--out", metavar="DIR", required=True, help="run directory to write")
        q.add_argument("--pretrained", default="auto", help="auto (downloads), none (random: tests) or a weights file")
        q.add_argument("--split", default="test", help="split to evaluate (test falls back to val)")
        q.add_argument("--image-size", type=int, help="input size (default: the model's)")
        q.add_argument("--decision", choices=["argmax", "min-risk", "backoff", "selective"], default="argmax")
        q.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
        q.add_argument("--batch-size", type=int, default=64)
        q.add_argument("--num-workers", type=int, default=-1, help="DataLoader workers; -1 = chosen for the machine")
        q.add_argument("--no-report", action="store_true", help="write metrics.json and predictions.csv only")
        q.set_defaults(func=run)


def run(args) -> int:
    import sys

    from taxonomist.evaluate.baseline import evaluate_bioclip, evaluate_stock

    common = dict(split=args.split, device=args.device, batch_size=args.batch_size, num_workers=args.num_workers,
                  progress=sys.stderr.isatty(), decision=args.decision, image_size=args.image_size)
    if args.kind == "stock":
        ev = evaluate_stock(args.model, args.data, args.out, class_names=args.class_names,
                            pretrained=args.pretrained, **common)
    else:
        ev = evaluate_bioclip(args.data, args.out, model=args.model, pretrained=args.pretrained,
                              templates=args.template, **common)
    print(ev.summary())
    for note in ev.metrics["notes"][:2]:
        print(f"  {note}")
    print(f"metrics      {ev.out_dir / 'metrics.json'}")
    print(f"predictions  {ev.out_dir / 'predictions.csv'}")
    if not args.no_report:
        from taxonomist.report import write_report
        print(f"report       {write_report([ev.out_dir], ev.out_dir / 'report.html')}")
    return 0
