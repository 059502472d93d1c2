"""SpeciesNet-style roll-up and iNaturalist-style common ancestor: hand-made cases, the parameters, and the
vectorised rules against a per-row reading of their definitions on random probabilities."""
from __future__ import annotations

import numpy as np
import pytest

from taxonomist.decide import common_ancestor_decision, decide, rollup_decision
from taxonomist.decide.heuristics import top_k_scores
from taxonomist.errors import ConfigError
from taxonomist.taxonomy import Taxonomy

TREE = Taxonomy.from_parents({"R": None, "A": "R", "B": "R", "a1": "A", "a2": "A", "b1": "B", "b2": "B"})


def names(nodes) -> list[str]:
    return [TREE.names[i] for i in nodes]


def test_rollup_answers_the_species_the_genus_or_the_root_as_the_top_k_sum_allows():
    probs = np.array([[0.70, 0.10, 0.10, 0.10],    # a1 alone passes 0.65
                      [0.40, 0.30, 0.20, 0.10],    # a1 + a2 = 0.70 under A
                      [0.30, 0.05, 0.35, 0.30]])   # B = 0.65 exactly: reaches it
    nodes, p = rollup_decision(probs, TREE)
    assert names(nodes) == ["a1", "A", "B"]
    assert p.tolist() == pytest.approx([0.70, 0.70, 0.65])
    # only the top label counts: 0.4 never reaches 0.65, and the fallback is the largest sum (the root first)
    nodes, p = rollup_decision(probs[1:2], TREE, top_k=1)
    assert names(nodes) == ["R"] and p.tolist() == pytest.approx([1.0])  # P(answer) under all probabilities


def test_common_ancestor_renormalises_the_top_k():
    probs = np.array([[0.40, 0.30, 0.20, 0.10]])
    assert names(common_ancestor_decision(probs, TREE, top_k=2)[0]) == ["A"]     # 0.4/0.7 < 0.78 ≤ 0.7/0.7
    assert names(common_ancestor_decision(probs, TREE)[0]) == ["R"]             # A holds 0.7 of all < 0.78
    assert names(common_ancestor_decision(probs, TREE, share=0.55, top_k=2)[0]) == ["a1"]  # 0.571 ≥ 0.55


def test_decide_runs_both_by_name_with_their_parameters():
    probs = np.array([[0.40, 0.30, 0.20, 0.10]])
    assert decide(probs, TREE, "rollup").names == ["A"]
    assert decide(probs, TREE, "rollup", thresholds=0.75).names == ["R"]
    assert decide(probs, TREE, "common-ancestor", top_k=2).names == ["A"]
    assert decide(probs, TREE, "rollup", candidates=["R", "a1", "b1"]).names == ["R"]  # A is not a candidate
    with pytest.raises(ConfigError, match="rollup rule takes one threshold"):
        decide(probs, TREE, "rollup", thresholds={"species": 0.5})
    with pytest.raises(ConfigError, match="top_k must be a whole number of at least 1, got 0"):
        decide(probs, TREE, "common-ancestor", top_k=0)
    with pytest.raises(ConfigError, match=r"share must lie in \[0, 1\], got 1.5"):
        common_ancestor_decision(probs, TREE, share=1.5)


def _by_definition(row: np.ndarray, tax: Taxonomy, threshold: float, k: int, renormalise: bool) -> str:
    keep = np.argsort(-row, kind="stable")[:k]
    scores = {tax.labels[i]: row[i] for i in keep}
    if renormalise:
        total = sum(scores.values())
        scores = {n: v / total for n, v in scores.items()}
    sums = {node: sum(v for lab, v in scores.items() if node in tax.lineage(lab)) for node in tax.names}
    reached = [n for n in tax.names if sums[n] >= threshold - 1e-9]
    if not reached:
        return max(tax.names, key=lambda n: sums[n])
    return max(reached, key=lambda n: (tax.depths[tax.names.index(n)], sums[n]))


@pytest.mark.parametrize("rule, k, renormalise, threshold", [("rollup", 3, False, 0.65),
                                                             ("common-ancestor", 5, True, 0.78)])
def test_vectorised_rules_match_their_definition_row_by_row(rule, k, renormalise, threshold):
    rng = np.random.default_rng(0)
    parents = {"root": None}
    for g in range(4):
        parents[f"g{g}"] = "root"
        for s in range(3):
            parents[f"g{g}s{s}"] = f"g{g}"
    tax = Taxonomy.from_parents(parents)
    probs = rng.dirichlet(np.full(len(tax.labels), 0.3), size=300)
    got = decide(probs, tax, rule, top_k=k).names
    expected = [_by_definition(row, tax, threshold, k, renormalise) for row in probs]
    assert got == expected


def test_top_k_scores_keeps_the_largest_in_place():
    p = np.array([[0.1, 0.4, 0.2, 0.3], [0.25, 0.25, 0.25, 0.25]])
    assert top_k_scores(p, 2).tolist() == [[0.0, 0.4, 0.0, 0.3], [0.25, 0.25, 0.0, 0.0]]  # ties: the first
    assert top_k_scores(p, 10).tolist() == p.tolist()
