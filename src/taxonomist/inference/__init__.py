"""Inference: what needs the model itself — TTA views, calibration of a checkpoint, batch prediction.

Sits after `decide` in the data flow: it runs checkpoints (torch) and hands the arrays to `decide`'s numpy rules.
"""
from taxonomist.inference.calibrate import (Calibration, calibrate_checkpoint, calibrate_run, known_threshold,
                                            load_ood_scorers, ood_path, ood_threshold)
from taxonomist.inference.predict import PredictSummary, check_kaggle_submission, predict, read_images
from taxonomist.inference.tta import DEFAULT_TTA, TTA_PRESETS, TTAResult, View, parse_tta, run_inference_tta

__all__ = [
    "Calibration", "calibrate_checkpoint", "calibrate_run", "known_threshold", "load_ood_scorers", "ood_path",
    "ood_threshold", "PredictSummary", "check_kaggle_submission", "predict", "read_images", "DEFAULT_TTA",
    "TTA_PRESETS", "TTAResult", "View", "parse_tta", "run_inference_tta",
]
