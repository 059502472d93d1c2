"""Scores of answers against the true labels that training (its validation columns in metrics.csv) and
evaluation (metrics.json) both report, computed here once: macro-F1."""
from __future__ import annotations

import numpy as np


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Macro-averaged F1 over the classes present in `y_true` (a class never predicted scores 0); NaN when empty.

    >>> macro_f1(np.array([0, 0, 1]), np.array([0, 1, 1]))
    0.6666666666666666
    """
    from sklearn.metrics import f1_score
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if len(y_true) == 0:
        return float("nan")
    return float(f1_score(y_true, y_pred, labels=np.unique(y_true), average="macro", zero_division=0))


__all__ = ["macro_f1"]
