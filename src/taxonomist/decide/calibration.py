"""Calibration: temperature scaling fitted on validation logits, and the expected calibration error.

Min-risk decisions are only Bayes-optimal when probabilities are calibrated, so predict applies the fitted T.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize_scalar

from taxonomist.decide._arrays import CHUNK_ELEMENTS, as_matrix, as_targets, as_vector, softmax
from taxonomist.errors import ConfigError, DataError

#: Temperatures the fit may return; a minimum on an edge means the logits carry (almost) no signal.
TEMPERATURE_BOUNDS = (0.05, 20.0)


def _nll(shifted: np.ndarray, target_logit: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of softmax(logits / T), logits already shifted by their row maximum."""
    total = 0.0
    step = max(1, CHUNK_ELEMENTS // max(1, shifted.shape[1]))
    for s in range(0, len(shifted), step):
        z = shifted[s:s + step] / temperature
        # every row has max 0, so the log-sum-exp is in [0, log L]: no overflow
        total += float(np.log(np.exp(z).sum(axis=1)).sum() - target_logit[s:s + step].sum() / temperature)
    return total / len(shifted)


def fit_temperature(logits: np.ndarray, targets: np.ndarray,
                    bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> float:
    """The temperature T > 0 that minimises the NLL of softmax(logits / T) on held-out data.

    The NLL is convex in 1/T, hence unimodal in log T, so a bounded Brent search on log T finds the
    minimum without a starting guess; T is kept inside `bounds`.

    Args:
        logits: (N, L) raw scores of a validation set; targets: (N,) true label indices.

    >>> rng = np.random.default_rng(0)
    >>> z = rng.normal(0, 2, (4000, 5))
    >>> y = (rng.random(4000)[:, None] > np.cumsum(softmax(z), axis=1)).sum(axis=1)  # y ~ softmax(z)
    >>> abs(fit_temperature(3 * z, y) - 3.0) < 0.2  # the logits were made 3x over-confident
    True
    """
    z = as_matrix(logits, "logits").astype(np.float64, copy=False)
    if len(z) == 0 or z.shape[1] < 2:
        raise DataError(f"logits must have at least one row and two columns, got shape {z.shape}")
    y = as_targets(targets, len(z), z.shape[1])
    lo, hi = bounds
    if not (0 < lo < hi and math.isfinite(hi)):
        raise ConfigError(f"bounds must be 0 < low < high < inf, got {bounds!r}")
    shifted = z - z.max(axis=1, keepdims=True)
    target_logit = shifted[np.arange(len(y)), y]
    result = minimize_scalar(lambda u: _nll(shifted, target_logit, math.exp(u)),
                             bounds=(math.log(lo), math.log(hi)), method="bounded", options={"xatol": 1e-5})
    return float(min(max(math.exp(result.x), lo), hi))


def check_temperature(temperature: float) -> float:
    """`temperature` as a float, or a ConfigError when it is not a finite number > 0."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.floating, np.integer)) \
            or not math.isfinite(temperature) or temperature <= 0:
        raise ConfigError(f"temperature must be a finite number > 0, got {temperature!r}")
    return float(temperature)


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / T) over the last axis; float32 logits give float32 probabilities.

    >>> apply_temperature(np.array([[2.0, 0.0]]), 2.0).round(4).tolist()
    [[0.7311, 0.2689]]
    """
    t = check_temperature(temperature)
    z = np.asarray(logits)
    if z.ndim < 1 or z.dtype.kind not in "fiu":
        raise DataError(f"logits must be a numeric array of at least one dimension, got {z.dtype} {z.shape}")
    if z.dtype.kind != "f":
        z = z.astype(np.float64)
    if z.size and not np.isfinite(z).all():
        raise DataError("logits contains NaN or infinite values")
    return softmax(z / np.asarray(t, dtype=z.dtype))


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """ECE with equal-width confidence bins over [0, 1]: Σ_b |accuracy_b − mean confidence_b| · n_b / n.

    `confidence` is each prediction's probability (usually the top-1 probability), `correct` whether it was
    right. Confidence 1.0 falls in the last bin. Returns NaN for no examples.

    >>> round(expected_calibration_error(np.array([0.9, 0.9, 0.6, 0.6]), np.array([1, 1, 1, 0])), 6)
    0.1
    """
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
        raise ConfigError(f"bins must be a positive integer, got {bins!r}")
    conf = as_vector(confidence, "confidence")
    ok = as_vector(correct, "correct", n=len(conf))
    if len(conf) == 0:
        return float("nan")
    if conf.min() < 0 or conf.max() > 1:
        raise DataError(f"confidence must lie in [0, 1], got values in [{conf.min():g}, {conf.max():g}]")
    idx = np.minimum((conf * bins).astype(np.int64), bins - 1)
    conf_sum = np.bincount(idx, weights=conf, minlength=bins)
    acc_sum = np.bincount(idx, weights=ok, minlength=bins)
    return float(np.abs(acc_sum - conf_sum).sum() / len(conf))


#: What a temperature can be fitted for: the NLL of the labels (the usual temperature scaling), the NLL of the
#: true label's ancestors (every level of the tree counts), or the validation risk of the min-risk rule.
TEMPERATURE_OBJECTIVES = ("nll", "node-nll", "risk")
#: Temperatures the `risk` objective tries: a log-spaced grid (the risk is piecewise constant in T).
RISK_GRID = tuple(float(t) for t in np.geomspace(0.25, 4.0, 41))


def fit_temperature_for(logits: np.ndarray, targets: np.ndarray, objective: str = "nll", taxonomy=None,
                        distance_lc: np.ndarray | None = None, candidates=None) -> float:
    """The temperature that serves `objective` on held-out data.

    - `nll`: `fit_temperature` — the NLL of the labels.
    - `node-nll`: the mean over examples of −Σ log P_T(v) for every node v on the true label's lineage (P(v) the
      sum of the probabilities of the labels at or below v), so that the probabilities of internal nodes —
      what min-risk, back-off and selective answers read — are calibrated too. Needs `taxonomy`.
    - `risk`: the mean distance of the min-risk answers (over `candidates`, default every node) to the truth,
      minimised over `RISK_GRID`; ties go to the temperature nearest 1. Needs `taxonomy` and `distance_lc`
      (labels × candidates). Min-risk's answers move a lot with T: fit it when min-risk is the rule in use.

    Whatever the objective, T = 1 is kept when it does at least as well on it as the fitted value.
    """
    if objective not in TEMPERATURE_OBJECTIVES:
        raise ConfigError(f"temperature objective {objective!r}: choose one of {', '.join(TEMPERATURE_OBJECTIVES)}")
    if objective == "nll":
        return fit_temperature(logits, targets)
    if taxonomy is None:
        raise ConfigError(f"the {objective} temperature objective needs the taxonomy")
    z = as_matrix(logits, "logits").astype(np.float64, copy=False)
    y = as_targets(targets, len(z), z.shape[1])
    if objective == "node-nll":
        from taxonomist.decide.tree_sums import ancestor_operator
        lineage = ancestor_operator(taxonomy).tocsr()                         # (L, nodes): label → its lineage
        op_t = lineage.T.tocsr()                                              # (nodes, L): node → labels under it
        on_lineage = [lineage[k].indices for k in y]

        def node_nll(t: float) -> float:
            node_p = np.asarray(op_t @ softmax(z / t).T).T                    # (N, nodes)
            picked = np.concatenate([node_p[i, nodes] for i, nodes in enumerate(on_lineage)])
            return float(-np.log(np.maximum(picked, 1e-300)).sum() / len(y))
        lo, hi = TEMPERATURE_BOUNDS
        result = minimize_scalar(lambda u: node_nll(math.exp(u)), bounds=(math.log(lo), math.log(hi)),
                                 method="bounded", options={"xatol": 1e-4})
        t = float(min(max(math.exp(result.x), lo), hi))
        return t if node_nll(t) < node_nll(1.0) else 1.0
    if distance_lc is None:
        raise ConfigError("the risk temperature objective needs distance_lc (labels × candidates)")
    from taxonomist.decide.rules import min_risk_decision
    d = as_matrix(distance_lc, "distance_lc", n_rows=z.shape[1])

    def risk(t: float) -> float:
        choice, _ = min_risk_decision(softmax(z / t), d)
        return float(d[y, choice].mean())
    scored = [(risk(t), abs(math.log(t)), t) for t in (*RISK_GRID, 1.0)]
    return min(scored)[2]
