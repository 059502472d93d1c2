"""Evaluate a trained run (or checkpoint) on a dataset split: metrics.json and predictions.csv.

The model is run once; every figure comes from the resulting arrays through `evaluate.metrics`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from taxonomist.config import load_config
from taxonomist.data.dataset import load_dataset
from taxonomist.errors import DataError
from taxonomist.evaluate.metrics import (classification_metrics, expected_calibration_error, level_matrices,
                                         lineage_consistency)
from taxonomist.taxonomy import distance_matrix
from taxonomist.utils.files import atomic_path, atomic_write_text


@dataclass
class Evaluation:
    metrics: dict
    predictions: pd.DataFrame
    out_dir: Path
    split: str

    def summary(self) -> str:
        m = self.metrics
        lines = [f"evaluated {m['n']} examples ({self.split} split) with metric {m['metric']}",
                 f"  mean hierarchical distance  {m['mhd']:.3f}",
                 f"  top-1                       {m['top1']:.3f}",
                 f"  macro-F1                    {m['macro_f1']:.3f}",
                 f"  hierarchical accuracy       {m['hierarchical_accuracy']:.3f}"]
        for level, v in m["per_rank"].items():
            lines.append(f"  {level:<12} top-1 {v['top1']:.3f}  top-5 {v['top5']:.3f}  n={v['n']}")
        return "\n".join(lines)


def _rows_for_split(dataset, run_dir: Path | None, split: str):
    frame = dataset.annotations
    if "split" in frame.columns and split in set(frame["split"]):
        return frame[frame["split"] == split], split
    if split in ("test", "val"):
        # no such split column values: recreate the validation rows the training run held out
        from taxonomist.train.loop import split_rows
        cfg_file = run_dir / "config.yaml" if run_dir else None
        cfg = load_config(cfg_file if cfg_file and cfg_file.is_file() else None)
        if "split" in frame.columns and split == "test" and "val" in set(frame["split"]):
            return frame[frame["split"] == "val"], "val"
        _, val = split_rows(dataset, cfg)
        return val, "val"
    raise DataError(f"{dataset.root}: no rows with split {split!r}")


def evaluate_run(run_or_checkpoint: str | Path, data: str | Path | None = None, split: str = "test",
                 out: str | Path | None = None, device: str = "auto", batch_size: int = 64,
                 num_workers: int = -1, progress: bool = True) -> Evaluation:
    """Run the checkpoint over `split` of the dataset and write metrics.json + predictions.csv into `out`
    (default: the run directory). `split` falls back to the validation rows when the dataset has no test split.
    """
    from taxonomist.data.loading import TaxonDataset, build_loader, build_transforms
    from taxonomist.train.checkpoint import load_checkpoint, resolve_checkpoint
    from taxonomist.decide import apply_temperature, softmax
    from taxonomist.train.inference import run_inference
    from taxonomist.train.loop import configure_threads, select_device

    ckpt = resolve_checkpoint(run_or_checkpoint)
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None
    dev = select_device(device)
    configure_threads(0, dev, num_workers)
    model, meta, taxonomy = load_checkpoint(ckpt, device=str(dev))
    if data is None:
        cfg_file = run_dir / "config.yaml" if run_dir else None
        if not cfg_file or not cfg_file.is_file():
            raise DataError("no dataset given: pass --data DATASET")
        data = load_config(cfg_file).data.root
    dataset = load_dataset(data, taxonomy)
    rows, used_split = _rows_for_split(dataset, run_dir, split)
    rows = rows[rows["label"] != ""]
    unknown = sorted(set(rows["label"]) - set(taxonomy.labels))
    if unknown:
        raise DataError(f"{dataset.root}: label {unknown[0]!r} was not among the model's training labels "
                        f"({len(unknown)} such labels)")
    if rows.empty:
        raise DataError(f"{dataset.root}: no labelled rows in the {used_split} split")

    from taxonomist.config import Config
    cfg = Config()
    cfg.data.image_size = int(meta["image_size"])
    cfg.data.resize = meta["data"]["resize"]
    cfg.data.grayscale = meta["data"]["grayscale"]
    cfg.augment.crop_pct = meta["data"]["crop_pct"]
    pre = meta["preprocessing"]
    tf = build_transforms(cfg, False, pre["mean"], pre["std"], pre.get("interpolation", "bicubic"))
    two_stream = meta["head"] == "two_stream"
    labels = list(taxonomy.labels)
    label_index = {lab: i for i, lab in enumerate(labels)}
    ds = TaxonDataset(dataset, rows, tf, context_transform=tf if two_stream else None, with_context=two_stream,
                      label_index=label_index, path_column=meta["data"].get("input", "path"))
    loader = build_loader(ds, batch_size, train=False, num_workers=num_workers)
    res = run_inference(model, loader, dev, progress=progress, desc="evaluate")
    temperature = float(meta.get("temperature", 1.0))
    probs = apply_temperature(res.logits, temperature)
    metric = meta.get("metric", "lca")
    D = distance_matrix(taxonomy, metric, labels, labels)
    m = classification_metrics(probs, res.targets, taxonomy, D)
    # `ece` is measured on the probabilities the model reports (after its temperature, when it has one)
    raw = softmax(res.logits)
    m["ece"] = m["ece_uncalibrated"]
    m["ece_uncalibrated"] = expected_calibration_error(raw.max(1), raw.argmax(1) == res.targets)
    m["temperature"] = temperature
    m["metric"] = metric
    m["split"] = used_split
    m["checkpoint"] = str(ckpt)
    m["taxonomy_hash"] = taxonomy.hash
    m["epoch"] = meta.get("epoch")
    if res.rank_logits:
        preds = [res.rank_logits[name].argmax(1) for name, _, _ in level_matrices(taxonomy) if name in res.rank_logits]
        if len(preds) == len(taxonomy.levels()):
            m["consistency"] = lineage_consistency(preds, taxonomy)

    pred = probs.argmax(1)
    sub = rows.iloc[res.indices]
    frame = pd.DataFrame({
        "path": sub["path"].to_numpy(),
        "label": [labels[t] for t in res.targets],
        "prediction": [labels[p] for p in pred],
        "confidence": probs[np.arange(len(pred)), pred].round(6),
        "distance": D[res.targets, pred],
    })
    for col in ("annotation_id", "image_id"):
        if col in sub.columns:
            frame.insert(1, col, sub[col].to_numpy())
    out_dir = Path(out) if out else (run_dir or ckpt.parent)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "predictions.csv") as tmp:
        frame.to_csv(tmp, index=False)
    atomic_write_text(out_dir / "metrics.json", json.dumps(m, indent=1))
    return Evaluation(m, frame, out_dir, used_split)
