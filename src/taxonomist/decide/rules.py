"""Decision rules: turn probabilities over the labels into one taxonomy node per example.

argmax, min-risk (the Bayes-optimal answer under a taxonomic distance), back-off and selective climbing,
and the coverage–risk curve of selective answers. Pure numpy/scipy on (N, L) arrays; every loop is over chunks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from taxonomist.config import DecideConfig
from taxonomist.decide._arrays import as_matrix, as_probs, as_targets, as_vector, chunk_rows
from taxonomist.decide import heuristics as H
from taxonomist.decide.candidates import candidate_mask
from taxonomist.decide.tree_sums import (SLACK, ancestor_operator, answer_probability, best_reaching,
                                         check_threshold, deepest_node_reaching, deepest_true, node_sums)
from taxonomist.errors import ConfigError, DataError
from taxonomist.taxonomy import RANKS, Taxonomy, default_metric, distance_matrix, suggest

#: The rule names `predict --decision` and `decide` accept.
DECISIONS = ("argmax", "min-risk", "backoff", "selective", "rollup", "common-ancestor")


# ---------------------------------------------------------------------------------------------- helpers
# ---------------------------------------------------------------------------------------------- argmax, min-risk
def argmax_decision(probs: np.ndarray) -> np.ndarray:
    """The most probable label of each row (ties: the first label). Returns (N,) label indices.

    >>> argmax_decision(np.array([[0.2, 0.8], [0.5, 0.5]])).tolist()
    [1, 0]
    """
    return as_probs(probs).argmax(axis=1)


def undominated_candidates(distance_lc: np.ndarray) -> np.ndarray:
    """Columns of `distance_lc` that can be the min-risk answer; the others never can.

    A candidate whose column equals another's plus a constant δ > 0 has, for probabilities summing to 1,
    an expected distance exactly δ higher, so it never wins. Trees make many such columns: a species no
    label lies under is its genus + 1, a genus without labels its family + 1, and so on — `--candidates all`
    over a big taxonomy is mostly these. Of identical columns the first is kept (the argmin's tie-break).
    Returns the kept column indices, ascending.

    >>> undominated_candidates(np.array([[0.0, 1.0, 2.0], [2.0, 3.0, 0.0]])).tolist()  # column 1 = column 0 + 1
    [0, 2]
    """
    columns = np.ascontiguousarray(as_matrix(distance_lc, "distance_lc").T)  # (C, L), input dtype kept
    best: dict[bytes, int] = {}
    for c, col in enumerate(columns):
        # the column minus its first entry, in float64 (exact for float32 input), compared byte for byte
        key = (col.astype(np.float64) - float(col[0])).tobytes()
        kept = best.get(key)
        if kept is None or col[0] < columns[kept, 0]:
            best[key] = c
    return np.sort(np.fromiter(best.values(), dtype=np.int64, count=len(best)))


def min_risk_decision(probs: np.ndarray, distance_lc: np.ndarray, chunk_size: int | None = None,
                      dtype=np.float32, prune: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The Bayes-optimal answer for a distance: argmin over candidates c of Σ_k p_k · D(k, c).

    Args:
        probs: (N, L) probabilities over the labels.
        distance_lc: (L, C) distances, rows = true labels, columns = candidates (any taxonomy nodes,
            e.g. `distance_matrix(tax, metric, rows=tax.labels, cols=candidates)`).
        chunk_size: images per chunk; default keeps the (chunk, C) risk block near 64 MB.
        dtype: precision of the risk matmul. float32 halves memory and doubles BLAS speed; an exact tie
            is broken towards the first candidate, and two candidates whose risks differ by less than
            float32 rounding (~1e-7 relative) may be swapped. Use np.float64 for exact choices.
        prune: drop the candidates that can never win (`undominated_candidates`) before the matmul; the
            answers are the same, the cost falls with the share of such candidates.

    Returns:
        (choices, risk): (N,) column indices into the candidates, and (N,) the expected distance of each
        choice under `probs`, recomputed in float64.

    Three sibling labels (distance 2 from each other, 1 from their parent): with 0.4/0.4/0.2 the parent is
    the best answer (expected distance 1.0, against 1.2 for either 0.4 label):

    >>> d = np.array([[0, 2, 2, 1], [2, 0, 2, 1], [2, 2, 0, 1]], dtype=float)  # columns: 3 labels, parent
    >>> choice, risk = min_risk_decision(np.array([[0.4, 0.4, 0.2]]), d)
    >>> int(choice[0]), round(float(risk[0]), 6)
    (3, 1.0)
    """
    p = as_probs(probs)
    d = as_matrix(distance_lc, "distance_lc", n_rows=p.shape[1], nonnegative=True)
    if d.shape[1] == 0:
        raise DataError("distance_lc has no columns: the candidate set is empty")
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ConfigError(f"dtype must be float32 or float64, got {dtype}")
    keep = undominated_candidates(d) if prune else np.arange(d.shape[1])
    d_work = np.ascontiguousarray(d[:, keep], dtype=dtype)
    d_t = np.ascontiguousarray(d[:, keep].T, dtype=np.float64)  # (C', L): one row per candidate, exact risk
    choices = np.empty(len(p), dtype=np.int64)
    risk = np.empty(len(p))
    step = chunk_rows(chunk_size, len(keep))
    for s in range(0, len(p), step):
        block = p[s:s + step]
        # the only O(N·L·C) step: one BLAS matmul per chunk, the (chunk, C) result dropped after argmin
        c = (block.astype(dtype, copy=False) @ d_work).argmin(axis=1)
        choices[s:s + step] = keep[c]
        risk[s:s + step] = np.einsum("bl,bl->b", block.astype(np.float64, copy=False), d_t[c])
    return choices, risk


def expected_distance(probs: np.ndarray, distance_lc: np.ndarray, choices: np.ndarray,
                      chunk_size: int | None = None) -> np.ndarray:
    """Expected distance Σ_k p_k · D(k, choice) of given answers under the model's own probabilities.

    `choices` are column indices into `distance_lc` (L, C); returns (N,) float64.

    >>> expected_distance(np.array([[0.5, 0.5]]), np.array([[0.0, 2.0], [2.0, 0.0]]), np.array([0])).tolist()
    [1.0]
    """
    p = as_probs(probs)
    d = as_matrix(distance_lc, "distance_lc", n_rows=p.shape[1], nonnegative=True)
    c = as_targets(choices, len(p), d.shape[1], name="choices")
    d_t = np.ascontiguousarray(d.T, dtype=np.float64)
    out = np.empty(len(p))
    step = chunk_rows(chunk_size, p.shape[1])
    for s in range(0, len(p), step):
        out[s:s + step] = np.einsum("bl,bl->b", p[s:s + step].astype(np.float64, copy=False), d_t[c[s:s + step]])
    return out


# ---------------------------------------------------------------------------------------------- thresholds
def default_thresholds(taxonomy: Taxonomy) -> dict:
    """Back-off thresholds when none are given.

    Ranked taxonomy: `DecideConfig().thresholds` (species 0.55, genus 0.60, … kingdom 0.85). Unranked tree:
    the same ladder per depth — the deepest level 0.55, +0.05 per level up, at most 0.85.

    >>> default_thresholds(Taxonomy.from_parents({"A": None, "B": "A", "C": "B"}))
    {0: 0.65, 1: 0.6, 2: 0.55}
    """
    if taxonomy.has_ranks:
        return dict(DecideConfig().thresholds)
    top = taxonomy.max_depth
    return {d: round(min(0.85, 0.55 + 0.05 * (top - d)), 2) for d in range(top + 1)}


def threshold_value(key, value) -> float:
    """`value` as a probability threshold in [0, 1], or a ConfigError naming `thresholds[key]`."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"thresholds[{key!r}] must be a number in [0, 1], got {value!r}") from None
    if not 0.0 <= v <= 1.0:
        raise ConfigError(f"thresholds[{key!r}] must lie in [0, 1], got {v:g}")
    return v


def node_thresholds(taxonomy: Taxonomy, thresholds: Mapping | float | None = None) -> np.ndarray:
    """Each node's back-off threshold, NaN where none applies. Returns (len(taxonomy),) float64.

    `thresholds` is one of:
    - a number: every node;
    - `{rank: p}` (ranked taxonomies): a node at that rank gets p; a node at no rank (e.g. Tunicata, a
      subphylum) gets the threshold of its nearest ranked ancestor — the stricter, coarser one;
    - `{depth: p}` with int keys, digit strings or `"depthN"` (any tree; roots are depth 0);
    - None: `default_thresholds(taxonomy)`.
    Ranks or depths without a threshold get NaN: the back-off never stops there.

    >>> tax = Taxonomy.from_parents({"A": None, "B": "A"}, ranks={"A": "kingdom", "B": "phylum"})
    >>> node_thresholds(tax, {"phylum": 0.8}).tolist()
    [nan, 0.8]
    """
    n = len(taxonomy)
    if thresholds is None:
        thresholds = default_thresholds(taxonomy)
    if isinstance(thresholds, (int, float, np.floating, np.integer)) and not isinstance(thresholds, bool):
        return np.full(n, threshold_value("all", thresholds))
    if not isinstance(thresholds, Mapping):
        raise ConfigError(f"thresholds must be a number or a mapping rank/depth -> probability, "
                          f"got {type(thresholds).__name__}")
    by_rank, by_depth = {}, {}
    for key, value in thresholds.items():
        v = threshold_value(key, value)
        text = str(key).strip()
        if isinstance(key, str) and text in RANKS:
            by_rank[text] = v
        elif isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            by_depth[int(key)] = v
        elif text.isdigit() or (text.startswith("depth") and text[5:].isdigit()):
            by_depth[int(text.removeprefix("depth"))] = v
        else:
            raise ConfigError(f"thresholds key {key!r} is neither a rank nor a depth{suggest(text, RANKS)}; "
                              f"use {', '.join(RANKS)} or depth0, depth1, …")
    if by_rank and by_depth:
        raise ConfigError("thresholds mix ranks and depths; give them all per rank or all per depth")
    out = np.full(n, np.nan)
    if by_rank:
        if not taxonomy.has_ranks:
            raise ConfigError("thresholds are given per rank but the taxonomy has no ranks; give them per depth "
                              "(depth1=0.6,depth2=0.55,…) or as one number")
        effective: list[str | None] = []  # own rank, else nearest ranked ancestor's (parents come first)
        for i, (rank, parent) in enumerate(zip(taxonomy.ranks, taxonomy.parents)):
            effective.append(rank if rank is not None else (effective[parent] if parent >= 0 else None))
            if effective[i] in by_rank:
                out[i] = by_rank[effective[i]]
        return out
    depths = taxonomy.depths
    for d, v in by_depth.items():
        if d < 0 or d > taxonomy.max_depth:
            raise ConfigError(f"thresholds name depth {d}, but the taxonomy's depths run 0…{taxonomy.max_depth}")
        out[depths == d] = v
    return out


# ---------------------------------------------------------------------------------------------- back-off, selective
def backoff_decision(probs: np.ndarray, taxonomy: Taxonomy, thresholds: Mapping | float | None = None,
                     candidates: Sequence[str] | None = None,
                     chunk_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Climb from the most probable label towards the root until a node is probable enough.

    The rule, per example:
    1. aggregate: P(v) = the sum of the probabilities of the labels at or below node v;
    2. start at the most probable label ℓ (ties: the first label) and walk its lineage upwards, ℓ first;
    3. answer the first node v on the way that is a candidate, has a threshold t(v) (see
       `node_thresholds`; defaults species 0.55 … kingdom 0.85) and has P(v) ≥ t(v);
    4. if no node qualifies, answer the root-most candidate on the lineage (the root itself when every node
       is a candidate); if the lineage holds no candidate at all, the candidate with the highest P(v).

    Args:
        probs: (N, L) probabilities over `taxonomy.labels`.
        thresholds: a number, `{rank: p}`, `{depth: p}` or None (defaults), as in `node_thresholds`.
        candidates: node names that may be answered; None = every node.

    Returns:
        (nodes, node_probs): (N,) indices into `taxonomy.names` and (N,) P(answer).

    >>> tax = Taxonomy.from_parents({"Fish": None, "Cod": "Fish", "Hake": "Fish"})
    >>> nodes, p = backoff_decision(np.array([[0.6, 0.4], [0.9, 0.1]]), tax, thresholds=0.7)
    >>> [tax.names[i] for i in nodes], p.tolist()
    (['Fish', 'Cod'], [1.0, 0.9])
    """
    p = as_probs(probs, n_cols=len(taxonomy.labels))
    thr = node_thresholds(taxonomy, thresholds)
    cand = candidate_mask(taxonomy, candidates)
    lineages = taxonomy.ancestor_table()[taxonomy.label_indices]  # (L, D+1)
    op_t = ancestor_operator(taxonomy).T.tocsr()
    nodes = np.empty(len(p), dtype=np.int64)
    node_p = np.empty(len(p))
    step = chunk_rows(chunk_size, len(taxonomy))
    for s in range(0, len(p), step):
        block = p[s:s + step]
        agg = node_sums(block, op_t)
        lin = lineages[block.argmax(axis=1)]  # (B, D+1), -1 below the starting label
        safe = np.maximum(lin, 0)
        on_lineage = (lin >= 0) & cand[safe]
        with np.errstate(invalid="ignore"):  # NaN thresholds compare False: no stop there
            ok = on_lineage & (np.take_along_axis(agg, safe, axis=1) >= thr[safe] - SLACK)
        depth, found = deepest_true(ok)
        choice = safe[np.arange(len(block)), depth]
        # fallback: the root-most candidate on the lineage, else the most probable candidate anywhere
        top_most = safe[np.arange(len(block)), on_lineage.argmax(axis=1)]
        anywhere = np.where(cand[None, :], agg, -np.inf).argmax(axis=1)
        choice = np.where(found, choice, np.where(on_lineage.any(axis=1), top_most, anywhere))
        nodes[s:s + step] = choice
        node_p[s:s + step] = agg[np.arange(len(block)), choice]
    return nodes, node_p


def selective_decision(probs: np.ndarray, taxonomy: Taxonomy, threshold: float = 0.5,
                       candidates: Sequence[str] | None = None,
                       chunk_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The deepest node whose aggregated probability reaches `threshold`.

    P(v) is the sum of the probabilities of the labels at or below v. Among the candidate nodes with
    P(v) ≥ threshold the deepest (largest depth) is answered; at equal depth the more probable one (then
    the first in taxonomy order). Above 0.5 at most one node per depth qualifies, so the answers form the
    "climbing" rule of Goren et al. (2024) started from the most probable path. If no candidate reaches the
    threshold (a forest, or candidates without the roots), the most probable candidate is answered.
    The default 0.5 answers the deepest node the model holds more likely than not.

    Returns (nodes, node_probs): (N,) indices into `taxonomy.names` and (N,) P(answer).

    >>> tax = Taxonomy.from_parents({"Fish": None, "Cod": "Fish", "Hake": "Fish"})
    >>> nodes, p = selective_decision(np.array([[0.6, 0.4], [0.9, 0.1]]), tax, threshold=0.8)
    >>> [tax.names[i] for i in nodes]
    ['Fish', 'Cod']
    """
    p = as_probs(probs, n_cols=len(taxonomy.labels))
    return deepest_node_reaching(p, taxonomy, check_threshold(threshold), candidates, chunk_size)


def hierarchical_coverage(taxonomy: Taxonomy, nodes: np.ndarray) -> np.ndarray:
    """Coverage of answering node v: 1 − log |labels under v| / log |labels| (1 for a label, 0 for the root).

    This is Deng et al.'s (2012) information gain of an answer, normalised to [0, 1], which Goren et al.
    (NeurIPS 2024, "Hierarchical Selective Classification") use as hierarchical coverage. A label that is
    also an ancestor of other labels counts them all. `nodes` are indices into `taxonomy.names`.

    >>> tax = Taxonomy.from_parents({"R": None, "A": "R", "B": "R", "a1": "A", "a2": "A", "b1": "B", "b2": "B"})
    >>> hierarchical_coverage(tax, tax.indices(["a1", "A", "R"])).tolist()
    [1.0, 0.5, 0.0]
    """
    idx = as_targets(nodes, len(np.asarray(nodes)), len(taxonomy), name="nodes")
    n_under = np.asarray(ancestor_operator(taxonomy).sum(axis=0)).ravel()  # labels at or below each node
    n_labels = len(taxonomy.labels)
    if n_labels < 2:
        return np.ones(len(idx))
    return 1.0 - np.log(np.maximum(n_under[idx], 1.0)) / math.log(n_labels)


def coverage_risk_curve(probs: np.ndarray, targets: np.ndarray, taxonomy: Taxonomy, distance_lc: np.ndarray,
                        thresholds: Sequence[float], candidates: Sequence[str] | None = None,
                        chunk_size: int | None = None) -> dict[str, np.ndarray]:
    """Coverage and risk of `selective_decision` at each threshold.

    Args:
        probs: (N, L) probabilities; targets: (N,) true label indices.
        distance_lc: (L, C) distances from each true label to each candidate node — C = len(candidates),
            or every node in `taxonomy.names` order when `candidates` is None.
        thresholds: the selective thresholds to sweep.

    Returns a dict of arrays, one entry per threshold:
        `threshold`; `coverage` — mean `hierarchical_coverage` of the answers (Goren et al. 2024);
        `label_share` — share of answers that are labels (full-specificity answers); `mhd` — mean distance
        of the answers to the truth; `error` — hierarchical error: share of answers that are neither the
        true label nor one of its ancestors.

    >>> tax = Taxonomy.from_parents({"Fish": None, "Cod": "Fish", "Hake": "Fish"})
    >>> d = np.array([[1.0, 0.0, 2.0], [1.0, 2.0, 0.0]])   # columns Fish, Cod, Hake (lca distance)
    >>> c = coverage_risk_curve(np.array([[0.6, 0.4]]), np.array([1]), tax, d, [0.5, 0.9])
    >>> c["coverage"].tolist(), c["mhd"].tolist(), c["error"].tolist()
    ([1.0, 0.0], [2.0, 1.0], [1.0, 0.0])
    """
    p = as_probs(probs, n_cols=len(taxonomy.labels))
    y = as_targets(targets, len(p), p.shape[1])
    ts = [check_threshold(t, "thresholds[]") for t in as_vector(thresholds, "thresholds")]
    cand = candidate_mask(taxonomy, candidates)
    cand_idx = np.flatnonzero(cand) if candidates is None else taxonomy.indices(list(dict.fromkeys(candidates)))
    d = as_matrix(distance_lc, "distance_lc", n_rows=p.shape[1], n_cols=len(cand_idx), nonnegative=True)
    column = np.full(len(taxonomy), -1)
    column[cand_idx] = np.arange(len(cand_idx))
    node_cov = hierarchical_coverage(taxonomy, np.arange(len(taxonomy)))
    is_label = np.zeros(len(taxonomy), dtype=bool)
    is_label[taxonomy.label_indices] = True
    lineages = taxonomy.ancestor_table()[taxonomy.label_indices]
    depths = taxonomy.depths
    op_t = ancestor_operator(taxonomy).T.tocsr()
    depth_key = 2.0 * depths
    sums = np.zeros((len(ts), 4))  # coverage, label share, distance, error
    step = chunk_rows(chunk_size, len(taxonomy))
    for s in range(0, len(p), step):
        agg = node_sums(p[s:s + step], op_t)
        yb = y[s:s + step]
        for k, t in enumerate(ts):
            v = best_reaching(agg, depth_key, cand, t)
            correct = lineages[yb, depths[v]] == v  # v is the true label or one of its ancestors
            sums[k] += (node_cov[v].sum(), is_label[v].sum(), d[yb, column[v]].sum(), (~correct).sum())
    n = max(len(p), 1)
    return {"threshold": np.array(ts), "coverage": sums[:, 0] / n, "label_share": sums[:, 1] / n,
            "mhd": sums[:, 2] / n, "error": sums[:, 3] / n}


# ---------------------------------------------------------------------------------------------- one door
@dataclass(frozen=True)
class Decisions:
    """One answer per example.

    Attributes:
        nodes: (N,) indices into `taxonomy.names`.
        names: the answered node names.
        confidence: (N,) probability that the true label is the answer or lies below it.
        expected_distance: (N,) expected distance of the answer under the probabilities (min-risk only).
    """

    nodes: np.ndarray
    names: list[str]
    confidence: np.ndarray
    expected_distance: np.ndarray | None = None


def decide(probs: np.ndarray, taxonomy: Taxonomy, rule: str = "argmax", candidates: Sequence[str] | None = None,
           metric: str = "auto", thresholds: Mapping | float | None = None,
           chunk_size: int | None = None, top_k: int | None = None) -> Decisions:
    """Apply a decision rule by name (`argmax`, `min-risk`, `backoff`, `selective`, `rollup`, `common-ancestor`).

    Args:
        candidates: node names the answer must come from (see `candidate_nodes`). None means the training
            labels for argmax and min-risk, every node for the others.
        metric: the distance min-risk minimises: `auto` (fathomnet2025 for ranked trees, else lca),
            `fathomnet2025` or `lca`.
        thresholds: backoff: as in `node_thresholds`; selective: one number (default 0.5); rollup: the sum of
            the top k to reach (default 0.65); common-ancestor: the share of the top k (default 0.78); ignored
            by argmax and min-risk.
        top_k: rollup (default 5) and common-ancestor (default 15): how many of the most probable labels count.

    >>> tax = Taxonomy.from_parents({"R": None, "A": "R", "B": "R", "a1": "A", "a2": "A", "b1": "B", "b2": "B"})
    >>> probs = np.array([[0.4, 0.4, 0.1, 0.1]])
    >>> decide(probs, tax, "argmax").names, decide(probs, tax, "min-risk", candidates=tax.names).names
    (['a1'], ['A'])
    """
    if rule not in DECISIONS:
        raise ConfigError(f"unknown decision rule {rule!r}{suggest(str(rule), DECISIONS)}; "
                          f"choose one of {', '.join(DECISIONS)}")
    p = as_probs(probs, n_cols=len(taxonomy.labels))
    risk = None
    if rule in ("argmax", "min-risk"):
        names = list(taxonomy.labels) if candidates is None else list(dict.fromkeys(candidates))
        candidate_mask(taxonomy, names)  # validates the names
        if rule == "argmax":
            allowed = np.isin(taxonomy.label_indices, taxonomy.indices(names))
            if not allowed.any():
                raise ConfigError("argmax needs at least one label among the candidates; use min-risk to answer "
                                  "with other nodes")
            if allowed.all():
                nodes = taxonomy.label_indices[argmax_decision(p)]
            else:  # restrict the argmax to the candidate labels, chunked like the other rules
                nodes = np.empty(len(p), dtype=np.int64)
                step = chunk_rows(chunk_size, p.shape[1])
                for s in range(0, len(p), step):
                    nodes[s:s + step] = taxonomy.label_indices[np.where(allowed, p[s:s + step], -1.0).argmax(axis=1)]
        else:
            metric = default_metric(taxonomy) if metric == "auto" else metric
            dist = distance_matrix(taxonomy, metric, rows=taxonomy.labels, cols=names)
            choice, risk = min_risk_decision(p, dist, chunk_size=chunk_size)
            nodes = taxonomy.indices(names)[choice]
        confidence = answer_probability(p, taxonomy, nodes)
    elif rule == "backoff":
        nodes, confidence = backoff_decision(p, taxonomy, thresholds, candidates, chunk_size)
    else:
        if isinstance(thresholds, Mapping):
            raise ConfigError(f"the {rule} rule takes one threshold (a number in [0, 1]), not one per rank")
        if rule == "selective":
            nodes, confidence = selective_decision(p, taxonomy, 0.5 if thresholds is None else thresholds,
                                                   candidates, chunk_size)
        else:
            if rule == "rollup":
                nodes, confidence = H.rollup_decision(
                    p, taxonomy, H.ROLLUP_THRESHOLD if thresholds is None else thresholds,
                    H.ROLLUP_TOP_K if top_k is None else top_k, candidates, chunk_size)
            else:
                nodes, confidence = H.common_ancestor_decision(
                    p, taxonomy, H.COMMON_ANCESTOR_SHARE if thresholds is None else thresholds,
                    H.COMMON_ANCESTOR_TOP_K if top_k is None else top_k, candidates, chunk_size)
    return Decisions(nodes, [taxonomy.names[i] for i in nodes], confidence, risk)
