"""Taxonomic distance matrices, vectorized over any two lists of nodes.

- `fathomnet2025`: the exact FathomNet 2025 (Kaggle) rule on the seven-rank lineage table.
- `lca`: edges from each node up to their lowest common ancestor, optionally weighted per rank.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from taxonomist.errors import TaxonomyError
from taxonomist.taxonomy.core import RANKS, Taxonomy, suggest

METRICS = ("fathomnet2025", "lca")

#: What the FathomNet 2025 scorer gives a name outside the 79 (the largest possible distance).
FATHOMNET_MAX_DISTANCE = 12.0


def fathomnet2025_distance(taxonomy: Taxonomy, rows: Sequence[str] | None = None,
                           cols: Sequence[str] | None = None) -> np.ndarray:
    """The FathomNet 2025 distance between every node of `rows` (truths) and `cols` (predictions).

    Per rank, kingdom … species: both absent 0, one absent 1, both present and different 2. A node at no
    Linnaean rank (the exception taxa Caridea, Acanthascinae, Actinopterygii, Zoantharia, Tunicata in the
    official table) adds 1 for each side it is on when the two differ. Defaults: labels × labels.

    >>> from taxonomist.taxonomy import builtin_taxonomy
    >>> tax = builtin_taxonomy("fathomnet2025")
    >>> float(fathomnet2025_distance(tax, ["Tunicata"], ["Ophiuroidea"])[0, 0])
    4.0
    """
    rows = list(taxonomy.labels if rows is None else rows)
    cols = list(taxonomy.labels if cols is None else cols)
    r_codes = taxonomy.rank_codes(rows)
    c_codes = taxonomy.rank_codes(cols)
    d = np.zeros((len(rows), len(cols)), dtype=np.float64)
    for k in range(len(RANKS)):  # 7 broadcasts of (R, C); no (R, C, 7) temporary
        a = r_codes[:, k][:, None]
        b = c_codes[:, k][None, :]
        a_none, b_none = a < 0, b < 0
        d += (a_none ^ b_none) * 1.0 + ((~a_none) & (~b_none) & (a != b)) * 2.0
    ranks = taxonomy.ranks
    r_unranked = np.array([ranks[i] is None for i in taxonomy.indices(rows)], dtype=np.float64)
    c_unranked = np.array([ranks[i] is None for i in taxonomy.indices(cols)], dtype=np.float64)
    differ = taxonomy.indices(rows)[:, None] != taxonomy.indices(cols)[None, :]
    d += differ * (r_unranked[:, None] + c_unranked[None, :])
    return d


def lca_distance(taxonomy: Taxonomy, rows: Sequence[str] | None = None, cols: Sequence[str] | None = None,
                 rank_weights: Mapping[str, float] | None = None, default_weight: float = 1.0) -> np.ndarray:
    """Tree distance: the (weighted) number of edges from each node up to their lowest common ancestor.

    Roots hang under one virtual root, so nodes of different trees are joined there. With `rank_weights`,
    an edge costs the weight of its lower node's rank (`default_weight` for a node with no rank or a rank
    not in `rank_weights`), e.g. `{"species": 0.5}` makes sibling species closer than sibling genera.

    >>> tax = Taxonomy.from_parents({"A": None, "B": "A", "C": "A", "D": "B"})
    >>> lca_distance(tax, ["D"], ["C", "B", "D"]).tolist()
    [[3.0, 1.0, 0.0]]
    """
    rows = list(taxonomy.labels if rows is None else rows)
    cols = list(taxonomy.labels if cols is None else cols)
    ri, ci = taxonomy.indices(rows), taxonomy.indices(cols)
    weights = dict(rank_weights or {})
    for r, w in {**weights, "default": default_weight}.items():
        if r != "default" and r not in RANKS:
            raise TaxonomyError(f"unknown rank {r!r} in rank weights{suggest(str(r), RANKS)}; "
                                f"ranks are {', '.join(RANKS)}")
        if not isinstance(w, (int, float)) or not np.isfinite(w) or w < 0:
            raise TaxonomyError(f"rank weight of {r!r} must be a finite number >= 0, got {w!r}")
    edge = np.array([weights.get(r, default_weight) if r else default_weight for r in taxonomy.ranks])
    anc = taxonomy.ancestor_table()  # (N, D): ancestor at each depth, -1 below the node
    a_anc, b_anc = anc[ri], anc[ci]  # only the rows asked for: (R, D) and (C, D), not (N, D), are weighed

    def path_weights(lineages: np.ndarray) -> np.ndarray:
        # weight of the path root→node at each depth: cumulative sum of edge weights along the lineage
        # (every root is one edge below the virtual root)
        return np.where(lineages >= 0, edge[np.maximum(lineages, 0)], 0.0).cumsum(axis=1)

    cum_a, cum_b = path_weights(a_anc), path_weights(b_anc)
    total_a = np.take_along_axis(cum_a, taxonomy.depths[ri][:, None], axis=1)[:, 0]
    total_b = np.take_along_axis(cum_b, taxonomy.depths[ci][:, None], axis=1)[:, 0]
    shared = np.ones((len(rows), len(cols)), dtype=bool)
    lca_weight = np.zeros((len(rows), len(cols)))
    # the levels every row and column share (the root; the trunk of a deep narrow tree) cost no (R, C) pass
    first = 0
    while (first < anc.shape[1] and len(rows) and len(cols) and a_anc[0, first] >= 0
           and (a_anc[:, first] == a_anc[0, first]).all() and (b_anc[:, first] == a_anc[0, first]).all()):
        first += 1
    if first:
        lca_weight[:] = cum_a[:, first - 1][:, None]
    for depth in range(first, anc.shape[1]):
        same = (a_anc[:, depth][:, None] == b_anc[:, depth][None, :]) & (a_anc[:, depth][:, None] >= 0)
        shared &= same
        if not shared.any():
            break
        # cum_a[r, depth] is the same for both sides while their lineages agree
        np.copyto(lca_weight, cum_a[:, depth][:, None], where=shared)
    return total_a[:, None] + total_b[None, :] - 2.0 * lca_weight


def distance_matrix(taxonomy: Taxonomy, metric: str = "lca", rows: Sequence[str] | None = None,
                    cols: Sequence[str] | None = None, **kwargs) -> np.ndarray:
    """Distances by metric name (`fathomnet2025` or `lca`); rows are truths, columns predictions.

    Rows and columns default to the taxonomy's labels; extra keyword arguments go to the metric
    (`rank_weights`, `default_weight` for `lca`).

    >>> tax = Taxonomy.from_parents({"Fish": None, "Cod": "Fish", "Hake": "Fish"})
    >>> distance_matrix(tax, "lca").tolist()
    [[0.0, 2.0], [2.0, 0.0]]
    """
    if metric == "fathomnet2025":
        if not taxonomy.has_ranks:
            raise TaxonomyError("the fathomnet2025 metric needs a taxonomy with Linnaean ranks; use --metric lca")
        if kwargs:
            raise TaxonomyError(f"the fathomnet2025 metric takes no options, got {', '.join(kwargs)}")
        return fathomnet2025_distance(taxonomy, rows, cols)
    if metric == "lca":
        return lca_distance(taxonomy, rows, cols, **kwargs)
    raise TaxonomyError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")


def default_metric(taxonomy: Taxonomy) -> str:
    """`fathomnet2025` for ranked (Linnaean) taxonomies, `lca` for any other tree."""
    return "fathomnet2025" if taxonomy.has_ranks else "lca"
