"""The numpy tables the losses are built from: per-class weights and distance-based soft-label targets.

Pure numpy (no torch), so data exploration and reports can compute and show them too.
"""
from __future__ import annotations

import numpy as np

from taxonomist.errors import ConfigError, DataError

#: `loss.class_weights` choices.
CLASS_WEIGHT_MODES = ("none", "inverse", "effective")


def class_weights(counts, mode: str = "inverse", beta: float = 0.999) -> np.ndarray:
    """Per-class loss weights from the training counts, normalised to mean 1 over the classes present.

    - `none`: every class 1.
    - `inverse`: w_c ∝ 1 / n_c.
    - `effective`: w_c ∝ (1 - β) / (1 - β^n_c), the "effective number of samples" of Cui et al. (2019),
      which moves from `none` (β = 0) towards `inverse` (β → 1).

    A class with count 0 is never a training target; it gets the neutral weight 1, so examples of a label
    unseen in training still count (with average weight) in a validation loss.

    >>> class_weights([1, 3], "inverse").tolist()
    [1.5, 0.5]
    >>> class_weights([1, 2], "effective", beta=0.5).round(6).tolist()
    [1.2, 0.8]
    """
    if mode not in CLASS_WEIGHT_MODES:
        raise ConfigError(f"unknown loss.class_weights {mode!r}; choose one of {', '.join(CLASS_WEIGHT_MODES)}")
    n = np.asarray(counts, dtype=np.float64)
    if n.ndim != 1 or n.size == 0:
        raise DataError(f"class counts must be a non-empty 1-D array, got shape {n.shape}")
    bad = np.flatnonzero(~np.isfinite(n) | (n < 0))
    if bad.size:
        raise DataError(f"class count {n[bad[0]]!r} at label index {int(bad[0])} is not a finite count >= 0")
    if mode == "none":
        return np.ones_like(n)
    present = n > 0
    if not present.any():
        raise DataError("class counts are all zero; no class has a training example")
    if mode == "inverse":
        raw = 1.0 / n[present]
    else:
        if not 0.0 <= beta < 1.0:
            raise ConfigError(f"loss.effective_beta must be in [0, 1), got {beta!r}")
        raw = (1.0 - beta) / (1.0 - np.power(beta, n[present]))
    w = np.ones_like(n)
    w[present] = raw / raw.mean()
    return w


def soft_label_targets(distance, temperature: float = 1.0) -> np.ndarray:
    """Soft targets from a taxonomic distance matrix: row y is q_j ∝ exp(-D(y, j) / T).

    The "soft labels" of Bertinetto et al. (2020), "Making Better Mistakes": the truth keeps the largest
    share and the rest goes to its relatives, more to closer ones. D is used in its own units (FathomNet
    2025: siblings 2, unrelated 12), so T is in those units too: T = 1 gives a sibling e^-2 ≈ 0.14 of the
    truth's weight. Rows are truths, columns predictions; each row sums to 1.

    >>> soft_label_targets([[0.0, 1.0], [1.0, 0.0]], temperature=1.0).round(4).tolist()
    [[0.7311, 0.2689], [0.2689, 0.7311]]
    """
    d = check_distance(distance)
    if not (np.isfinite(temperature) and temperature > 0):
        raise ConfigError(f"loss.soft_label_temperature must be > 0, got {temperature!r}")
    # subtracting each row's minimum keeps exp() from underflowing to an all-zero row at small T
    logits = -(d - d.min(axis=1, keepdims=True)) / temperature
    q = np.exp(logits)
    return q / q.sum(axis=1, keepdims=True)


def check_distance(distance, n_labels: int | None = None) -> np.ndarray:
    """A labels × labels distance matrix as float64, or a one-line `ConfigError` naming the problem.

    >>> check_distance([[0, 1], [1, 0]]).dtype
    dtype('float64')
    """
    try:
        d = np.asarray(distance, dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfigError(f"distance matrix must be numeric, got {type(distance).__name__}") from None
    if d.ndim != 2 or d.shape[0] != d.shape[1] or d.size == 0:
        raise ConfigError(f"distance matrix must be square (labels × labels), got shape {d.shape}")
    if n_labels is not None and d.shape[0] != n_labels:
        raise ConfigError(f"distance matrix is {d.shape[0]}×{d.shape[1]} but there are {n_labels} labels")
    bad = np.argwhere(~np.isfinite(d) | (d < 0))
    if bad.size:
        r, c = (int(v) for v in bad[0])
        raise ConfigError(f"distance matrix entry [{r}, {c}] = {d[r, c]!r} is not a finite distance >= 0")
    return d
