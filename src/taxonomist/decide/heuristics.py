"""The decision heuristics of two widely used tools, for users migrating from them: SpeciesNet's roll-up and
iNaturalist's common-ancestor rule. Both cut each row's probabilities to its top k labels, sum them up the tree
and answer the deepest node whose sum reaches a threshold. They are heuristics: neither minimises a stated
error, and min-risk (`rules.min_risk_decision`) is the rule that does for a taxonomic distance.

- **roll-up** (SpeciesNet): the top 5 labels' scores, as they are, summed under each ancestor; the first level,
  from the labels upwards, whose best sum exceeds 0.65 is answered.
- **common ancestor** (iNaturalist's vision API): the top 15 labels' scores, renormalised to sum to 1; the
  finest taxon holding over 0.78 of them is answered.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from taxonomist.decide._arrays import as_probs, chunk_rows
from taxonomist.decide.tree_sums import check_threshold, deepest_node_reaching, node_probabilities
from taxonomist.errors import ConfigError
from taxonomist.taxonomy import Taxonomy

ROLLUP_THRESHOLD, ROLLUP_TOP_K = 0.65, 5
COMMON_ANCESTOR_SHARE, COMMON_ANCESTOR_TOP_K = 0.78, 15


def check_top_k(top_k, name: str = "top_k") -> int:
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ConfigError(f"{name} must be a whole number of at least 1, got {top_k!r}")
    return int(top_k)


def top_k_scores(probs: np.ndarray, top_k: int, renormalise: bool = False,
                 chunk_size: int | None = None) -> np.ndarray:
    """Each row's `top_k` largest probabilities kept in place, the others set to 0; with `renormalise`, the kept
    ones rescaled to sum to 1. Ties at the k-th value keep the first labels.

    >>> top_k_scores(np.array([[0.5, 0.2, 0.3]]), 2).tolist()
    [[0.5, 0.0, 0.3]]
    >>> top_k_scores(np.array([[0.5, 0.2, 0.3]]), 2, renormalise=True).round(6).tolist()
    [[0.625, 0.0, 0.375]]
    """
    p = np.asarray(probs, dtype=np.float64)
    k = min(check_top_k(top_k), p.shape[1])
    out = np.zeros_like(p)
    step = chunk_rows(chunk_size, p.shape[1])
    for s in range(0, len(p), step):
        block = p[s:s + step]
        keep = np.argsort(-block, axis=1, kind="stable")[:, :k]
        rows = np.arange(len(block))[:, None]
        out[s:s + step][rows, keep] = block[rows, keep]
    if renormalise:
        total = out.sum(axis=1, keepdims=True)
        out = np.divide(out, total, out=np.zeros_like(out), where=total > 0)
    return out


def _answer(probs: np.ndarray, scores: np.ndarray, taxonomy: Taxonomy, threshold: float,
            candidates: Sequence[str] | None, chunk_size: int | None) -> tuple[np.ndarray, np.ndarray]:
    nodes, _ = deepest_node_reaching(scores, taxonomy, threshold, candidates, chunk_size)
    # the confidence reported is P(answer) under the full probabilities, as for every other rule
    node_p = np.empty(len(nodes))
    for node in np.unique(nodes):
        rows = np.flatnonzero(nodes == node)
        node_p[rows] = node_probabilities(probs[rows], taxonomy, [taxonomy.names[node]], chunk_size)[:, 0]
    return nodes, node_p


def rollup_decision(probs: np.ndarray, taxonomy: Taxonomy, threshold: float = ROLLUP_THRESHOLD,
                    top_k: int = ROLLUP_TOP_K, candidates: Sequence[str] | None = None,
                    chunk_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """SpeciesNet-style roll-up: sum the `top_k` most probable labels' probabilities under each node and answer
    the deepest node whose sum reaches `threshold` (at equal depth the larger sum). When even the root's sum of
    the top k falls short, the candidate with the largest sum (the root) is answered.

    Returns (nodes, P(answer)): (N,) indices into `taxonomy.names` and the answers' probabilities under the
    full distribution.

    >>> tax = Taxonomy.from_parents({"Fish": None, "Cod": "Fish", "Hake": "Fish", "Ling": "Fish"})
    >>> nodes, p = rollup_decision(np.array([[0.5, 0.3, 0.2], [0.7, 0.2, 0.1]]), tax, top_k=2)
    >>> [tax.names[i] for i in nodes], p.round(2).tolist()
    (['Fish', 'Cod'], [1.0, 0.7])
    """
    p = as_probs(probs, n_cols=len(taxonomy.labels))
    t = check_threshold(threshold)
    return _answer(p, top_k_scores(p, top_k, chunk_size=chunk_size), taxonomy, t, candidates, chunk_size)


def common_ancestor_decision(probs: np.ndarray, taxonomy: Taxonomy, share: float = COMMON_ANCESTOR_SHARE,
                             top_k: int = COMMON_ANCESTOR_TOP_K, candidates: Sequence[str] | None = None,
                             chunk_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """iNaturalist-style common ancestor: renormalise the `top_k` most probable labels' probabilities to sum to
    1 and answer the finest node holding at least `share` of them.

    Returns (nodes, P(answer)) as `rollup_decision` does.

    >>> tax = Taxonomy.from_parents({"Fish": None, "Cod": "Fish", "Hake": "Fish", "Ling": "Fish"})
    >>> nodes, _ = common_ancestor_decision(np.array([[0.45, 0.15, 0.4]]), tax, top_k=2)
    >>> tax.names[nodes[0]]      # 0.45 / (0.45 + 0.4) = 0.53 < 0.78: the genus
    'Fish'
    """
    p = as_probs(probs, n_cols=len(taxonomy.labels))
    t = check_threshold(share, "share")
    scores = top_k_scores(p, top_k, renormalise=True, chunk_size=chunk_size)
    return _answer(p, scores, taxonomy, t, candidates, chunk_size)


__all__ = ["rollup_decision", "common_ancestor_decision", "top_k_scores", "ROLLUP_THRESHOLD", "ROLLUP_TOP_K",
           "COMMON_ANCESTOR_SHARE", "COMMON_ANCESTOR_TOP_K"]
