"""Compare the feature-space OOD scores, and their settings, on one trained run and a dataset with `ood` rows.

The run's best checkpoint is run once over the train, val, test and ood rows (features and logits cached in
OUT/outputs.npz); then every scorer is fitted on the train rows and scored on test (known) vs ood (unknown),
with the threshold that keeps 95 % of the known val rows, as `predict --ood-tpr 0.95` does. This is how the
default of `--ood auto` was chosen (docs/decisions.md):

    .venv/bin/python benchmarks/ood_scores.py runs/plankton/runs/ood-finetune --data runs/plankton/data-ood \
        --out runs/plankton/ood-scores
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from taxonomist.utils.system import cpu_name

#: (row name, scorer, options): the stored defaults first, then the settings tried
CANDIDATES = [
    ("msp", "msp", {}), ("max-logit", "max-logit", {}), ("energy", "energy", {}),
    ("mahalanobis", "mahalanobis", {}),
    *[(f"mahalanobis, ridge {r:g}", "mahalanobis", {"ridge": r}) for r in (1e-3, 1e-2, 0.1, 0.3, 1.0, 3.0)],
    ("relative-mahalanobis", "relative-mahalanobis", {}),
    ("relative-mahalanobis, ridge 0.3", "relative-mahalanobis", {"ridge": 0.3}),
    ("vim", "vim", {}), *[(f"vim, {d} dims", "vim", {"dims": d}) for d in (64, 128, 256, 1024)],
    ("react-energy", "react-energy", {}), ("react-energy, p99", "react-energy", {"percentile": 99.0}),
    *[(f"knn k={k}", "knn", {"k": k, "max_bank": 20_000}) for k in (1, 10, 50, 100, 200, 500, 1000)],
]


def outputs(run: Path, data: Path, out: Path) -> dict[str, np.ndarray]:
    cache = out / "outputs.npz"
    if cache.is_file():
        return dict(np.load(cache))
    import torch

    from taxonomist.data.dataset import load_dataset
    from taxonomist.inference.run_model import infer_rows
    from taxonomist.train.checkpoint import load_checkpoint

    model, meta, taxonomy = load_checkpoint(run / "checkpoints" / "best.safetensors", device="cpu")
    dataset = load_dataset(data, taxonomy)
    index = {lab: i for i, lab in enumerate(meta["labels"])}
    frame = dataset.annotations
    arrays = {}
    for split in ("train", "val", "test", "ood"):
        rows = frame[frame["split"] == split]
        if split == "ood":  # unknown taxa: no label index; score them as unlabelled rows
            rows = rows.assign(label="")
        res = infer_rows(model, meta, dataset, rows, torch.device("cpu"), index, batch_size=128,
                         num_workers=1, progress=False, desc=split).result
        arrays[f"{split}_features"], arrays[f"{split}_logits"] = res.features, res.logits
        arrays[f"{split}_targets"] = res.targets
        print(f"{split}: {len(res.logits)} rows", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **arrays)
    return arrays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a trained run directory")
    parser.add_argument("--data", required=True, help="its dataset, with train/val/test/ood rows")
    parser.add_argument("--out", required=True, help="folder for outputs.npz, results.json, results.md")
    args = parser.parse_args()

    from taxonomist.decide import build_ood_scorer, ood_metrics, threshold_metrics
    from taxonomist.inference.calibrate import known_threshold

    out = Path(args.out)
    start = time.time()
    a = outputs(Path(args.run), Path(args.data), out)
    rows = []
    for name, method, options in CANDIDATES:
        t0 = time.time()
        scorer = build_ood_scorer(method, **options).fit(a["train_features"], a["train_logits"], a["train_targets"])
        known, unknown = (scorer.score(a[f"{s}_features"], a[f"{s}_logits"]) for s in ("test", "ood"))
        m = ood_metrics(known, unknown)
        m.update(threshold_metrics(known, unknown, known_threshold(
            scorer.score(a["val_features"], a["val_logits"]), 0.95)))
        rows.append({"score": name, **m, "seconds": time.time() - t0})
        print(f"{name:28s} AUROC {m['auroc']:.3f}  FPR95 {m['fpr95']:.3f}  recall {m['recall']:.3f}", flush=True)
    result = {"run": args.run, "data": args.data, "cpu": cpu_name(), "n_known": len(a["test_logits"]),
              "n_unknown": len(a["ood_logits"]), "rows": rows, "seconds": time.time() - start}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    lines = ["| score | AUROC | FPR95 | precision | recall | known flagged |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['score']} | {r['auroc']:.3f} | {r['fpr95']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} | "
              f"{r['known_flagged']:.3f} |" for r in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print(f"done in {time.time() - start:.0f} s; {out / 'results.md'}")


if __name__ == "__main__":
    main()
