"""Combine several predictions of the same examples: ensemble members (checkpoints, K-fold models) and TTA views.

Weighted arithmetic or geometric means, and member weights fitted on out-of-fold predictions to minimise MHD.
"""
from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np

from taxonomist.decide._arrays import (ROW_SUM_TOLERANCE, as_matrix, as_targets, as_vector, log_softmax, softmax)
from taxonomist.decide.rules import min_risk_decision
from taxonomist.errors import ConfigError, DataError
from taxonomist.taxonomy import suggest

COMBINE_MODES = ("arithmetic", "geometric")
INPUT_KINDS = ("auto", "probs", "logits")
VIEW_MODES = ("mean_probs", "mean_logits")
WEIGHT_DECISIONS = ("argmax", "min-risk")

#: log(0) stand-in for geometric means of probabilities with exact zeros (exp(log(1e-300)) is still ~0).
_LOG_FLOOR = 1e-300


def _choose(value: str, allowed: tuple[str, ...], name: str) -> str:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {value!r}{suggest(str(value), allowed)}")
    return value


def _looks_like_probs(x: np.ndarray) -> bool:
    if x.min() < 0 or x.max() > 1:
        return False
    return bool(np.all(np.abs(x.sum(axis=1) - 1.0) <= ROW_SUM_TOLERANCE))


def _members(members: Sequence[np.ndarray], kind: str, log: bool) -> np.ndarray:
    """(M, N, L) probabilities (or log-probabilities when `log`) of the members."""
    _choose(kind, INPUT_KINDS, "kind")
    if isinstance(members, np.ndarray) and members.ndim == 3:
        members = list(members)
    if not isinstance(members, (list, tuple)) or not members:
        raise DataError("members must be a non-empty list of (N, L) arrays")
    out = []
    shape = None
    for m, raw in enumerate(members):
        x = as_matrix(raw, f"members[{m}]").astype(np.float64, copy=False)
        if shape is None:
            shape = x.shape
        elif x.shape != shape:
            raise DataError(f"members[{m}] has shape {x.shape}, members[0] has {shape}; all must match")
        is_probs = kind == "probs" or (kind == "auto" and x.size and _looks_like_probs(x))
        if kind == "probs" and not _looks_like_probs(x):
            raise DataError(f"members[{m}] is not a probability matrix (values in [0, 1], rows summing to 1)")
        if is_probs:
            out.append(np.log(np.maximum(x, _LOG_FLOOR)) if log else x)
        else:
            out.append(log_softmax(x) if log else softmax(x))
    return np.stack(out)


def _weights(weights, n: int) -> np.ndarray:
    if weights is None:
        return np.full(n, 1.0 / n)
    w = as_vector(weights, "weights", n=n)
    if (w < 0).any() or w.sum() <= 0:
        raise ConfigError(f"weights must be >= 0 with a positive sum, got {w.tolist()}")
    return w / w.sum()


def _combine(stack: np.ndarray, w: np.ndarray, mode: str) -> np.ndarray:
    mixed = np.tensordot(w, stack, axes=1)
    # the normalised weighted geometric mean Π p_m^w_m / Z is the softmax of Σ w_m log p_m
    return softmax(mixed) if mode == "geometric" else mixed


def combine_probs(members: Sequence[np.ndarray], weights: Sequence[float] | None = None,
                  mode: str = "arithmetic", kind: str = "auto") -> np.ndarray:
    """Weighted mean of several (N, L) predictions of the same examples; returns (N, L) probabilities.

    Args:
        members: a list of (N, L) arrays (or one (M, N, L) array), each logits or probabilities.
        weights: (M,) non-negative, normalised to sum 1; None = equal weights.
        mode: `arithmetic` (Σ w_m p_m) or `geometric` (Π p_m^w_m, renormalised; the 2nd-place FathomNet
            ensemble). A geometric mean of logits' softmaxes is the softmax of the weighted mean logits.
        kind: `probs`, `logits`, or `auto`: a member is read as probabilities when its values lie in [0, 1]
            and its rows sum to 1, else as logits (softmax applied).

    >>> combine_probs([np.array([[0.8, 0.2]]), np.array([[0.2, 0.8]])], mode="geometric").tolist()
    [[0.5, 0.5]]
    """
    _choose(mode, COMBINE_MODES, "mode")
    stack = _members(members, kind, log=mode == "geometric")
    return _combine(stack, _weights(weights, len(stack)), mode)


def _simplex_grid(n_members: int, parts: int) -> list[np.ndarray]:
    """Every weight vector with entries k/parts summing to 1, in lexicographic order."""
    grid = []
    for head in itertools.product(range(parts + 1), repeat=n_members - 1):
        if sum(head) <= parts:
            grid.append(np.array([*head, parts - sum(head)], dtype=np.float64) / parts)
    return grid


def fit_ensemble_weights(members: Sequence[np.ndarray], targets: np.ndarray, distance: np.ndarray,
                         decision: str = "argmax", mode: str = "arithmetic", kind: str = "auto",
                         step: float = 0.1, max_rounds: int = 20) -> np.ndarray:
    """Member weights that minimise the mean hierarchical distance (MHD) of out-of-fold decisions.

    MHD is piecewise constant in the weights, so the search is over a grid: every point of the simplex
    with step `step` for up to 3 members; beyond that, coordinate descent from equal weights — each round
    tries every grid value for one member's weight (the others rescaled to fill the rest) and keeps strict
    improvements, until a round changes nothing or `max_rounds` pass. Equal MHD is broken by the lower
    log loss of the combined probabilities, then by grid order, so the result is deterministic.

    Args:
        members: out-of-fold (N, L) probabilities or logits of each member, same examples in the same order.
        targets: (N,) true label indices.
        distance: `argmax`: the (L, L) label distance; `min-risk`: the (L, C) distance from the labels to
            the candidates (rows truth) — the matrix the decision uses.
        decision: the rule whose MHD is minimised.

    Returns (M,) weights summing to 1.

    >>> good = np.array([[0.9, 0.1], [0.2, 0.8]]); bad = np.array([[0.1, 0.9], [0.8, 0.2]])
    >>> fit_ensemble_weights([good, bad], np.array([0, 1]), np.array([[0.0, 2.0], [2.0, 0.0]])).tolist()
    [1.0, 0.0]
    """
    _choose(mode, COMBINE_MODES, "mode")
    _choose(decision, WEIGHT_DECISIONS, "decision")
    stack = _members(members, kind, log=mode == "geometric")
    n_members, n, n_labels = stack.shape
    y = as_targets(targets, n, n_labels)
    if n == 0:
        raise DataError("targets is empty: no out-of-fold examples to fit weights on")
    d = as_matrix(distance, "distance", n_rows=n_labels, nonnegative=True)
    if decision == "argmax" and d.shape[1] != n_labels:
        raise DataError(f"distance must be (L, L) = ({n_labels}, {n_labels}) for argmax, got {d.shape}")
    parts = int(round(1.0 / step)) if isinstance(step, (int, float)) and step > 0 else 0
    if parts < 1 or abs(parts * step - 1.0) > 1e-9:
        raise ConfigError(f"step must divide 1 evenly (0.1, 0.05, 0.25, …), got {step!r}")
    if isinstance(max_rounds, bool) or not isinstance(max_rounds, int) or max_rounds < 1:
        raise ConfigError(f"max_rounds must be a positive integer, got {max_rounds!r}")

    def key(w: np.ndarray) -> tuple[float, float]:
        probs = _combine(stack, w, mode)
        choice = probs.argmax(axis=1) if decision == "argmax" else min_risk_decision(probs, d)[0]
        mhd = float(d[y, choice].mean())
        nll = float(-np.log(np.maximum(probs[np.arange(n), y], _LOG_FLOOR)).mean())
        return round(mhd, 12), nll

    if n_members == 1:
        return np.ones(1)
    if n_members <= 3:
        scored = [(key(w), k, w) for k, w in enumerate(_simplex_grid(n_members, parts))]
        return min(scored, key=lambda item: (item[0], item[1]))[2]
    best_w = np.full(n_members, 1.0 / n_members)
    best = key(best_w)
    for _ in range(max_rounds):
        changed = False
        for m in range(n_members):
            for g in np.arange(parts + 1) / parts:
                rest = np.delete(best_w, m)
                if rest.sum() > 0:
                    rest = rest / rest.sum() * (1 - g)
                else:  # every other weight was 0: share the remainder equally
                    rest = np.full(n_members - 1, (1 - g) / (n_members - 1))
                w = np.insert(rest, m, g)
                k = key(w)
                if k < best and not np.allclose(w, best_w):
                    best, best_w, changed = k, w, True
        if not changed:
            break
    return best_w


def aggregate_views(view_logits: np.ndarray, mode: str = "mean_probs") -> np.ndarray:
    """Combine test-time-augmentation views: (V, N, L) logits → (N, L) probabilities.

    `mean_probs` averages the views' softmaxes; `mean_logits` takes the softmax of the mean logits (a
    geometric mean of the views' probabilities).

    >>> views = np.log(np.array([[[0.8, 0.2]], [[0.2, 0.8]]]))
    >>> aggregate_views(views, "mean_probs").tolist(), aggregate_views(views, "mean_logits").tolist()
    ([[0.5, 0.5]], [[0.5, 0.5]])
    """
    _choose(mode, VIEW_MODES, "mode")
    z = np.asarray(view_logits)
    if z.ndim != 3 or z.shape[0] == 0 or z.dtype.kind not in "fiu":
        raise DataError(f"view_logits must be a numeric (views, N, L) array with at least one view, "
                        f"got shape {z.shape}")
    z = z.astype(np.float64, copy=False)
    if z.size and not np.isfinite(z).all():
        raise DataError("view_logits contains NaN or infinite values")
    if mode == "mean_logits":
        return softmax(z.mean(axis=0))
    return softmax(z).mean(axis=0)
