"""Classification metrics on numpy arrays: mean hierarchical distance, top-k, macro-F1, log loss, ECE,
and per-rank (per-level) figures obtained by summing label probabilities up the tree. No torch.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from taxonomist.decide.calibration import expected_calibration_error
from taxonomist.decide.scores import macro_f1  # defined below training, whose validation reports it too
from taxonomist.errors import DataError
from taxonomist.taxonomy import Taxonomy


def _check(probs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    if probs.ndim != 2:
        raise DataError(f"probs must be 2-D (examples × labels), got shape {probs.shape}")
    if targets.shape != (probs.shape[0],):
        raise DataError(f"targets must have one entry per row of probs ({probs.shape[0]}), got {targets.shape}")
    if len(targets) and (targets.min() < 0 or targets.max() >= probs.shape[1]):
        raise DataError(f"targets must lie in [0, {probs.shape[1]}), got {targets.min()}…{targets.max()}")
    return probs, targets


def log_loss(probs: np.ndarray, targets: np.ndarray, eps: float = 1e-15) -> float:
    """Multiclass log loss (the NDSB 2015 competition metric): probabilities clipped to [eps, 1-eps]
    and renormalised per row, as Kaggle's scorer does."""
    p = np.clip(probs, eps, 1 - eps)
    p = p / p.sum(axis=1, keepdims=True)
    return float(-np.log(p[np.arange(len(targets)), targets]).mean()) if len(targets) else float("nan")


def level_matrices(taxonomy: Taxonomy) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """For each level: (name, (L, n_nodes) 0/1 aggregation matrix, label→node position with -1)."""
    out = []
    for level in taxonomy.levels():
        mapping = level.label_to_node
        agg = np.zeros((len(mapping), len(level.nodes)))
        has = mapping >= 0
        agg[np.arange(len(mapping))[has], mapping[has]] = 1.0
        out.append((level.name, agg, mapping))
    return out


def per_level_metrics(probs: np.ndarray, targets: np.ndarray, taxonomy: Taxonomy) -> tuple[dict, np.ndarray]:
    """Top-1/top-5/macro-F1/average confidence at each rank (or depth), from probabilities summed up the tree.

    Examples whose true label has no node at a level (a genus-level label at species) are left out of
    that level. Returns the metrics and a boolean (N,) "every level right" vector.
    """
    probs, targets = _check(probs, targets)
    all_right = np.ones(len(targets), dtype=bool)
    result = {}
    for name, agg, mapping in level_matrices(taxonomy):
        truth = mapping[targets]
        keep = truth >= 0
        if not keep.any():
            continue
        level_probs = probs[keep] @ agg
        pred = level_probs.argmax(axis=1)
        t = truth[keep]
        k = min(5, level_probs.shape[1])
        top5 = np.argpartition(-level_probs, k - 1, axis=1)[:, :k]
        right = pred == t
        all_right[np.flatnonzero(keep)[~right]] = False
        result[name] = {
            "top1": float(right.mean()),
            "top5": float((top5 == t[:, None]).any(axis=1).mean()),
            "macro_f1": macro_f1(t, pred),
            "avg_confidence": float(level_probs.max(axis=1).mean()),
            "n": int(keep.sum()),
        }
    return result, all_right


def classification_metrics(probs: np.ndarray, targets: np.ndarray, taxonomy: Taxonomy, distance: np.ndarray,
                           predictions: np.ndarray | None = None) -> dict:
    """The core of `metrics.json` for label-level predictions.

    Args:
        probs: (N, L) probabilities over `taxonomy.labels`.
        targets: (N,) true label indices.
        distance: (L, L) taxonomic distance, rows truth, columns prediction.
        predictions: (N,) predicted label indices; default argmax.

    >>> from taxonomist.taxonomy import Taxonomy, lca_distance
    >>> tax = Taxonomy.from_parents({"A": None, "B": "A", "C": "A"})
    >>> m = classification_metrics(np.array([[0.9, 0.1], [0.6, 0.4]]), np.array([0, 1]), tax, lca_distance(tax))
    >>> m["top1"], m["mhd"]
    (0.5, 1.0)
    """
    probs, targets = _check(probs, targets)
    pred = probs.argmax(axis=1) if predictions is None else np.asarray(predictions, dtype=np.int64)
    dist = distance[targets, pred]
    correct = pred == targets
    per_level, all_right = per_level_metrics(probs, targets, taxonomy)
    k = min(5, probs.shape[1])
    top5 = np.argpartition(-probs, k - 1, axis=1)[:, :k]
    return {
        "n": int(len(targets)),
        "mhd": float(dist.mean()) if len(dist) else float("nan"),
        "top1": float(correct.mean()) if len(dist) else float("nan"),
        "top5": float((top5 == targets[:, None]).any(axis=1).mean()) if len(dist) else float("nan"),
        "macro_f1": macro_f1(targets, pred),
        "log_loss": log_loss(probs, targets),
        "hierarchical_accuracy": float(all_right.mean()) if len(dist) else float("nan"),
        "ece_uncalibrated": expected_calibration_error(probs.max(axis=1), correct),
        "per_rank": per_level,
        "distance_histogram": {f"{v:g}": int(c) for v, c in zip(*np.unique(dist, return_counts=True))},
    }


def lineage_consistency(level_predictions: Sequence[np.ndarray], taxonomy: Taxonomy) -> float:
    """Share of examples whose per-level predicted nodes all lie on one lineage (multirank heads).

    `level_predictions[k]` holds, for each example, the predicted position among level k's nodes.
    """
    levels = taxonomy.levels()
    if len(level_predictions) != len(levels):
        raise DataError(f"expected predictions for {len(levels)} levels, got {len(level_predictions)}")
    if not len(levels) or not len(level_predictions[0]):
        return float("nan")
    anc = taxonomy.ancestor_table()
    nodes = [taxonomy.indices(level.nodes) for level in levels]
    chosen = [nodes[k][np.asarray(p)] for k, p in enumerate(level_predictions)]  # node index per level
    ok = np.ones(len(chosen[0]), dtype=bool)
    for upper, lower in zip(chosen[:-1], chosen[1:]):
        d_upper = taxonomy.depths[upper]
        ok &= anc[lower, np.minimum(d_upper, anc.shape[1] - 1)] == upper
    return float(ok.mean())


__all__ = ["macro_f1", "log_loss", "level_matrices", "per_level_metrics", "classification_metrics",
           "lineage_consistency"]
