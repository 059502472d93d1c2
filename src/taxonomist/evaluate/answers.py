"""Figures of the answers a decision rule gave (which may be internal nodes): distances, exact hits, per-label
precision/recall/F1, at which rank the answers sit; and the per-rank predictions behind predictions.csv.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import scipy.sparse

from taxonomist.errors import DataError
from taxonomist.evaluate.curves import finite_or_none
from taxonomist.taxonomy import Taxonomy

#: Rows per chunk when per-rank probabilities are summed up the tree (keeps (chunk, nodes) blocks small).
CHUNK = 4096


def level_operator(mapping: np.ndarray, n_nodes: int) -> scipy.sparse.csr_matrix:
    """Sparse (L, n_nodes) 0/1 matrix summing label probabilities into one level's nodes (`Level.label_to_node`)."""
    has = np.flatnonzero(mapping >= 0)
    return scipy.sparse.csr_matrix((np.ones(len(has)), (has, mapping[has])), shape=(len(mapping), n_nodes))


def level_probability_chunks(probs: np.ndarray, mapping: np.ndarray, n_nodes: int,
                             chunk: int = CHUNK) -> Iterator[tuple[int, np.ndarray]]:
    """(start row, (B, n_nodes) probabilities of the level's nodes) for consecutive row chunks of `probs`."""
    op_t = level_operator(mapping, n_nodes).T.tocsr()
    for s in range(0, len(probs), chunk):
        yield s, np.asarray(op_t @ probs[s:s + chunk].T.astype(np.float64, copy=False)).T


def level_predictions(probs: np.ndarray, targets: np.ndarray, taxonomy: Taxonomy) -> dict[str, dict]:
    """Per level: the true node (`label`, "" when the label has none there), the most probable node
    (`prediction`) and its summed probability (`confidence`) — the same numbers as `per_rank` in metrics.json.
    """
    out = {}
    for level in taxonomy.levels():
        nodes = np.array(level.nodes, dtype=object)
        truth = level.label_to_node[targets]
        pred = np.empty(len(probs), dtype=np.int64)
        conf = np.empty(len(probs))
        for s, lp in level_probability_chunks(probs, level.label_to_node, len(level.nodes)):
            pred[s:s + len(lp)] = lp.argmax(axis=1)
            conf[s:s + len(lp)] = lp.max(axis=1)
        out[level.name] = {"label": np.where(truth >= 0, nodes[np.maximum(truth, 0)], ""),
                           "prediction": nodes[pred], "confidence": conf}
    return out


def per_label_table(truth_names, answer_names) -> dict[str, dict]:
    """scikit-learn precision/recall/F1/support for every name that is a true label or an answer.

    An answer that is an internal node (min-risk, back-off) has precision 0 and no support: it is never
    exactly a true label.

    >>> per_label_table(["a", "a", "b"], ["a", "b", "b"])["a"]
    {'precision': 1.0, 'recall': 0.5, 'f1': 0.666667, 'support': 2}
    """
    from sklearn.metrics import precision_recall_fscore_support
    truth = np.asarray(truth_names, dtype=object)
    answer = np.asarray(answer_names, dtype=object)
    if truth.shape != answer.shape:
        raise DataError(f"truth and answers must have one length, got {len(truth)} and {len(answer)}")
    names = list(dict.fromkeys(list(dict.fromkeys(truth)) + list(dict.fromkeys(answer))))
    code = {n: i for i, n in enumerate(names)}
    t = np.fromiter((code[n] for n in truth), dtype=np.int64, count=len(truth))
    a = np.fromiter((code[n] for n in answer), dtype=np.int64, count=len(answer))
    p, r, f, s = precision_recall_fscore_support(t, a, labels=np.arange(len(names)), zero_division=0)
    return {n: {"precision": round(float(p[i]), 6), "recall": round(float(r[i]), 6), "f1": round(float(f[i]), 6),
                "support": int(s[i])} for i, n in enumerate(names)}


def answer_metrics(targets: np.ndarray, answers: np.ndarray, distances: np.ndarray, taxonomy: Taxonomy) -> dict:
    """Metrics of answers (node indices into `taxonomy.names`) against true labels (indices into `labels`).

    Args:
        distances: (N,) taxonomic distance from each true label to its answer.

    Returns `mhd`, `top1` (answer is the true label), `macro_f1` (over the true labels), `distance_histogram`,
    and `answers`: `label_share` (answers that are labels), `on_lineage` (answer is the true label or one of
    its ancestors: right, if maybe coarse), `coverage` (mean hierarchical coverage of the answers, as in
    `decide.coverage_risk_curve`) and `by_level` (share of answers at each rank or depth; `(other)` for
    answers at no level, e.g. the root or an unranked node).

    >>> tax = Taxonomy.from_parents({"R": None, "A": "R", "a1": "A", "a2": "A"})
    >>> m = answer_metrics(np.array([0, 1]), tax.indices(["a1", "A"]), np.array([0.0, 1.0]), tax)
    >>> m["mhd"], m["top1"], m["answers"]["on_lineage"], m["answers"]["by_level"]
    (0.5, 0.5, 1.0, {'depth1': 0.5, 'depth2': 0.5})
    """
    from taxonomist.decide import hierarchical_coverage
    from taxonomist.evaluate.metrics import macro_f1
    targets = np.asarray(targets, dtype=np.int64)
    answers = np.asarray(answers, dtype=np.int64)
    dist = np.asarray(distances, dtype=np.float64)
    if not (len(targets) == len(answers) == len(dist)):
        raise DataError(f"targets, answers and distances must have one length, got {len(targets)}, "
                        f"{len(answers)}, {len(dist)}")
    n = len(targets)
    label_nodes = taxonomy.label_indices
    truth_nodes = label_nodes[targets]
    anc = taxonomy.ancestor_table()
    depth = taxonomy.depths[answers]
    on_lineage = anc[truth_nodes, np.minimum(depth, anc.shape[1] - 1)] == answers
    by_level, placed = {}, np.zeros(n, dtype=bool)
    for level in taxonomy.levels():
        here = np.isin(answers, taxonomy.indices(level.nodes))
        placed |= here
        if here.any():
            by_level[level.name] = round(float(here.mean()), 6)
    if n and not placed.all():
        by_level["(other)"] = round(float((~placed).mean()), 6)
    return {
        "mhd": float(dist.mean()) if n else float("nan"),
        "top1": float((answers == truth_nodes).mean()) if n else float("nan"),
        "macro_f1": macro_f1(truth_nodes, answers),
        "distance_histogram": {f"{v:g}": int(c) for v, c in zip(*np.unique(dist, return_counts=True))},
        "answers": {"label_share": finite_or_none(np.isin(answers, label_nodes).mean()) if n else None,
                    "coverage": finite_or_none(hierarchical_coverage(taxonomy, answers).mean()) if n else None,
                    "on_lineage": finite_or_none(on_lineage.mean()) if n else None,
                    "by_level": by_level},
    }


__all__ = ["level_operator", "level_probability_chunks", "level_predictions", "per_label_table", "answer_metrics"]
