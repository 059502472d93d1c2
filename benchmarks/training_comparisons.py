"""Measure the training choices of docs/training.md on the demo data, one run per variant, same seed.

Each variant is an ordinary `taxonomist train` run (the demo settings plus a few `--set` overrides),
evaluated on the held-out test split. Prints a Markdown table and writes it, with the raw figures, to OUT.

    .venv/bin/python benchmarks/training_comparisons.py --out runs/comparisons          # all variants
    .venv/bin/python benchmarks/training_comparisons.py --out runs/cmp --only baseline,scratch
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

from taxonomist.demo import demo_config
from taxonomist.evaluate.run import evaluate_run
from taxonomist.train import train

#: name → (what it shows, overrides on top of the demo settings)
VARIANTS = {
    "baseline": ("pretrained lite0, flat head, CE (the demo)", []),
    "scratch": ("same, random initialisation", ["model.pretrained=none"]),
    "distance": ("CE + expected distance (weight 1.0)", ["loss.distance_weight=1.0"]),
    "multirank": ("flat label head + one head per rank", ["model.head=multirank"]),
    "two_stream": ("ROI + context, entropy-gated fusion", ["model.head=two_stream"]),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/comparisons")
    ap.add_argument("--only", default="", help="comma-separated variant names")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    out = Path(args.out)
    names = [n for n in args.only.split(",") if n] or list(VARIANTS)
    results = {}
    data_ready = False
    for name in names:
        what, overrides = VARIANTS[name]
        cfg = demo_config(out, args.device, overrides)
        cfg.out = str(out / name)
        if not data_ready:
            from taxonomist.data.split import split_dataset
            from taxonomist.data.synth import synthesize
            if not (Path(cfg.data.root) / "annotations.csv").exists():
                synthesize(cfg.data.root)
            split_dataset(cfg.data.root, val=0.15, test=0.15, seed=0)
            data_ready = True
        if Path(cfg.out).exists():
            shutil.rmtree(cfg.out)
        start = time.time()
        result = train(cfg, progress=False, log=lambda *a: None)
        ev = evaluate_run(cfg.out, split="test", device=args.device, progress=False)
        m = ev.metrics
        results[name] = {
            "what": what, "overrides": overrides, "best_epoch": result.best_epoch,
            "test_mhd": m["mhd"], "test_top1": m["top1"], "test_macro_f1": m["macro_f1"],
            "species_top1": m["per_rank"].get("species", {}).get("top1"),
            "phylum_top1": m["per_rank"].get("phylum", {}).get("top1"),
            "consistency": m.get("consistency"), "minutes": (time.time() - start) / 60,
        }
        print(json.dumps({name: results[name]}), flush=True)
    lines = ["| variant | what | test MHD | test top-1 | species top-1 | phylum top-1 | minutes |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        species = f"{r['species_top1']:.3f}" if r["species_top1"] is not None else "–"
        phylum = f"{r['phylum_top1']:.3f}" if r["phylum_top1"] is not None else "–"
        lines.append(f"| {name} | {r['what']} | {r['test_mhd']:.3f} | {r['test_top1']:.3f} | {species} | "
                     f"{phylum} | {r['minutes']:.1f} |")
    table = "\n".join(lines)
    print(table)
    machine = f"{platform.processor() or platform.machine()}, {platform.system()}"
    (out / "comparisons.md").write_text(table + "\n")
    (out / "comparisons.json").write_text(json.dumps({"machine": machine, "results": results}, indent=1))


if __name__ == "__main__":
    main()
