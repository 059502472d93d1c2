"""The feature-space OOD scores added for real data: relative Mahalanobis, ViM, ReAct + energy, and the
least-squares recovery of the last layer they use — each checked against its formula written out directly,
on features where the unknowns are built to differ, and through a state-dict round trip."""
from __future__ import annotations

import numpy as np
import pytest

from taxonomist.decide import build_ood_scorer, load_ood_scorer, ood_metrics
from taxonomist.decide.ood_scorers import fit_last_layer
from taxonomist.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def known():
    """Three classes in 12 dimensions whose means differ in the first 3; a linear head maps them to logits."""
    rng = np.random.default_rng(0)
    means = np.zeros((3, 12))
    means[np.arange(3), np.arange(3)] = 4.0
    y = rng.integers(0, 3, size=600)
    x = means[y] + rng.normal(size=(600, 12)) * np.r_[np.ones(3), np.full(9, 0.3)]
    w = rng.normal(size=(12, 3))
    w[:3] = 3 * np.eye(3)
    b = rng.normal(size=3)
    return x, x @ w + b, y, w, b


def roundtrip(scorer):
    return load_ood_scorer(scorer.method, {k: np.asarray(v) for k, v in scorer.state_dict().items()})


def test_last_layer_is_recovered_exactly_from_linear_logits(known):
    x, z, _, w, b = known
    W, bias, r2 = fit_last_layer(x, z)
    np.testing.assert_allclose(W, w, atol=1e-8)
    np.testing.assert_allclose(bias, b, atol=1e-8)
    assert r2 == pytest.approx(1.0)
    _, _, r2_nonlinear = fit_last_layer(x, np.tanh(z))
    assert 0.5 < r2_nonlinear < 0.999           # the best linear stand-in, and it says how good it is
    with pytest.raises(DataError, match="at least 2 examples"):
        fit_last_layer(x[:1], z[:1])
    W, bias, r2 = fit_last_layer(x[:8], z[:8])    # fewer examples than dimensions: a layer that fits them
    np.testing.assert_allclose(x[:8] @ W + bias, z[:8], atol=1e-8)


def test_relative_mahalanobis_is_class_distance_minus_background_distance(known):
    x, z, y, _, _ = known
    scorer = build_ood_scorer("relative-mahalanobis", ridge=0.0).fit(x, z, y)
    queries = np.random.default_rng(1).normal(size=(5, 12)) * 3
    means = np.stack([x[y == c].mean(axis=0) for c in range(3)])
    centred = x - means[y]
    inv_within = np.linalg.inv(centred.T @ centred / len(x))
    inv_all = np.linalg.inv(np.cov(x, rowvar=False, bias=True))
    md = np.array([[(q - m) @ inv_within @ (q - m) for m in means] for q in queries]).min(axis=1)
    md0 = np.array([(q - x.mean(axis=0)) @ inv_all @ (q - x.mean(axis=0)) for q in queries])
    np.testing.assert_allclose(scorer.score(queries, None), md - md0, rtol=1e-6)
    np.testing.assert_allclose(roundtrip(scorer).score(queries, None), md - md0, rtol=1e-6)


def test_vim_follows_its_definition_and_flags_features_off_the_principal_subspace(known):
    x, z, y, w, b = known
    scorer = build_ood_scorer("vim", dims=3).fit(x, z, y)
    # the definition, written out: origin where the logits vanish, complement of the top-3 eigenvectors
    u = -np.linalg.pinv(w.T) @ b
    eigval, eigvec = np.linalg.eigh((x - u).T @ (x - u) / len(x))
    rest = eigvec[:, np.argsort(eigval)[::-1][3:]]
    alpha = z.max(axis=1).mean() / np.linalg.norm((x - u) @ rest, axis=1).mean()
    q = np.random.default_rng(2).normal(size=(4, 12))
    zq = q @ w + b
    expected = alpha * np.linalg.norm((q - u) @ rest, axis=1) - np.log(np.exp(zq).sum(axis=1))
    np.testing.assert_allclose(scorer.score(q, None), expected, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(roundtrip(scorer).score(q, None), expected, rtol=1e-6, atol=1e-9)
    # unknowns: class-like logits, but energy in the 9 dimensions the known classes barely use
    rng = np.random.default_rng(3)
    inside = x[:200]
    outside = x[:200] + np.c_[np.zeros((200, 3)), rng.normal(size=(200, 9)) * 3]
    assert ood_metrics(scorer.score(inside, None), scorer.score(outside, None))["auroc"] > 0.95
    with pytest.raises(ConfigError, match="dims"):
        build_ood_scorer("vim", dims=12).fit(x, z, y)


def test_react_clips_at_the_training_percentile_and_scores_energy(known):
    x, z, y, w, b = known
    scorer = build_ood_scorer("react-energy", percentile=80).fit(x, z, y)
    assert scorer.clip == pytest.approx(np.percentile(x, 80))
    q = np.r_[x[:3], [np.full(12, 50.0)]]        # a huge activation everywhere: clipped back
    clipped = np.minimum(q, scorer.clip) @ w + b
    expected = -np.log(np.exp(clipped).sum(axis=1))
    np.testing.assert_allclose(scorer.score(q, None), expected, rtol=1e-6)
    np.testing.assert_allclose(roundtrip(scorer).score(q, None), expected, rtol=1e-6)
    with pytest.raises(ConfigError, match=r"percentile must lie in \(0, 100\)"):
        build_ood_scorer("react-energy", percentile=100)


@pytest.mark.parametrize("method", ["vim", "react-energy", "relative-mahalanobis"])
def test_unfitted_and_broken_states_are_refused(method, known):
    x, z, y, _, _ = known
    with pytest.raises(DataError, match="not fitted"):
        build_ood_scorer(method).score(x, z)
    state = build_ood_scorer(method).fit(x, z, y).state_dict()
    key = "background" if method == "relative-mahalanobis" else "weight"
    with pytest.raises(DataError, match=f"no '{key}' entry"):
        load_ood_scorer(method, {k: v for k, v in state.items() if k != key})
