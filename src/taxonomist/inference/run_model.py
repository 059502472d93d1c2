"""Run a model over dataset rows with its own eval preprocessing (and optional TTA).

The one path from (model card, rows) to logits and features that calibration, predict, evaluate and benchmarks share.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import pandas as pd

from taxonomist.card import DataSettings, ModelCard, Preprocessing
from taxonomist.config import Config
from taxonomist.data.dataset import Dataset
from taxonomist.errors import ModelError


def input_settings(card: ModelCard | Mapping[str, Any]) -> tuple[int, Preprocessing, DataSettings, bool]:
    """(input side, preprocessing, data settings, two-stream) of a model card — or of a dict with the card's
    `image_size`, `preprocessing`, `data` and `head` keys (e.g. the benchmark's, for a model not yet saved)."""
    try:
        if isinstance(card, ModelCard):
            if card.preprocessing is None:
                raise KeyError("preprocessing")
            return card.image_size, card.preprocessing, card.data, card.two_stream
        return (int(card["image_size"]), Preprocessing.from_dict(card["preprocessing"]),
                DataSettings.from_dict(card.get("data")), card.get("head") == "two_stream")
    except (KeyError, TypeError, ValueError) as e:
        raise ModelError(f"checkpoint metadata lacks preprocessing information ({e})") from None


def eval_transform(card: ModelCard | Mapping[str, Any]):
    """The eval transform (resize, centre crop, normalise) a model was validated with, from its card."""
    from taxonomist.data.loading import build_transforms

    size, pre, data, _ = input_settings(card)
    cfg = Config()
    cfg.data.image_size = size
    cfg.data.resize = data.resize
    cfg.data.grayscale = data.grayscale
    cfg.augment.crop_pct = data.crop_pct
    return build_transforms(cfg, False, list(pre.mean), list(pre.std), pre.interpolation)


def rows_loader(card: ModelCard | Mapping[str, Any], dataset: Dataset, rows: pd.DataFrame,
                label_index: dict[str, int], batch_size: int = 64, num_workers: int = -1, allow_unknown: bool = False,
                strict: bool = False, path_column: str | None = None):
    """(TaxonDataset, DataLoader) over `rows` with the model's eval transform, in row order.

    Two-stream models get each row's `context_path` image too; `path_column` defaults to the column the model
    was trained on (`path`, or `context_path` for context-input models). Close the loader when done.
    """
    from taxonomist.data.loading import TaxonDataset, build_loader

    tf = eval_transform(card)
    _, _, data, two_stream = input_settings(card)
    ds = TaxonDataset(dataset, rows, tf, context_transform=tf if two_stream else None, with_context=two_stream,
                      strict=strict, label_index=label_index, allow_unknown=allow_unknown,
                      path_column=path_column or data.input)
    return ds, build_loader(ds, batch_size, train=False, num_workers=num_workers)


@dataclass
class RowsOutput:
    """The model's outputs over some rows; `result.indices` are positions in those rows (skipped ones absent)."""

    result: object                                  # InferenceResult or TTAResult
    skipped: list = field(default_factory=list)     # SkippedImage entries: unreadable images left out


def infer_rows(model, card: ModelCard | Mapping[str, Any], dataset: Dataset, rows: pd.DataFrame, device, label_index: dict[str, int],
               batch_size: int = 64, num_workers: int = -1, progress: bool = False, desc: str = "predict",
               tta=None, tta_mode: str = "mean_probs", temperature: float = 1.0, allow_unknown: bool = False,
               strict: bool = False, path_column: str | None = None, amp: bool = True) -> RowsOutput:
    """Forward `rows` of `dataset` through `model` as its card prescribes.

    Without `tta` this is `run_inference` (raw logits; apply the temperature yourself). With `tta` (a list
    of `View`s) it is `run_inference_tta` with `temperature` applied per view before merging. `path_column`
    defaults to the column the model was trained on (`path`, or `context_path` for context-input models).
    `amp` runs the forward pass under bf16 autocast on CUDA (ignored on CPU, and for ONNX models).
    """
    from taxonomist.inference.tta import run_inference_tta
    from taxonomist.inference.forward import run_inference

    ds, loader = rows_loader(card, dataset, rows, label_index, batch_size, num_workers, allow_unknown, strict,
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
