"""Disagreement scores over several passes of one model (MC-dropout) or the members of an ensemble: predictive
entropy, mutual information (BALD) and the variation ratio; higher = more likely an unknown taxon.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from taxonomist.decide._arrays import as_matrix, as_probs, softmax
from taxonomist.decide.ood_scorers import check_positive
from taxonomist.errors import ConfigError, DataError
from taxonomist.taxonomy import suggest


#: Scores computed from a stack of K probability matrices (MC-dropout passes, ensemble members).
STACK_SCORES = ("predictive_entropy", "mutual_information", "variation_ratio")


def _prob_stack(stack, name: str = "member_probs") -> np.ndarray:
    """(K, N, L) probabilities from a (K, N, L) array or a sequence of K (N, L) matrices, each row checked."""
    if isinstance(stack, np.ndarray) and stack.ndim == 3:
        members = list(stack)
    elif isinstance(stack, (list, tuple)):
        members = list(stack)
    else:
        raise DataError(f"{name} must be a (K, N, L) array or a list of K (N, L) probability matrices, "
                        f"got {type(stack).__name__}{getattr(stack, 'shape', '')}")
    if len(members) < 2:
        raise DataError(f"{name} needs at least 2 passes or members, got {len(members)}")
    first = as_probs(members[0], f"{name}[0]")
    out = np.empty((len(members),) + first.shape, dtype=np.float64)
    out[0] = first
    for k, m in enumerate(members[1:], 1):
        arr = as_probs(m, f"{name}[{k}]", n_cols=first.shape[1])
        if arr.shape[0] != first.shape[0]:
            raise DataError(f"{name}[{k}] has {arr.shape[0]} rows, {name}[0] has {first.shape[0]}")
        out[k] = arr
    return out


def _entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    # 0 · log 0 = 0; clipping keeps log finite without changing any non-zero term
    return -(p * np.log(np.clip(p, 1e-300, None))).sum(axis=axis)


def predictive_entropy(member_probs) -> np.ndarray:
    """Entropy of the mean prediction, H(p̄) with p̄ = mean_k p_k: the MC-dropout score (Gal & Ghahramani 2016).

    `member_probs`: (K, N, L) or K matrices (N, L) — K stochastic passes or K ensemble members. Returns (N,),
    in nats; higher = more unknown. Total uncertainty: what each pass is unsure of plus where they disagree.

    >>> predictive_entropy(np.array([[[1.0, 0.0]], [[0.0, 1.0]]])).round(4).tolist()   # two sure, opposite passes
    [0.6931]
    """
    return _entropy(_prob_stack(member_probs).mean(axis=0))


def mutual_information(member_probs) -> np.ndarray:
    """Disagreement between passes or members: H(p̄) − mean_k H(p_k) = mean_k KL(p_k ‖ p̄) (BALD, Houlsby et al.
    2011; the ensemble-disagreement score of Lakshminarayanan et al. 2017). Returns (N,) ≥ 0, in nats.

    It is 0 when every member gives the same distribution, however flat, so it separates "the models disagree"
    (unfamiliar input) from "the models agree that the input is ambiguous" (a hard known example).

    >>> mutual_information(np.array([[[0.5, 0.5], [1.0, 0.0]], [[0.5, 0.5], [0.0, 1.0]]])).round(4).tolist()
    [0.0, 0.6931]
    """
    p = _prob_stack(member_probs)
    return np.maximum(_entropy(p.mean(axis=0)) - _entropy(p).mean(axis=0), 0.0)


def variation_ratio(member_probs) -> np.ndarray:
    """Share of passes or members whose top-1 label differs from the most voted one (Freeman 1965): (N,) in
    [0, 1 − 1/K]; coarse (K + 1 levels at most) but needs no probabilities to be calibrated.

    >>> variation_ratio(np.array([[[0.9, 0.1]], [[0.8, 0.2]], [[0.3, 0.7]]])).round(4).tolist()
    [0.3333]
    """
    p = _prob_stack(member_probs)
    votes = p.argmax(axis=2)                                  # (K, N)
    counts = np.zeros((p.shape[1], p.shape[2]), dtype=np.int64)
    np.add.at(counts, (np.arange(p.shape[1])[None, :].repeat(len(p), 0), votes), 1)
    return 1.0 - counts.max(axis=1) / len(p)


def stack_score(member_probs, score: str = "mutual_information") -> np.ndarray:
    """One of `STACK_SCORES` over K passes or members (see each function); higher = more unknown."""
    funcs = {"predictive_entropy": predictive_entropy, "mutual_information": mutual_information,
             "variation_ratio": variation_ratio}
    if score not in funcs:
        raise ConfigError(f"unknown stack score {score!r}{suggest(str(score), STACK_SCORES)}; "
                          f"choose one of {', '.join(STACK_SCORES)}")
    return funcs[score](member_probs)


def ensemble_disagreement(member_logits, temperatures: Sequence[float] | None = None,
                          score: str = "mutual_information") -> np.ndarray:
    """Disagreement between K checkpoints on each example, from their label logits: (N,), higher = more unknown.

    Args:
        member_logits: K (N, L) logit matrices over the same labels in the same order (e.g. each member's
            `InferenceResult.logits` after aligning labels).
        temperatures: each member's temperature (its calibration), default 1 — disagreement should not
            reward a member for being over-confident.
        score: `mutual_information` (default: mean KL of each member to the ensemble mean),
            `predictive_entropy` (the ensemble mean's entropy) or `variation_ratio` (top-1 votes).

    >>> a, b = np.array([[4.0, 0.0], [4.0, 0.0]]), np.array([[4.0, 0.0], [0.0, 4.0]])
    >>> ensemble_disagreement([a, b]).round(3).tolist()   # agree on row 0, disagree on row 1
    [0.0, 0.603]
    """
    if not isinstance(member_logits, (list, tuple)) or len(member_logits) < 2:
        raise DataError("member_logits must be a list of at least 2 (N, L) logit matrices, one per checkpoint")
    if temperatures is None:
        temperatures = [1.0] * len(member_logits)
    if len(temperatures) != len(member_logits):
        raise DataError(f"temperatures must have one entry per member ({len(member_logits)}), "
                        f"got {len(temperatures)}")
    probs = [softmax(as_matrix(z, f"member_logits[{k}]").astype(np.float64) / check_positive(t, f"temperatures[{k}]"))
             for k, (z, t) in enumerate(zip(member_logits, temperatures))]
    return stack_score(probs, score)
