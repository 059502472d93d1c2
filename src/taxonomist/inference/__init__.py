"""Inference: what needs the model itself — one forward pass over a loader (`run_inference`, also training's
validation), loading a model file, TTA views, calibration of a checkpoint, batch prediction.

It runs models (torch) and hands the arrays to `decide`'s numpy rules; `train`, `evaluate` and `deploy` build on it.
"""
from taxonomist.inference.calibrate import (Calibration, calibrate_checkpoint, calibrate_run, known_threshold,
                                            load_ood_scorers, ood_threshold)
from taxonomist.inference.forward import InferenceResult, run_inference
from taxonomist.inference.model_file import LoadedModel, load_model, ood_path, read_card
from taxonomist.inference.predict import PredictSummary, check_kaggle_submission, predict, read_images
from taxonomist.inference.tta import DEFAULT_TTA, TTA_PRESETS, TTAResult, View, parse_tta, run_inference_tta

__all__ = [
    "InferenceResult", "run_inference", "load_model", "LoadedModel", "read_card", "Calibration", "calibrate_checkpoint", "calibrate_run",
    "known_threshold", "load_ood_scorers", "ood_path",
    "ood_threshold", "PredictSummary", "check_kaggle_submission", "predict", "read_images", "DEFAULT_TTA",
    "TTA_PRESETS", "TTAResult", "View", "parse_tta", "run_inference_tta",
]
