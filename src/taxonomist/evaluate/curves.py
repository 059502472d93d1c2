"""Curves behind the report's figures, as small JSON-ready dicts: reliability bins, one-vs-rest ROC per rank
(binned, so 100,000 × 1,000 probabilities cost seconds), ROC points of OOD scores. Numpy only, no torch.
"""
from __future__ import annotations

import math

import numpy as np

from taxonomist.errors import DataError

#: Score bin edges for the one-vs-rest ROC: dense near 0 and near 1, where one-vs-rest scores pile up
#: (most negatives sit below 1e-3, most confident positives above 0.99).
_TAIL = np.geomspace(1e-6, 0.5, 100)
ROC_EDGES = np.unique(np.concatenate([[0.0], _TAIL, 1.0 - _TAIL[::-1], [1.0]]))

#: Points kept of a curve written into metrics.json.
MAX_POINTS = 200


def finite_or_none(x: float) -> float | None:
    """JSON has no NaN: an undefined number is written as null."""
    x = float(x)
    return x if math.isfinite(x) else None


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> dict:
    """Equal-width confidence bins over [0, 1] (as `expected_calibration_error` uses): per bin the mean
    confidence, the accuracy and the count. Empty bins hold null.

    >>> r = reliability_bins(np.array([0.95, 0.95, 0.25]), np.array([1, 0, 1]), bins=2)
    >>> r["confidence"], r["accuracy"], r["count"]
    ([0.25, 0.95], [1.0, 0.5], [1, 2])
    """
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=np.float64)
    if conf.shape != ok.shape or conf.ndim != 1:
        raise DataError(f"confidence and correct must be 1-D of one length, got {conf.shape} and {ok.shape}")
    idx = np.minimum((np.clip(conf, 0.0, 1.0) * bins).astype(np.int64), bins - 1)
    count = np.bincount(idx, minlength=bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=bins)
    acc_sum = np.bincount(idx, weights=ok, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf, acc = conf_sum / count, acc_sum / count
    return {"edges": np.linspace(0, 1, bins + 1).round(6).tolist(),
            "confidence": [finite_or_none(round(v, 6)) for v in mean_conf],
            "accuracy": [finite_or_none(round(v, 6)) for v in acc],
            "count": count.astype(int).tolist()}


def _trapezoid(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))


def one_vs_rest_roc(blocks, n_classes: int, edges: np.ndarray = ROC_EDGES) -> dict:
    """Micro- and macro-averaged one-vs-rest ROC of class scores, from binned score histograms.

    Args:
        blocks: an iterable of `(scores, truth)` chunks: scores (B, C) in [0, 1], truth (B,) class positions.
            Chunks keep the (B, C) temporaries small for 1,000 classes × 100,000 examples.
        n_classes: C.
        edges: ascending score bin edges; every edge is one threshold of the curves.

    Scores within one bin count as tied (ties count half in the AUC, as in the Mann–Whitney statistic), so
    the AUCs are exact for scores that differ only within a bin, and close otherwise.
    Returns `fpr`, `tpr` (micro-average: every (example, class) pair is one binary decision), `auc`,
    `macro_fpr`, `macro_tpr`, `macro_auc` (mean over classes with both positives and negatives) and `classes`
    (how many entered the macro average).

    >>> s = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    >>> round(one_vs_rest_roc([(s, np.array([0, 1, 0]))], 2)["macro_auc"], 6)
    1.0
    """
    B = len(edges) - 1
    pos = np.zeros((n_classes, B), dtype=np.int64)
    allh = np.zeros((n_classes, B), dtype=np.int64)
    offsets = np.arange(n_classes, dtype=np.int64) * B
    for scores, truth in blocks:
        scores = np.asarray(scores, dtype=np.float64)
        truth = np.asarray(truth, dtype=np.int64)
        if scores.ndim != 2 or scores.shape[1] != n_classes or truth.shape != (len(scores),):
            raise DataError(f"ROC chunk: expected scores (B, {n_classes}) and truth (B,), "
                            f"got {scores.shape} and {truth.shape}")
        b = np.clip(np.searchsorted(edges, scores, side="right") - 1, 0, B - 1)
        allh += np.bincount((b + offsets[None, :]).ravel(), minlength=n_classes * B).reshape(n_classes, B)
        own = b[np.arange(len(truth)), truth]
        pos += np.bincount(truth * B + own, minlength=n_classes * B).reshape(n_classes, B)
    neg = allh - pos
    # thresholds from the top bin down: flagged = score in this bin or above
    tp = np.concatenate([np.zeros((n_classes, 1)), np.cumsum(pos[:, ::-1], axis=1)], axis=1)
    fp = np.concatenate([np.zeros((n_classes, 1)), np.cumsum(neg[:, ::-1], axis=1)], axis=1)
    P, N = tp[:, -1], fp[:, -1]
    micro_tpr = tp.sum(0) / max(P.sum(), 1)
    micro_fpr = fp.sum(0) / max(N.sum(), 1)
    out = {"fpr": micro_fpr, "tpr": micro_tpr, "auc": _trapezoid(micro_fpr, micro_tpr)}
    ok = (P > 0) & (N > 0)
    grid = np.linspace(0.0, 1.0, 101)
    if ok.any():
        tpr_c = tp[ok] / P[ok, None]
        fpr_c = fp[ok] / N[ok, None]
        aucs = np.sum(np.diff(fpr_c, axis=1) * (tpr_c[:, 1:] + tpr_c[:, :-1]) / 2.0, axis=1)
        macro = np.mean([np.interp(grid, f, t) for f, t in zip(fpr_c, tpr_c)], axis=0)
        out.update(macro_fpr=grid, macro_tpr=macro, macro_auc=float(aucs.mean()), classes=int(ok.sum()))
    else:
        out.update(macro_fpr=grid[:0], macro_tpr=grid[:0], macro_auc=float("nan"), classes=0)
    return out


def downsample_curve(x: np.ndarray, y: np.ndarray, max_points: int = MAX_POINTS) -> tuple[list, list]:
    """At most `max_points` points of a monotone curve, first and last kept, rounded for JSON."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) > max_points:
        keep = np.unique(np.linspace(0, len(x) - 1, max_points).round().astype(np.int64))
        x, y = x[keep], y[keep]
    return x.round(6).tolist(), y.round(6).tolist()


def roc_points(scores_known: np.ndarray, scores_unknown: np.ndarray, max_points: int = MAX_POINTS) -> dict:
    """ROC of an OOD score (unknown = positive, higher = more unknown): `fpr`, `tpr`, at most `max_points`.

    >>> r = roc_points(np.array([0.1, 0.2]), np.array([0.3, 0.15]))
    >>> r["fpr"], r["tpr"]
    ([0.0, 0.0, 0.5, 0.5, 1.0], [0.0, 0.5, 0.5, 1.0, 1.0])
    """
    from sklearn.metrics import roc_curve
    known = np.asarray(scores_known, dtype=np.float64)
    unknown = np.asarray(scores_unknown, dtype=np.float64)
    y = np.concatenate([np.zeros(len(known)), np.ones(len(unknown))])
    fpr, tpr, _ = roc_curve(y, np.concatenate([known, unknown]))
    fx, ty = downsample_curve(fpr, tpr, max_points)
    return {"fpr": fx, "tpr": ty}


__all__ = ["ROC_EDGES", "MAX_POINTS", "finite_or_none", "reliability_bins", "one_vs_rest_roc", "downsample_curve",
           "roc_points"]
