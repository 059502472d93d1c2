"""Time the HTML report at scale: 100,000 predictions over 1,000 labels by default, no model.

Builds a seven-rank tree (8 phyla → 24 classes → 72 orders → 216 families → 648 genera → 1,000 species,
the labels), draws Zipf-distributed true labels and logits that confuse genus- and family-mates, evaluates
them with `evaluate_outputs` (timed on its own), writes metrics.json + predictions.csv + taxonomy.csv and 400
small JPEG specimens for the galleries, then times `write_report` and measures the file. Prints one JSON
line; docs/report.md quotes it.

    .venv/bin/python benchmarks/report_scale.py                       # the figure in docs/report.md
    .venv/bin/python benchmarks/report_scale.py --n 20000 --keep /tmp/scale   # smaller, keep the files
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from taxonomist.evaluate.outputs import evaluate_outputs
from taxonomist.report import write_report
from taxonomist.taxonomy import RANKS, Taxonomy, write_taxonomy
from taxonomist.utils.system import cpu_name

FAN = (8, 3, 3, 3, 3)  # children per node from kingdom to genus; species fill the genera up to --labels
N_IMAGES = 400


def synthetic_taxonomy(n_labels: int, seed: int) -> Taxonomy:
    parents: dict[str, str | None] = {"Animalia": None}
    ranks = {"Animalia": "kingdom"}
    level = ["Animalia"]
    for depth, fan in enumerate(FAN, start=1):
        nxt = []
        for p in level:
            for k in range(fan):
                name = f"{RANKS[depth].capitalize()} {p.split()[-1] if depth > 1 else ''}{chr(97 + k)}".replace("  ", " ")
                parents[name] = p
                ranks[name] = RANKS[depth]
                nxt.append(name)
        level = nxt
    rng = np.random.default_rng(seed)
    per_genus = np.ones(len(level), dtype=int) + np.bincount(rng.integers(0, len(level), n_labels - len(level)),
                                                              minlength=len(level))
    species = []
    for genus, count in zip(level, per_genus):
        for k in range(count):
            name = f"{genus.split()[-1]} sp{k}"
            parents[name] = genus
            ranks[name] = "species"
            species.append(name)
    return Taxonomy.from_parents(parents, labels=species, ranks=ranks, source_format="ranks")


def synthetic_outputs(tax: Taxonomy, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Zipf-like label frequencies; logits favour the true label, then its genus-, then family-mates."""
    rng = np.random.default_rng(seed)
    L = len(tax.labels)
    freq = 1.0 / np.arange(1, L + 1) ** 0.8
    targets = rng.choice(L, size=n, p=freq / freq.sum())
    genus = np.array([tax.ancestor_at(s, "genus") for s in tax.labels])
    family = np.array([tax.ancestor_at(s, "family") for s in tax.labels])
    same_genus = (genus[:, None] == genus[None, :]).astype(np.float32)
    same_family = (family[:, None] == family[None, :]).astype(np.float32)
    logits = np.empty((n, L), dtype=np.float32)
    for s in range(0, n, 5000):
        t = targets[s:s + 5000]
        z = rng.normal(0.0, 1.0, (len(t), L)).astype(np.float32)
        # about 70 % right at species, 86 % at genus, 90 % at family: errors mostly among close relatives
        z += 1.5 * same_family[t] + 2.0 * same_genus[t]
        z[np.arange(len(t)), t] += rng.normal(1.0, 1.0, len(t)).astype(np.float32)
        logits[s:s + len(t)] = z
    return logits, targets


def write_images(root: Path, count: int, seed: int) -> list[str]:
    from PIL import Image
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    paths = []
    for k in range(count):
        pixels = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
        path = f"images/{k:04d}.jpg"
        Image.fromarray(pixels).save(root / path, quality=85)
        paths.append(path)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000, help="predictions")
    ap.add_argument("--labels", type=int, default=1000, help="labels (species); at least 648")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", metavar="DIR", help="write the evaluation and report here and keep them")
    args = ap.parse_args()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="report-scale-"))
    try:
        tax = synthetic_taxonomy(args.labels, args.seed)
        logits, targets = synthetic_outputs(tax, args.n, args.seed)
        t0 = time.perf_counter()
        res = evaluate_outputs(logits, targets, tax, "fathomnet2025")
        t_eval = time.perf_counter() - t0
        del logits
        data = work / "data"
        images = write_images(data, N_IMAGES, args.seed)
        out = work / "eval"
        out.mkdir(parents=True, exist_ok=True)
        m = res.metrics
        m.update(split="test", data=str(data), run_dir=None, checkpoint="(synthetic: no model)",
                 group_level="phylum", epoch=None)
        paths = np.asarray(images, dtype=object)[np.arange(args.n) % len(images)]
        pd.DataFrame({"path": paths, **res.columns}).to_csv(out / "predictions.csv", index=False)
        (out / "metrics.json").write_text(json.dumps(m))
        write_taxonomy(tax, out / "taxonomy.csv")
        critical = tax.ancestor_at(tax.labels[0], "genus")
        t0 = time.perf_counter()
        report = write_report([out], out / "report.html", critical=[critical])
        t_report = time.perf_counter() - t0
        print(json.dumps({
            "predictions": args.n, "labels": len(tax.labels), "nodes": len(tax),
            "report_seconds": round(t_report, 1), "report_mb": round(report.stat().st_size / 1e6, 2),
            "evaluate_outputs_seconds": round(t_eval, 1), "mhd": round(m["mhd"], 3), "top1": round(m["top1"], 3),
            "cpu": cpu_name(), "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        }))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
