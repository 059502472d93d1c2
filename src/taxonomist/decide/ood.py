"""Out-of-distribution scores (higher = more likely an unknown taxon): the registry of the scorers stored with a
checkpoint (`ood_scorers`), scores over several passes or models, their metrics, thresholds and the fallback of
a flagged answer to an ancestor.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
from scipy.stats import rankdata

from taxonomist.decide._arrays import as_matrix, as_probs, as_targets, as_vector, chunk_rows, softmax
from taxonomist.decide.candidates import candidate_mask
from taxonomist.decide.ood_scorers import (EnergyScorer, KNNScorer, MahalanobisScorer, MaxLogitScorer, MSPScorer,
                                           OODScorer, ReActEnergyScorer, RelativeMahalanobisScorer, ViMScorer,
                                           check_positive)
from taxonomist.decide.tree_sums import ancestor_operator, deepest_true, node_sums
from taxonomist.errors import ConfigError, DataError
from taxonomist.taxonomy import RANKS, Taxonomy, suggest
from taxonomist.taxonomy.core import RANK_INDEX


#: Scorer classes by the names `predict --ood METHOD` accepts.
OOD_SCORERS: dict[str, type[OODScorer]] = {
    "msp": MSPScorer, "max-logit": MaxLogitScorer, "energy": EnergyScorer,
    "mahalanobis": MahalanobisScorer, "knn": KNNScorer, "relative-mahalanobis": RelativeMahalanobisScorer,
    "vim": ViMScorer, "react-energy": ReActEnergyScorer,
}
OOD_METHODS = tuple(OOD_SCORERS)
#: What `--ood auto` means: the score that separated held-out taxa best on real data, measured on two held-out
#: splits of PlanktonSet 1.0 with fine-tuned models (docs/decisions.md, "Which OOD score: --ood auto").
AUTO_OOD_METHOD = "mahalanobis"


def resolve_ood_method(method: str | None) -> str | None:
    """`auto` → `AUTO_OOD_METHOD`; any other name (or None) as given.

    >>> resolve_ood_method("auto"), resolve_ood_method("energy")
    ('mahalanobis', 'energy')
    """
    return AUTO_OOD_METHOD if method == "auto" else method


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


# ------------------------------------------------------------------------------ scores over several passes
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


# ---------------------------------------------------------------------------------------------- fallback
def ood_fallback(nodes: np.ndarray, flagged: np.ndarray, taxonomy: Taxonomy, fallback: str | int | float = "order",
                 probs: np.ndarray | None = None, candidates: Sequence[str] | None = None,
                 chunk_size: int | None = None) -> np.ndarray:
    """Replace the answer of each flagged example by a coarse ancestor, so an unknown species is not named.

    For a flagged example answered with node v, the new answer is the deepest node u on v's lineage
    (v itself included) such that:
    - `fallback` a rank name (e.g. "order"): u has a Linnaean rank at or above that rank (nodes at no rank
      are skipped; a lineage without such a rank falls back to its root);
    - `fallback` an int or "depthN": u's depth ≤ N (roots are depth 0);
    - `fallback` a float p in [0, 1]: P(u) ≥ p, with P the aggregated probability from `probs` (N, L)
      (the root is answered when nothing on the lineage reaches p).
    With `candidates`, u must also be a candidate (a submission may name only those); when no candidate
    on the lineage qualifies, the answer is kept. Unflagged examples keep their answer.

    Args:
        nodes: (N,) answers as indices into `taxonomy.names` (e.g. from `decide(...).nodes`).
        flagged: (N,) booleans, True = judged unknown.

    Returns (N,) node indices.

    >>> tax = Taxonomy.from_parents({"Animalia": None, "Chordata": "Animalia", "Sebastes": "Chordata"},
    ...                             ranks={"Animalia": "kingdom", "Chordata": "phylum", "Sebastes": "genus"})
    >>> out = ood_fallback(tax.indices(["Sebastes", "Sebastes"]), np.array([True, False]), tax, "phylum")
    >>> [tax.names[i] for i in out]
    ['Chordata', 'Sebastes']
    """
    start = as_targets(nodes, len(np.asarray(nodes)), len(taxonomy), name="nodes")
    flag = np.asarray(flagged)
    if flag.dtype != bool:
        raise DataError(f"flagged must be a boolean array, got dtype {flag.dtype}")
    flag = as_vector(flag, "flagged", n=len(start), dtype=bool)
    cand = candidate_mask(taxonomy, candidates)
    lineages = taxonomy.ancestor_table()[start]  # (N, D+1), -1 below each answer
    safe = np.maximum(lineages, 0)
    ok_node = None
    if isinstance(fallback, str) and fallback in RANK_INDEX:
        if not taxonomy.has_ranks:
            raise ConfigError(f"fallback {fallback!r} is a rank but the taxonomy has no ranks; use a depth")
        level = RANK_INDEX[fallback]
        ok_node = np.array([r is not None and RANK_INDEX[r] <= level for r in taxonomy.ranks])
    elif isinstance(fallback, (int, np.integer)) and not isinstance(fallback, bool) or \
            (isinstance(fallback, str) and fallback.startswith("depth") and fallback[5:].isdigit()):
        depth = int(fallback[5:]) if isinstance(fallback, str) else int(fallback)
        if depth < 0:
            raise ConfigError(f"fallback depth must be >= 0, got {depth}")
        ok_node = taxonomy.depths <= depth
    elif isinstance(fallback, (float, np.floating)):
        if not 0.0 <= fallback <= 1.0:
            raise ConfigError(f"fallback probability must lie in [0, 1], got {fallback:g}")
        if probs is None:
            raise ConfigError("a probability fallback needs probs, the (N, L) label probabilities")
    else:
        raise ConfigError(f"fallback must be a rank ({', '.join(RANKS)}), a depth or a probability, "
                          f"got {fallback!r}{suggest(str(fallback), RANKS)}")
    valid = (lineages >= 0) & cand[safe]
    if ok_node is not None:
        ok = valid & ok_node[safe]
    else:
        p = as_probs(probs, n_cols=len(taxonomy.labels))
        if len(p) != len(start):
            raise DataError(f"probs must have one row per answer ({len(start)}), got {len(p)}")
        op_t = ancestor_operator(taxonomy).T.tocsr()
        ok = np.zeros_like(valid)
        step = chunk_rows(chunk_size, len(taxonomy))
        for s in range(0, len(p), step):
            along = np.take_along_axis(node_sums(p[s:s + step], op_t), safe[s:s + step], axis=1)
            ok[s:s + step] = valid[s:s + step] & (along >= fallback - 1e-9)
    depth, found = deepest_true(ok)
    rows = np.arange(len(start))
    chosen = safe[rows, depth]
    if candidates is None:
        # every node may be answered, so a lineage with nothing qualifying falls back to its root
        chosen = np.where(found, chosen, safe[:, 0])
    else:
        chosen = np.where(found, chosen, start)
    return np.where(flag, chosen, start)
