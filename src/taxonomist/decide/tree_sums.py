"""Sums of label probabilities up a taxonomy, and the deepest node whose sum reaches a threshold: the building
blocks of the hierarchical decision rules (`rules`, `heuristics`) and of the OOD fallback (`ood`).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import scipy.sparse

from taxonomist.decide._arrays import as_probs, as_targets, chunk_rows
from taxonomist.decide.candidates import candidate_mask
from taxonomist.errors import ConfigError
from taxonomist.taxonomy import Taxonomy

#: Rounding slack when an aggregated probability (a float sum) is compared with a threshold.
SLACK = 1e-9


def ancestor_operator(taxonomy: Taxonomy) -> scipy.sparse.csr_matrix:
    """Sparse (L, nodes) 0/1 matrix, entry (l, v) = 1 when node v is label l or one of its ancestors.

    The same matrix as `taxonomy.ancestor_matrix(taxonomy.labels, taxonomy.names)`, stored with
    L × (depth + 1) entries instead of L × nodes, so summing probabilities up the tree costs O(N·L·depth).
    """
    anc = taxonomy.ancestor_table()[taxonomy.label_indices]  # (L, D+1), -1 below each label
    rows, cols = np.nonzero(anc >= 0)
    return scipy.sparse.csr_matrix((np.ones(len(rows)), (rows, anc[rows, cols])),
                                   shape=(len(taxonomy.labels), len(taxonomy)))


def node_sums(p: np.ndarray, op_t: scipy.sparse.spmatrix) -> np.ndarray:
    """(B, nodes) probability of every node: the sum of its descendant labels' probabilities."""
    return np.asarray(op_t @ p.T.astype(np.float64, copy=False)).T


def node_probabilities(probs: np.ndarray, taxonomy: Taxonomy, nodes: Sequence[str] | None = None,
                       chunk_size: int | None = None) -> np.ndarray:
    """Probability of each node (default: every node of the taxonomy): the sum over its descendant labels.

    A node that is itself a label counts its own probability too. Returns (N, len(nodes)) float64.

    >>> tax = Taxonomy.from_parents({"Fish": None, "Cod": "Fish", "Hake": "Fish"})
    >>> node_probabilities(np.array([[0.7, 0.3]]), tax).tolist()
    [[1.0, 0.7, 0.3]]
    """
    p = as_probs(probs, n_cols=len(taxonomy.labels))
    cols = np.arange(len(taxonomy)) if nodes is None else taxonomy.indices(nodes)
    op_t = ancestor_operator(taxonomy)[:, cols].T.tocsr()
    out = np.empty((len(p), len(cols)))
    step = chunk_rows(chunk_size, len(cols))
    for s in range(0, len(p), step):
        out[s:s + step] = node_sums(p[s:s + step], op_t)
    return out


def answer_probability(probs: np.ndarray, taxonomy: Taxonomy, nodes: np.ndarray) -> np.ndarray:
    """P(answer): for each row, the summed probability of the labels at or below its node (an index into
    `taxonomy.names`) — the probability that the answer is right, if maybe coarse. Returns (N,) float64.

    >>> tax = Taxonomy.from_parents({"Fish": None, "Cod": "Fish", "Hake": "Fish"})
    >>> answer_probability(np.array([[0.7, 0.3], [0.2, 0.8]]), tax, tax.indices(["Fish", "Hake"])).tolist()
    [1.0, 0.8]
    """
    p = as_probs(probs, n_cols=len(taxonomy.labels))
    idx = as_targets(nodes, len(p), len(taxonomy), name="nodes")
    under = ancestor_operator(taxonomy).tocsc()[:, idx]  # (L, N): label l at or below answer n
    return np.asarray(under.multiply(p.T).sum(axis=0), dtype=np.float64).ravel()


def deepest_true(ok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of a (B, depth) mask: the deepest True column, and whether there is one."""
    last = ok.shape[1] - 1 - ok[:, ::-1].argmax(axis=1)
    return last, ok.any(axis=1)


def best_reaching(agg: np.ndarray, depth_key: np.ndarray, cand: np.ndarray, threshold: float) -> np.ndarray:
    # 2·depth + P orders nodes by depth first, then probability (P ≤ 1 < 2 cannot reach the next depth)
    reach = cand[None, :] & (agg >= threshold - SLACK)
    key = np.where(reach, depth_key[None, :] + agg, -np.inf)
    best = key.argmax(axis=1)
    fallback = np.where(cand[None, :], agg, -np.inf).argmax(axis=1)
    return np.where(reach.any(axis=1), best, fallback)


def check_threshold(threshold, name: str = "threshold") -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating, np.integer)):
        raise ConfigError(f"{name} must be one number in [0, 1], got {threshold!r}")
    if not 0.0 <= float(threshold) <= 1.0:
        raise ConfigError(f"{name} must lie in [0, 1], got {float(threshold):g}")
    return float(threshold)


def deepest_node_reaching(scores: np.ndarray, taxonomy: Taxonomy, threshold: float,
                          candidates: Sequence[str] | None = None,
                          chunk_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The deepest candidate node whose summed label `scores` reach `threshold` (at equal depth the larger sum),
    else the candidate with the largest sum. `scores` are (N, L) non-negative label scores — probabilities,
    or probabilities cut to each row's top k (`decide.heuristics`). Returns (nodes, the nodes' summed scores)."""
    cand = candidate_mask(taxonomy, candidates)
    op_t = ancestor_operator(taxonomy).T.tocsr()
    depth_key = 2.0 * taxonomy.depths
    nodes = np.empty(len(scores), dtype=np.int64)
    node_score = np.empty(len(scores))
    step = chunk_rows(chunk_size, len(taxonomy))
    for s in range(0, len(scores), step):
        agg = node_sums(scores[s:s + step], op_t)
        choice = best_reaching(agg, depth_key, cand, threshold)
        nodes[s:s + step] = choice
        node_score[s:s + step] = agg[np.arange(len(agg)), choice]
    return nodes, node_score
