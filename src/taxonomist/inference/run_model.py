"""Run a checkpoint's model over dataset rows with the checkpoint's own eval preprocessing (and optional TTA).

The one path from (checkpoint metadata, rows) to logits and features that calibration, predict and benchmarks share.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from taxonomist.config import Config
from taxonomist.data.dataset import Dataset
from taxonomist.errors import ModelError


def eval_transform(meta: dict):
    """The eval transform (resize, centre crop, normalise) a checkpoint was validated with, from its metadata."""
    from taxonomist.data.loading import build_transforms

    try:
        cfg = Config()
        cfg.data.image_size = int(meta["image_size"])
        data = meta.get("data", {})
        cfg.data.resize = data.get("resize", "stretch")
        cfg.data.grayscale = bool(data.get("grayscale", False))
        cfg.augment.crop_pct = float(data.get("crop_pct", cfg.augment.crop_pct))
        pre = meta["preprocessing"]
        return build_transforms(cfg, False, pre["mean"], pre["std"], pre.get("interpolation", "bicubic"))
    except (KeyError, TypeError, ValueError) as e:
        raise ModelError(f"checkpoint metadata lacks preprocessing information ({e})") from None


def rows_loader(meta: dict, dataset: Dataset, rows: pd.DataFrame, label_index: dict[str, int], batch_size: int = 64,
                num_workers: int = -1, allow_unknown: bool = False, strict: bool = False,
                path_column: str | None = None):
    """(TaxonDataset, DataLoader) over `rows` with the checkpoint's eval transform, in row order.

    Two-stream models get each row's `context_path` image too; `path_column` defaults to the column the model
    was trained on (`path`, or `context_path` for context-input models). Close the loader when done.
    """
    from taxonomist.data.loading import TaxonDataset, build_loader

    tf = eval_transform(meta)
    two_stream = meta.get("head") == "two_stream"
    ds = TaxonDataset(dataset, rows, tf, context_transform=tf if two_stream else None, with_context=two_stream,
                      strict=strict, label_index=label_index, allow_unknown=allow_unknown,
                      path_column=path_column or meta.get("data", {}).get("input", "path"))
    return ds, build_loader(ds, batch_size, train=False, num_workers=num_workers)


@dataclass
class RowsOutput:
    """The model's outputs over some rows; `result.indices` are positions in those rows (skipped ones absent)."""

    result: object                                  # InferenceResult or TTAResult
    skipped: list = field(default_factory=list)     # SkippedImage entries: unreadable images left out


def infer_rows(model, meta: dict, dataset: Dataset, rows: pd.DataFrame, device, label_index: dict[str, int],
               batch_size: int = 64, num_workers: int = -1, progress: bool = False, desc: str = "predict",
               tta=None, tta_mode: str = "mean_probs", temperature: float = 1.0, allow_unknown: bool = False,
               strict: bool = False, path_column: str | None = None, amp: bool = True) -> RowsOutput:
    """Forward `rows` of `dataset` through `model` as the checkpoint `meta` prescribes.

    Without `tta` this is `run_inference` (raw logits; apply the temperature yourself). With `tta` (a list
    of `View`s) it is `run_inference_tta` with `temperature` applied per view before merging. `path_column`
    defaults to the column the model was trained on (`path`, or `context_path` for context-input models).
    `amp` runs the forward pass under bf16 autocast on CUDA (ignored on CPU, and for ONNX models).
    """
    from taxonomist.inference.tta import run_inference_tta
    from taxonomist.train.inference import run_inference

    ds, loader = rows_loader(meta, dataset, rows, label_index, batch_size, num_workers, allow_unknown, strict,
                             path_column)
    try:
        if tta:
            result = run_inference_tta(model, loader, device, tta, mode=tta_mode, temperature=temperature,
                                       amp=amp, progress=progress, desc=desc)
        else:
            result = run_inference(model, loader, device, amp=amp, progress=progress, desc=desc)
    finally:
        loader.close()
    return RowsOutput(result, list(ds.skipped))
