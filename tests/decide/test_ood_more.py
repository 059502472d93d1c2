"""Scores over several passes or members: predictive entropy, mutual information, variation ratio, ensemble
disagreement — hand-made cases with known values."""
from __future__ import annotations

import numpy as np
import pytest

from taxonomist.decide import (ensemble_disagreement, mutual_information, ood_metrics, predictive_entropy,
                               stack_score, variation_ratio)
from taxonomist.errors import ConfigError, DataError

LN2 = np.log(2.0)


def test_entropy_and_mutual_information_by_hand():
    # row 0: both passes flat (ambiguous, agreeing); row 1: sure and opposite; row 2: sure and identical
    stack = np.array([[[0.5, 0.5], [1.0, 0.0], [0.0, 1.0]],
                      [[0.5, 0.5], [0.0, 1.0], [0.0, 1.0]]])
    np.testing.assert_allclose(predictive_entropy(stack), [LN2, LN2, 0.0], atol=1e-12)
    np.testing.assert_allclose(mutual_information(stack), [0.0, LN2, 0.0], atol=1e-12)
    # total = aleatoric + epistemic: H(mean) = mean H(p_k) + MI
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(5), size=(4, 30))
    mean_h = -(p * np.log(p)).sum(2).mean(0)
    np.testing.assert_allclose(predictive_entropy(p), mean_h + mutual_information(p), atol=1e-10)


def test_mutual_information_is_mean_kl_to_the_mean():
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(4), size=(3, 10))
    mean = p.mean(0)
    kl = (p * (np.log(p) - np.log(mean)[None])).sum(2).mean(0)
    np.testing.assert_allclose(mutual_information(list(p)), kl, atol=1e-10)


def test_variation_ratio_counts_votes():
    stack = np.array([[[0.9, 0.1, 0.0], [0.2, 0.8, 0.0]],
                      [[0.6, 0.4, 0.0], [0.1, 0.1, 0.8]],
                      [[0.1, 0.9, 0.0], [0.0, 0.3, 0.7]],
                      [[0.7, 0.3, 0.0], [0.3, 0.3, 0.4]]])
    np.testing.assert_allclose(variation_ratio(stack), [0.25, 0.25])
    assert stack_score(stack, "variation_ratio").tolist() == variation_ratio(stack).tolist()


def test_ensemble_disagreement_uses_temperatures_and_ranks_disagreement_first():
    a = np.array([[3.0, 0.0, 0.0], [3.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    b = np.array([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [1.0, 1.0, 1.0]])
    score = ensemble_disagreement([a, b])
    assert score[1] > 0.3 and score[0] == pytest.approx(0.0, abs=1e-12) and score[2] == pytest.approx(0.0, abs=1e-12)
    # a high temperature flattens both members: less disagreement on the same logits
    assert ensemble_disagreement([a, b], temperatures=[10.0, 10.0])[1] < score[1]
    # members that disagree on unknowns only: disagreement separates them perfectly
    known = ensemble_disagreement([a[:1].repeat(5, 0), b[:1].repeat(5, 0)])
    unknown = ensemble_disagreement([a[1:2].repeat(5, 0), b[1:2].repeat(5, 0)])
    assert ood_metrics(known, unknown)["auroc"] == 1.0


def test_errors_name_the_argument():
    p = np.full((2, 3), 1 / 3)
    with pytest.raises(DataError, match="at least 2"):
        predictive_entropy([p])
    with pytest.raises(DataError, match=r"member_probs\[1\] must have 3 columns"):
        mutual_information([p, np.full((2, 2), 0.5)])
    with pytest.raises(DataError, match=r"member_probs\[1\] rows must sum to 1"):
        mutual_information([p, np.full((2, 3), 0.5)])
    with pytest.raises(DataError, match="temperatures must have one entry per member"):
        ensemble_disagreement([p, p], temperatures=[1.0])
    with pytest.raises(ConfigError, match=r"temperatures\[1\]"):
        ensemble_disagreement([p, p], temperatures=[1.0, 0.0])
    with pytest.raises(ConfigError, match="did you mean 'mutual_information'"):
        stack_score([p, p], "mutual_informaton")
