"""K-fold driver: one training run per fold of the dataset's `fold` column, then out-of-fold predictions.

Out-of-fold logits let ensembles fit their weights (and temperatures) on data no member saw.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from taxonomist.config import Config
from taxonomist.data.augment_presets import describe_augment, resolve_augment
from taxonomist.data.dataset import load_dataset
from taxonomist.errors import DataError
from taxonomist.taxonomy import distance_matrix
from taxonomist.data.split import split_rows
from taxonomist.train.loop import TrainResult, train
from taxonomist.utils.files import atomic_path, atomic_write_text


@dataclass
class KFoldResult:
    out_dir: Path
    folds: list[TrainResult]
    oof_mhd: float
    oof_top1: float

    def summary(self) -> str:
        lines = [f"{len(self.folds)} folds in {self.out_dir}"]
        for k, r in enumerate(self.folds):
            lines.append(f"  fold {k}: best {r.monitor} {r.best_metric:.4f} at epoch {r.best_epoch}")
        lines.append(f"  out-of-fold: MHD {self.oof_mhd:.4f}  top-1 {self.oof_top1:.4f}")
        return "\n".join(lines)


def fold_values(dataset) -> list[int]:
    frame = dataset.annotations
    if "fold" not in frame.columns:
        raise DataError(f"{dataset.root}: no 'fold' column; run `taxonomist data split DATASET --folds K` first")
    values = sorted({int(v) for v in frame["fold"] if v not in ("", "-1")})
    if len(values) < 2:
        raise DataError(f"{dataset.root}: the fold column holds {len(values)} fold(s); need at least 2")
    return values


def train_kfold(cfg: Config, progress: bool = True, resume: bool = False, log=print) -> KFoldResult:
    """Train `out/fold_K` for every fold K and write `out/oof_predictions.csv` and `out/oof_logits.npy`."""
    from taxonomist.train.checkpoint import load_checkpoint
    from taxonomist.inference.forward import run_inference
    from taxonomist.data.loading import TaxonDataset, build_loader, build_transforms

    dataset = load_dataset(cfg.data.root, cfg.data.taxonomy or None)
    folds = fold_values(dataset)
    out = Path(cfg.out)
    # every fold trains with the same augmentation: `augment.preset=auto` is decided once, on the first fold's budget
    first = copy.deepcopy(cfg)
    first.data.fold = folds[0]
    budget = {"epochs": cfg.train.epochs, "train_images": len(split_rows(dataset, first)[0])}
    log(describe_augment(cfg.augment, **budget))
    cfg = copy.deepcopy(cfg)
    cfg.augment = resolve_augment(cfg.augment, **budget)
    results, frames, logits_all, index_all = [], [], [], []
    for k in folds:
        fold_cfg = copy.deepcopy(cfg)
        fold_cfg.data.fold = k
        fold_cfg.out = str(out / f"fold_{k}")
        done = (Path(fold_cfg.out) / "metrics.csv").exists()
        log(f"fold {k} ({folds.index(k) + 1}/{len(folds)})")
        results.append(train(fold_cfg, progress=progress, resume=resume and done, log=log))
        model, meta, taxonomy = load_checkpoint(Path(fold_cfg.out), device="cpu")
        pre = meta["preprocessing"]
        tf = build_transforms(fold_cfg, False, pre["mean"], pre["std"], pre.get("interpolation", "bicubic"))
        rows = dataset.annotations[(dataset.annotations["fold"] == str(k)) & (dataset.annotations["label"] != "")]
        if "split" in rows.columns:
            rows = rows[rows["split"].isin(["train", "val", ""])]
        label_index = {lab: i for i, lab in enumerate(taxonomy.labels)}
        two = meta["head"] == "two_stream"
        ds = TaxonDataset(dataset, rows, tf, context_transform=tf if two else None, with_context=two,
                          label_index=label_index, path_column=meta["data"].get("input", "path"))
        import torch
        res = run_inference(model, build_loader(ds, cfg.train.batch_size, train=False,
                                                num_workers=cfg.data.num_workers), torch.device("cpu"))
        sub = rows.iloc[res.indices]
        logits_all.append(res.logits)
        index_all.append(sub.index.to_numpy())
        probs = torch.softmax(torch.from_numpy(res.logits), dim=1).numpy()
        frames.append(pd.DataFrame({"row": sub.index.to_numpy(), "path": sub["path"].to_numpy(), "fold": k,
                                    "label": sub["label"].to_numpy(),
                                    "prediction": [taxonomy.labels[i] for i in probs.argmax(1)],
                                    "confidence": probs.max(1).round(6)}))
    oof = pd.concat(frames).sort_values("row")
    labels = list(taxonomy.labels)
    D = distance_matrix(taxonomy, meta["metric"], labels, labels)
    pos = {lab: i for i, lab in enumerate(labels)}
    t = oof["label"].map(pos).to_numpy()
    p = oof["prediction"].map(pos).to_numpy()
    oof["distance"] = D[t, p]
    with atomic_path(out / "oof_predictions.csv") as tmp:
        oof.drop(columns="row").to_csv(tmp, index=False)
    order = np.argsort(np.concatenate(index_all))
    with atomic_path(out / "oof_logits.npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.concatenate(logits_all)[order])
    mhd, top1 = float(D[t, p].mean()), float((t == p).mean())
    atomic_write_text(out / "oof_metrics.json", json.dumps({"mhd": mhd, "top1": top1, "n": int(len(t)),
                                                            "folds": folds}, indent=1))
    return KFoldResult(out, results, mhd, top1)
