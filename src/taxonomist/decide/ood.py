"""Out-of-distribution scores (higher = more likely an unknown taxon): the registry of the scorers stored with a
checkpoint (`ood_scorers`), the names of every OOD method the commands accept, and the scores' metrics and
thresholds. Scores over several passes or models are in `disagreement`, the fallback of a flagged answer in
`fallback`.
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np
from scipy.stats import rankdata

from taxonomist.decide._arrays import as_vector
from taxonomist.decide.ood_scorers import (EnergyScorer, KNNScorer, MahalanobisScorer, MaxLogitScorer, MSPScorer,
                                           OODScorer, ReActEnergyScorer, RelativeMahalanobisScorer, ViMScorer)
from taxonomist.errors import ConfigError, DataError
from taxonomist.taxonomy import suggest


#: Scorer classes by the names `predict --ood METHOD` accepts.
OOD_SCORERS: dict[str, type[OODScorer]] = {
    "msp": MSPScorer, "max-logit": MaxLogitScorer, "energy": EnergyScorer,
    "mahalanobis": MahalanobisScorer, "knn": KNNScorer, "relative-mahalanobis": RelativeMahalanobisScorer,
    "vim": ViMScorer, "react-energy": ReActEnergyScorer,
}
OOD_METHODS = tuple(OOD_SCORERS)
#: Scores that run the model again (ODIN's input gradients, MC-dropout's passes; `inference.ood_model` computes
#: them, calibration stores their thresholds): named here so that options naming them are checked without torch.
MODEL_OOD_METHODS = ("odin", "mc-dropout")
#: The disagreement of the members of an ensemble (`disagreement.ensemble_disagreement`).
ENSEMBLE_OOD_METHOD = "ensemble"
#: What `--ood auto` means: the score that separated held-out taxa best on real data, measured on two held-out
#: splits of PlanktonSet 1.0 with fine-tuned models (docs/decisions.md, "Which OOD score: --ood auto").
AUTO_OOD_METHOD = "mahalanobis"
#: Every `--ood` method of `predict` (`serve` takes all but `ensemble`).
PREDICT_OOD_METHODS = ("auto", *OOD_METHODS, *MODEL_OOD_METHODS, ENSEMBLE_OOD_METHOD)
#: The known-data TPR whose threshold flags unknowns when no threshold is given: 95 % of the known validation
#: examples stay unflagged (`predict --ood-tpr`, `serve`, and the threshold `evaluate` reports).
DEFAULT_OOD_TPR = 0.95


def resolve_ood_method(method: str | None) -> str | None:
    """`auto` → `AUTO_OOD_METHOD`; any other name (or None) as given.

    >>> resolve_ood_method("auto"), resolve_ood_method("energy")
    ('mahalanobis', 'energy')
    """
    return AUTO_OOD_METHOD if method == "auto" else method


def check_tpr(tpr: float, name: str = "the OOD TPR") -> float:
    """`tpr` as a float in (0, 1], or a ConfigError naming it.

    >>> check_tpr(0.95)
    0.95
    """
    if isinstance(tpr, bool) or not isinstance(tpr, (int, float, np.floating, np.integer)) or not 0 < tpr <= 1:
        raise ConfigError(f"{name} must lie in (0, 1], got {tpr!r}")
    return float(tpr)


def _scorer_class(method: str) -> type[OODScorer]:
    if method not in OOD_SCORERS:
        raise ConfigError(f"unknown OOD method {method!r}{suggest(str(method), OOD_METHODS)}; "
                          f"choose one of {', '.join(OOD_METHODS)}")
    return OOD_SCORERS[method]


def build_ood_scorer(method: str, **options) -> OODScorer:
    """A new, unfitted scorer: `msp`, `max-logit`, `energy`, `mahalanobis` or `knn` (options: its __init__'s).

    >>> scorer = build_ood_scorer("energy").fit(None, np.array([[2.0, 0.0]]), np.array([0]))
    >>> scorer.score(None, np.array([[0.0, 0.0], [9.0, 0.0]])).round(3).tolist()
    [-0.693, -9.0]
    """
    try:
        return _scorer_class(method)(**options)
    except TypeError as e:
        raise ConfigError(f"bad options for the {method} OOD score: {e}") from None


def load_ood_scorer(method: str, state: Mapping[str, np.ndarray]) -> OODScorer:
    """The scorer `method` restored from `state_dict()` output (e.g. read back from safetensors)."""
    if not isinstance(state, Mapping):
        raise DataError(f"state must be a mapping of arrays, got {type(state).__name__}")
    return _scorer_class(method).from_state_dict(state)


# ---------------------------------------------------------------------------------------------- metrics
def _scores(x, name: str) -> np.ndarray:
    arr = as_vector(x, name)
    if len(arr) == 0:
        raise DataError(f"{name} is empty")
    return arr


def ood_metrics(scores_known: np.ndarray, scores_unknown: np.ndarray) -> dict[str, float]:
    """AUROC and FPR at 95 % TPR, with unknown as the positive class (higher score = more unknown).

    `auroc`: probability that a random unknown scores above a random known (ties count half).
    `fpr95`: share of knowns flagged at `threshold_for_tpr(scores_unknown, 0.95)`, the highest threshold
    that still flags 95 % of the unknowns (flagged = score ≥ threshold).

    >>> ood_metrics(np.array([0.1, 0.2, 0.3, 0.4]), np.array([0.35, 0.5, 0.6]))
    {'auroc': 0.9166666666666666, 'fpr95': 0.25}
    """
    known, unknown = _scores(scores_known, "scores_known"), _scores(scores_unknown, "scores_unknown")
    ranks = rankdata(np.concatenate([known, unknown]))  # average ranks: the Mann–Whitney U with ties
    u = ranks[len(known):].sum() - len(unknown) * (len(unknown) + 1) / 2
    auroc = float(u / (len(known) * len(unknown)))
    t = threshold_for_tpr(unknown, 0.95)
    return {"auroc": auroc, "fpr95": float((known >= t).mean())}


def threshold_for_tpr(scores_unknown: np.ndarray, tpr: float = 0.95) -> float:
    """The highest threshold t that flags at least `tpr` of the given unknowns (flagged = score ≥ t).

    Fit it on validation unknowns (held-out taxa), then flag test examples with score ≥ t.

    >>> threshold_for_tpr(np.arange(1.0, 21.0), 0.95)  # 19 of 20 flagged
    2.0
    """
    s = np.sort(_scores(scores_unknown, "scores_unknown"))[::-1]
    if isinstance(tpr, bool) or not isinstance(tpr, (int, float, np.floating)) or not 0 < tpr <= 1:
        raise ConfigError(f"tpr must lie in (0, 1], got {tpr!r}")
    k = max(1, math.ceil(tpr * len(s) - 1e-9))  # the slack keeps 0.95 × 20 from rounding up to 20
    return float(s[k - 1])


def threshold_metrics(scores_known: np.ndarray, scores_unknown: np.ndarray, threshold: float) -> dict[str, float]:
    """Detection figures when every example with score ≥ `threshold` is flagged as unknown.

    Keys (metrics.json `ood.{method}.*`): `threshold`; `precision` = flagged unknowns / all flagged (0 when
    nothing is flagged); `recall` = flagged unknowns / unknowns; `f1`; `known_flagged` = share of knowns
    flagged (the false-positive rate); `unknown_missed` = share of unknowns not flagged (1 − recall).

    >>> m = threshold_metrics(np.array([0.1, 0.2, 0.3, 0.4]), np.array([0.35, 0.5, 0.6]), 0.35)
    >>> m["precision"], m["recall"], m["known_flagged"], m["unknown_missed"]
    (0.75, 1.0, 0.25, 0.0)
    """
    known, unknown = _scores(scores_known, "scores_known"), _scores(scores_unknown, "scores_unknown")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating, np.integer)) \
            or not math.isfinite(threshold):
        raise ConfigError(f"threshold must be a finite number, got {threshold!r}")
    tp = int((unknown >= threshold).sum())
    fp = int((known >= threshold).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / len(unknown)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"threshold": float(threshold), "precision": precision, "recall": recall, "f1": f1,
            "known_flagged": fp / len(known), "unknown_missed": 1.0 - recall}
