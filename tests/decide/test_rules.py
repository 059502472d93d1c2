"""Decision rules on hand-computed cases, and min-risk against argmax on many random draws."""
from __future__ import annotations

import numpy as np
import pytest

from taxonomist.decide import (ancestor_operator, argmax_decision, backoff_decision, coverage_risk_curve, decide,
                               default_thresholds, expected_distance, hierarchical_coverage, min_risk_decision,
                               node_probabilities, node_thresholds, selective_decision, undominated_candidates)
from taxonomist.errors import ConfigError, DataError, UnknownLabelError
from taxonomist.taxonomy import builtin_taxonomy, distance_matrix, lca_distance


def names(tax, nodes):
    return [tax.names[i] for i in nodes]


# ------------------------------------------------------------------------------------------ argmax, min-risk
def test_argmax():
    assert argmax_decision(np.array([[0.1, 0.6, 0.3], [0.5, 0.0, 0.5]])).tolist() == [1, 0]


def test_min_risk_picks_an_internal_node_argmax_cannot(tree):
    probs = np.array([[0.4, 0.4, 0.1, 0.1]])  # a1, a2, b1, b2
    d = lca_distance(tree, tree.labels, tree.names)
    choice, risk = min_risk_decision(probs, d)
    # risk(a1) = 0.4·2 + 0.2·4 = 1.6; risk(A) = 0.8·1 + 0.2·3 = 1.4; risk(R) = 2; risk(B) = 2.6
    assert tree.names[choice[0]] == "A"
    assert risk[0] == pytest.approx(1.4)
    argmax_col = tree.index(tree.labels[argmax_decision(probs)[0]])
    assert expected_distance(probs, d, np.array([argmax_col]))[0] == pytest.approx(1.6)
    # restricted to the labels, min-risk can only tie with argmax (first of the tied a1/a2)
    choice, risk = min_risk_decision(probs, lca_distance(tree))
    assert choice.tolist() == [0] and risk[0] == pytest.approx(1.6)


def test_min_risk_fathomnet_rule_answers_the_genus(ranked):
    probs = np.array([[0.05, 0.45, 0.45, 0.05]])  # Tunicata, S. alpha, S. beta, Sebastolobus
    # fathomnet2025: risk(S. alpha) = .05·6 + .45·2 + .05·3 = 1.35; risk(Sebastes) = .05·5 + .9·1 + .05·2 = 1.25;
    # risk(Sebastidae) = .05·4 + .9·2 + .05·1 = 2.05
    out = decide(probs, ranked, "min-risk", candidates=list(ranked.names), metric="fathomnet2025")
    assert out.names == ["Sebastes"]
    assert out.expected_distance[0] == pytest.approx(1.25)
    assert out.confidence[0] == pytest.approx(0.9)
    d = distance_matrix(ranked, "fathomnet2025", ranked.labels, ["Sebastes alpha", "Sebastes", "Sebastidae"])
    assert expected_distance(np.repeat(probs, 3, 0), d, np.arange(3)) == pytest.approx([1.35, 1.25, 2.05])
    assert decide(probs, ranked, "argmax").names == ["Sebastes alpha"]


def test_min_risk_never_worse_than_argmax_under_its_own_probabilities():
    tax = builtin_taxonomy("fathomnet2025")
    nodes = list(tax.names)
    d = distance_matrix(tax, "fathomnet2025", tax.labels, nodes)  # argmax's labels are among the candidates
    label_col = tax.indices(tax.labels)  # node index = column index, since the candidates are all nodes
    rng = np.random.default_rng(0)
    for draw in range(40):
        concentration = [0.02, 0.1, 0.5, 2.0][draw % 4]
        probs = rng.dirichlet(np.full(len(tax.labels), concentration), size=50)
        choice, risk = min_risk_decision(probs, d, chunk_size=17)
        argmax_risk = expected_distance(probs, d, label_col[probs.argmax(axis=1)])
        assert (risk <= argmax_risk + 1e-9).all()
        exact = probs @ d  # brute force in float64: the returned risk is the true minimum (float32 matmul)
        assert risk == pytest.approx(exact.min(axis=1), abs=1e-5)
        assert risk == pytest.approx(exact[np.arange(50), choice], abs=1e-12)


def test_dominated_candidates_are_pruned_without_changing_answers(tree):
    tax = tree.with_labels(["a1", "a2", "b1"])  # b2 holds no label: its column [4, 4, 2] is B's [3, 3, 1] + 1
    d = lca_distance(tax, tax.labels, tax.names)
    kept = undominated_candidates(d)
    assert names(tax, kept) == [n for n in tax.names if n != "b2"]
    probs = np.random.default_rng(3).dirichlet(np.full(3, 0.3), size=200)
    pruned, full = min_risk_decision(probs, d), min_risk_decision(probs, d, prune=False, dtype=np.float64)
    assert np.array_equal(pruned[0], full[0]) and np.allclose(pruned[1], full[1])
    # identical columns keep the first one (the argmin's tie-break)
    assert undominated_candidates(np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])).tolist() == [0, 2]


def test_min_risk_chunks_and_precision_agree(tree):
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(4), size=23)
    d = lca_distance(tree, tree.labels, tree.names)
    a = min_risk_decision(probs, d, chunk_size=4, dtype=np.float64)
    b = min_risk_decision(probs, d, chunk_size=None, dtype=np.float64)
    assert np.array_equal(a[0], b[0]) and np.allclose(a[1], b[1])


def test_min_risk_validates_its_input(tree):
    d = lca_distance(tree, tree.labels, tree.names)
    with pytest.raises(DataError, match="probs rows must sum to 1; row 0"):
        min_risk_decision(np.array([[0.5, 0.4, 0.0, 0.0]]), d)
    with pytest.raises(DataError, match="probs must hold probabilities"):
        min_risk_decision(np.array([[1.5, -0.5, 0.0, 0.0]]), d)
    with pytest.raises(DataError, match="distance_lc must have 4 rows, got 3"):
        min_risk_decision(np.full((1, 4), 0.25), d[:3])
    with pytest.raises(DataError, match="distance_lc must be >= 0"):
        min_risk_decision(np.full((1, 4), 0.25), -d)
    with pytest.raises(DataError, match="probs contains NaN"):
        min_risk_decision(np.array([[np.nan, 0.5, 0.5, 0.0]]), d)
    with pytest.raises(ConfigError, match="chunk_size must be a positive integer"):
        min_risk_decision(np.full((1, 4), 0.25), d, chunk_size=0)


# ------------------------------------------------------------------------------------------ aggregation
def test_node_probabilities_sum_up_the_tree(tree, ranked):
    for tax in (tree, ranked):
        probs = np.random.default_rng(2).dirichlet(np.ones(len(tax.labels)), size=5)
        expected = probs @ tax.ancestor_matrix(tax.labels, tax.names)
        assert np.allclose(node_probabilities(probs, tax, chunk_size=2), expected)
        assert np.array_equal(ancestor_operator(tax).toarray(), tax.ancestor_matrix(tax.labels, tax.names))
    out = node_probabilities(np.array([[0.4, 0.4, 0.1, 0.1]]), tree, nodes=["A", "B", "R"])
    assert out == pytest.approx(np.array([[0.8, 0.2, 1.0]]))


# ------------------------------------------------------------------------------------------ back-off
def test_node_thresholds(ranked, tree):
    thr = dict(zip(ranked.names, node_thresholds(ranked)))
    assert thr["Sebastes alpha"] == 0.55 and thr["Sebastolobus"] == 0.60 and thr["Animalia"] == 0.85
    assert thr["Tunicata"] == 0.80  # no rank: its nearest ranked ancestor's (phylum) threshold
    assert default_thresholds(tree) == {0: 0.65, 1: 0.6, 2: 0.55}
    by_depth = node_thresholds(tree, {"depth1": 0.7, 2: 0.5})
    assert [by_depth[tree.index(n)] for n in ("A", "a1")] == [0.7, 0.5] and np.isnan(by_depth[tree.index("R")])
    with pytest.raises(ConfigError, match="taxonomy has no ranks"):
        node_thresholds(tree, {"species": 0.5})
    with pytest.raises(ConfigError, match="did you mean 'species'"):
        node_thresholds(ranked, {"specis": 0.5})
    with pytest.raises(ConfigError, match=r"thresholds\['genus'\] must lie in \[0, 1\]"):
        node_thresholds(ranked, {"genus": 1.5})
    with pytest.raises(ConfigError, match="mix ranks and depths"):
        node_thresholds(ranked, {"genus": 0.5, 3: 0.5})
    with pytest.raises(ConfigError, match="depths run 0…2"):
        node_thresholds(tree, {5: 0.5})


@pytest.mark.parametrize("probs, expected", [
    ([0.1, 0.5, 0.3, 0.1], "Sebastes"),         # S. alpha 0.5 < 0.55; Sebastes 0.8 >= 0.60
    ([0.1, 0.3, 0.25, 0.35], "Sebastidae"),     # Sebastolobus 0.35 < 0.60; Sebastidae 0.9 >= 0.65
    ([0.3, 0.3, 0.1, 0.3], "Chordata"),         # Tunicata (first of the ties) 0.3 < 0.80; Chordata 1.0 >= 0.80
    ([0.0, 0.56, 0.44, 0.0], "Sebastes alpha"),  # the species itself reaches 0.55
    ([0.0, 0.2, 0.2, 0.6], "Sebastolobus"),     # a genus-level label at exactly its genus threshold 0.60
])
def test_backoff_default_thresholds(ranked, probs, expected):
    nodes, p = backoff_decision(np.array([probs]), ranked)
    assert names(ranked, nodes) == [expected]
    assert p[0] == pytest.approx(node_probabilities(np.array([probs]), ranked, [expected])[0, 0])


def test_backoff_with_candidates(ranked):
    probs = np.array([[0.1, 0.5, 0.3, 0.1]])
    labels = list(ranked.labels)
    # only labels may be answered: nothing on S. alpha's lineage above it is a candidate -> S. alpha itself
    assert names(ranked, backoff_decision(probs, ranked, candidates=labels)[0]) == ["Sebastes alpha"]
    # Sebastes is skipped (not a candidate); Sebastidae 0.9 >= 0.65
    assert names(ranked, backoff_decision(probs, ranked, candidates=labels + ["Sebastidae"])[0]) == ["Sebastidae"]
    # no candidate on the lineage at all -> the most probable candidate anywhere
    assert names(ranked, backoff_decision(probs, ranked, candidates=["Tunicata", "Sebastolobus"])[0]) == ["Tunicata"]
    # nothing reaches its threshold: the root-most candidate on the lineage
    out = backoff_decision(probs, ranked, thresholds=1.0, candidates=["Sebastes alpha", "Scorpaeniformes"])
    assert names(ranked, out[0]) == ["Scorpaeniformes"]


def test_backoff_unranked_tree_by_depth(tree):
    probs = np.array([[0.4, 0.4, 0.1, 0.1], [0.3, 0.2, 0.3, 0.2], [0.7, 0.1, 0.1, 0.1]])
    nodes, p = backoff_decision(probs, tree, chunk_size=2)  # defaults: depth 2 0.55, depth 1 0.60, root 0.65
    assert names(tree, nodes) == ["A", "R", "a1"]
    assert p.tolist() == pytest.approx([0.8, 1.0, 0.7])
    assert names(tree, backoff_decision(probs, tree, thresholds=0.5)[0]) == ["A", "A", "a1"]
    assert names(tree, backoff_decision(probs, tree, thresholds={1: 0.9})[0]) == ["R", "R", "R"]


# ------------------------------------------------------------------------------------------ selective
def test_selective(tree):
    probs = np.array([[0.4, 0.4, 0.1, 0.1], [0.45, 0.35, 0.1, 0.1]])
    assert names(tree, selective_decision(probs, tree, 0.5)[0]) == ["A", "A"]
    # several deepest nodes reach 0.3: the more probable one (a1 in both rows; a tie goes to the first)
    assert names(tree, selective_decision(probs, tree, 0.3)[0]) == ["a1", "a1"]
    nodes, p = selective_decision(probs, tree, 0.9)
    assert names(tree, nodes) == ["R", "R"] and p.tolist() == pytest.approx([1.0, 1.0])
    # candidates without the root: nothing reaches 0.9, so the most probable candidate
    assert names(tree, selective_decision(probs, tree, 0.9, candidates=list(tree.labels))[0]) == ["a1", "a1"]
    with pytest.raises(ConfigError, match="threshold must lie in"):
        selective_decision(probs, tree, 1.2)


def test_hierarchical_coverage(tree, ranked):
    assert hierarchical_coverage(tree, tree.indices(["a1", "A", "R"])).tolist() == pytest.approx([1.0, 0.5, 0.0])
    # Sebastidae holds 3 of the 4 labels; Sebastes 2; the genus-level label Sebastolobus 1
    cov = hierarchical_coverage(ranked, ranked.indices(["Sebastidae", "Sebastes", "Sebastolobus"]))
    assert cov.tolist() == pytest.approx([1 - np.log(3) / np.log(4), 0.5, 1.0])


def test_coverage_risk_curve(tree):
    probs = np.array([[0.45, 0.35, 0.1, 0.1], [0.1, 0.1, 0.7, 0.1]])
    targets = np.array([1, 2])  # a2, b1
    d = lca_distance(tree, tree.labels, tree.names)
    curve = coverage_risk_curve(probs, targets, tree, d, [0.3, 0.75, 0.9])
    # 0.3: a1 (wrong, distance 2), b1 (right); 0.75: A (0.8), B (0.8), distance 1 each; 0.9: R, R (distance 2)
    assert curve["threshold"].tolist() == [0.3, 0.75, 0.9]
    assert curve["coverage"].tolist() == pytest.approx([1.0, 0.5, 0.0])
    assert curve["label_share"].tolist() == pytest.approx([1.0, 0.0, 0.0])
    assert curve["mhd"].tolist() == pytest.approx([1.0, 1.0, 2.0])
    assert curve["error"].tolist() == pytest.approx([0.5, 0.0, 0.0])
    with pytest.raises(DataError, match="distance_lc must have 7 columns"):
        coverage_risk_curve(probs, targets, tree, d[:, :3], [0.5])
    with pytest.raises(DataError, match=r"targets must lie in \[0, 4\)"):
        coverage_risk_curve(probs, np.array([1, 9]), tree, d, [0.5])


# ------------------------------------------------------------------------------------------ one door
def test_decide(tree):
    probs = np.array([[0.4, 0.4, 0.1, 0.1], [0.05, 0.05, 0.1, 0.8]])
    out = decide(probs, tree, "argmax")
    assert out.names == ["a1", "b2"] and out.confidence.tolist() == pytest.approx([0.4, 0.8])
    assert out.expected_distance is None
    out = decide(probs, tree, "min-risk", candidates=list(tree.names))
    # b2: 0.05·4 + 0.05·4 + 0.1·2 = 0.6
    assert out.names == ["A", "b2"] and out.expected_distance.tolist() == pytest.approx([1.4, 0.6])
    assert decide(probs, tree, "argmax", candidates=["a2", "b1", "A"]).names == ["a2", "b1"]
    assert decide(probs, tree, "backoff").names == ["A", "b2"]
    assert decide(probs, tree, "selective", thresholds=0.85).names == ["R", "B"]
    with pytest.raises(ConfigError, match="did you mean 'min-risk'"):
        decide(probs, tree, "minrisk")
    with pytest.raises(ConfigError, match="one threshold"):
        decide(probs, tree, "selective", thresholds={"species": 0.5})
    with pytest.raises(ConfigError, match="at least one label"):
        decide(probs, tree, "argmax", candidates=["A"])
    with pytest.raises(UnknownLabelError, match="did you mean 'a1'"):
        decide(probs, tree, "min-risk", candidates=["a11"])
