"""The fallback of a flagged answer: an example judged unknown is answered with a coarse ancestor (a rank, a
depth or a probability), so that an unknown species is not named; `parse_fallback` reads `--ood-fallback`.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from taxonomist.decide._arrays import as_probs, as_targets, as_vector, chunk_rows
from taxonomist.decide.candidates import candidate_mask
from taxonomist.decide.tree_sums import ancestor_operator, deepest_true, node_sums
from taxonomist.errors import ConfigError, DataError
from taxonomist.taxonomy import RANKS, Taxonomy, suggest
from taxonomist.taxonomy.core import RANK_INDEX

#: `--ood-fallback auto`: the order for ranked trees, depth 1 for any other (`resolve_fallback`).
AUTO_FALLBACK = "auto"


def parse_fallback(value) -> str | int | float:
    """`--ood-fallback` as a value `ood_fallback` takes: a rank, `depthN`, an int depth or a probability (digits
    alone are a depth, a number with a point a probability); None, "" and `auto` give `AUTO_FALLBACK`.

    >>> parse_fallback("order"), parse_fallback("2"), parse_fallback("0.9"), parse_fallback(None)
    ('order', 2, 0.9, 'auto')
    """
    if value is None or (isinstance(value, str) and value.strip() in ("", AUTO_FALLBACK)):
        return AUTO_FALLBACK
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        out = int(value) if isinstance(value, (int, np.integer)) else float(value)
    else:
        text = str(value).strip()
        if text in RANKS or (text.startswith("depth") and text[5:].isdigit()):
            return text
        if text.isdigit():
            out = int(text)
        else:
            try:
                out = float(text)
            except ValueError:
                raise ConfigError(f"--ood-fallback {text!r}: give a rank ({', '.join(RANKS)}), depthN or a "
                                  f"probability{suggest(text, RANKS)}") from None
    if isinstance(out, float) and not 0.0 <= out <= 1.0:
        raise ConfigError(f"--ood-fallback {value!r}: a probability must lie in [0, 1] (a depth is a whole number)")
    if isinstance(out, int) and out < 0:
        raise ConfigError(f"--ood-fallback {value!r}: a depth must be >= 0")
    return out


def resolve_fallback(value, taxonomy: Taxonomy) -> str | int | float:
    """`parse_fallback(value)` with `auto` made concrete for `taxonomy` (order, or depth 1 for unranked trees), and
    a rank refused for a tree without ranks.

    >>> resolve_fallback("auto", Taxonomy.from_parents({"A": None, "B": "A"}))
    1
    """
    fallback = parse_fallback(value)
    if fallback == AUTO_FALLBACK:
        return "order" if taxonomy.has_ranks else 1
    if isinstance(fallback, str) and fallback in RANK_INDEX and not taxonomy.has_ranks:
        raise ConfigError(f"--ood-fallback {fallback!r} is a rank but the taxonomy has no ranks; use depthN")
    return fallback


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
