"""Ensembles and TTA views: means by hand, and weights fitted to minimise out-of-fold MHD."""
from __future__ import annotations

import numpy as np
import pytest

from taxonomist.decide import aggregate_views, combine_probs, fit_ensemble_weights, softmax
from taxonomist.errors import ConfigError, DataError
from taxonomist.taxonomy import lca_distance


def test_combine_by_hand():
    p1, p2 = np.array([[0.8, 0.2]]), np.array([[0.2, 0.8]])
    assert combine_probs([p1, p2])[0].tolist() == pytest.approx([0.5, 0.5])
    assert combine_probs([p1, p2], weights=[3, 1])[0].tolist() == pytest.approx([0.65, 0.35])
    # weighted geometric: 0.8^0.75·0.2^0.25 : 0.2^0.75·0.8^0.25, renormalised
    a, b = 0.8 ** 0.75 * 0.2 ** 0.25, 0.2 ** 0.75 * 0.8 ** 0.25
    geometric = combine_probs([p1, p2], weights=[3, 1], mode="geometric")
    assert geometric[0].tolist() == pytest.approx([a / (a + b), b / (a + b)])


def test_geometric_of_identical_members_is_the_member():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(6), size=10)
    assert np.allclose(combine_probs([p, p, p], mode="geometric"), p, atol=1e-12)
    assert np.allclose(combine_probs([p, p], weights=[0.3, 0.7], mode="geometric"), p, atol=1e-12)
    z = rng.normal(size=(10, 6))
    assert np.allclose(combine_probs([z, z], mode="geometric"), softmax(z), atol=1e-12)  # logits detected


def test_logits_and_probs_mix():
    z = np.array([[2.0, 0.0]])
    assert np.allclose(combine_probs([z], kind="logits"), softmax(z))
    # geometric mean of logit members = softmax of the weighted mean logits
    z2 = np.array([[0.0, 4.0]])
    assert np.allclose(combine_probs([z, z2], mode="geometric"), softmax((z + z2) / 2))


def test_combine_validates():
    with pytest.raises(DataError, match=r"members\[1\] has shape \(1, 3\)"):
        combine_probs([np.full((1, 2), 0.5), np.full((1, 3), 1 / 3)])
    with pytest.raises(ConfigError, match="did you mean 'geometric'"):
        combine_probs([np.full((1, 2), 0.5)], mode="geometrik")
    with pytest.raises(ConfigError, match="weights must be >= 0"):
        combine_probs([np.full((1, 2), 0.5)] * 2, weights=[1, -1])
    with pytest.raises(DataError, match="weights must have 2 entries"):
        combine_probs([np.full((1, 2), 0.5)] * 2, weights=[1])
    with pytest.raises(DataError, match=r"members\[0\] is not a probability matrix"):
        combine_probs([np.array([[2.0, 0.0]])], kind="probs")
    with pytest.raises(DataError, match="non-empty list"):
        combine_probs([])


def test_weights_favour_the_better_member(tree):
    rng = np.random.default_rng(0)
    n = 300
    y = rng.integers(0, 4, n)
    good = np.full((n, 4), 0.1)
    good[np.arange(n), y] = 0.7                       # right every time, modestly confident
    wrong = (y + 1 + rng.integers(0, 3, n)) % 4        # a different label on every row
    bad = np.full((n, 4), 0.05)
    bad[np.arange(n), wrong] = 0.85                    # confidently wrong
    d = lca_distance(tree)
    for decision in ("argmax", "min-risk"):
        w = fit_ensemble_weights([bad, good], y, d, decision=decision)
        assert w.sum() == pytest.approx(1.0) and w[1] > w[0]
        assert (combine_probs([bad, good], w).argmax(axis=1) == y).all()
    # four members: coordinate descent, deterministic, the good member keeps the largest weight
    w4 = fit_ensemble_weights([bad, good, bad, good[:, [1, 0, 3, 2]]], y, d)
    assert w4.argmax() == 1 and np.array_equal(w4, fit_ensemble_weights([bad, good, bad, good[:, [1, 0, 3, 2]]], y, d))
    assert fit_ensemble_weights([good], y, d).tolist() == [1.0]


def test_fit_weights_validates(tree):
    p = np.full((2, 4), 0.25)
    with pytest.raises(DataError, match=r"distance must be \(L, L\)"):
        fit_ensemble_weights([p, p], np.array([0, 1]), lca_distance(tree, tree.labels, tree.names))
    with pytest.raises(ConfigError, match="step must divide 1"):
        fit_ensemble_weights([p, p], np.array([0, 1]), lca_distance(tree), step=0.3)
    with pytest.raises(ConfigError, match="did you mean 'min-risk'"):
        fit_ensemble_weights([p, p], np.array([0, 1]), lca_distance(tree), decision="min_risk")


def test_aggregate_views():
    views = np.log(np.array([[[0.8, 0.2]], [[0.5, 0.5]]]))
    assert aggregate_views(views)[0].tolist() == pytest.approx([0.65, 0.35])
    g = np.sqrt(np.array([0.8 * 0.5, 0.2 * 0.5]))
    assert np.allclose(aggregate_views(views, "mean_logits"), g / g.sum())
    with pytest.raises(DataError, match=r"view_logits must be a numeric \(views, N, L\) array"):
        aggregate_views(np.zeros((2, 3)))
    with pytest.raises(ConfigError, match="mode must be one of mean_probs, mean_logits"):
        aggregate_views(views, "median")
