"""OOD scores on synthetic Gaussian features, metrics by hand, state round trips and the fallback."""
from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from taxonomist.decide import (OOD_METHODS, build_ood_scorer, load_ood_scorer, ood_fallback, ood_metrics,
                               threshold_for_tpr, threshold_metrics)
from taxonomist.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def gaussian():
    """Five known classes in 16-D; unknowns sit at a class mean μ_j plus a far offset orthogonal to every
    mean, so a linear head gives them the logits of class j (MSP is fooled) while they lie far from μ_j."""
    rng = np.random.default_rng(0)
    dim, k = 16, 5
    means = rng.normal(size=(k, dim))
    means *= 6 / np.linalg.norm(means, axis=1, keepdims=True)
    basis, _ = np.linalg.qr(means.T)  # (dim, k): the span of the means
    offsets = rng.normal(size=(3, dim))
    offsets -= offsets @ basis @ basis.T
    offsets *= 8 / np.linalg.norm(offsets, axis=1, keepdims=True)
    y_train = np.repeat(np.arange(k), 100)
    x_train = means[y_train] + rng.normal(size=(len(y_train), dim))
    x_known = means[np.repeat(np.arange(k), 40)] + rng.normal(size=(200, dim))
    x_unknown = means[rng.integers(0, k, 200)] + offsets[rng.integers(0, 3, 200)] + rng.normal(size=(200, dim))

    def head(x):  # the Gaussian (LDA) classifier of the known classes
        return x @ means.T - 0.5 * (means ** 2).sum(axis=1)

    return x_train, head(x_train), y_train, (x_known, head(x_known)), (x_unknown, head(x_unknown))


def test_feature_scores_separate_what_msp_misses(gaussian):
    x_train, z_train, y_train, known, unknown = gaussian
    auroc = {}
    for method in OOD_METHODS:
        scorer = build_ood_scorer(method).fit(x_train, z_train, y_train)
        auroc[method] = ood_metrics(scorer.score(*known), scorer.score(*unknown))["auroc"]
    assert auroc["mahalanobis"] > 0.99 and auroc["knn"] > 0.97
    assert auroc["msp"] < 0.8 and auroc["msp"] < auroc["mahalanobis"] - 0.2


@pytest.mark.parametrize("method", OOD_METHODS)
def test_state_dict_round_trip_through_safetensors(gaussian, method, tmp_path):
    x_train, z_train, y_train, known, _ = gaussian
    scorer = build_ood_scorer(method).fit(x_train, z_train, y_train)
    state = scorer.state_dict()
    assert all(isinstance(v, np.ndarray) for v in state.values())
    path = tmp_path / "ood.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(path))
    restored = load_ood_scorer(method, load_file(str(path)))
    assert type(restored) is type(scorer)
    assert np.array_equal(restored.score(*known), scorer.score(*known))


def test_logit_scores_by_hand():
    z = np.array([[2.0, 0.0], [0.0, 0.0]])
    assert build_ood_scorer("msp").score(None, z).tolist() == pytest.approx([-np.e ** 2 / (np.e ** 2 + 1), -0.5])
    assert build_ood_scorer("max-logit").score(None, z).tolist() == [-2.0, -0.0]
    assert build_ood_scorer("energy").score(None, z).tolist() == pytest.approx([-np.log(np.e ** 2 + 1), -np.log(2)])


def test_mahalanobis_and_knn_by_hand():
    # two classes at x = ±1 on a line, pooled variance 1 (with a negligible ridge): the score is the squared
    # distance to the nearer mean; the default ridge 1 adds the mean eigenvalue (1) to the variance: half of it
    x = np.array([[-2.0], [0.0], [0.0], [2.0]])
    scorer = build_ood_scorer("mahalanobis", ridge=1e-6).fit(x, None, np.array([0, 0, 1, 1]))
    assert scorer.score(np.array([[3.0], [-1.0]]), None).tolist() == pytest.approx([4.0, 0.0], rel=1e-5)
    shrunk = build_ood_scorer("mahalanobis").fit(x, None, np.array([0, 0, 1, 1]))
    assert shrunk.score(np.array([[3.0], [-1.0]]), None).tolist() == pytest.approx([2.0, 0.0], rel=1e-9)
    bank = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    knn = build_ood_scorer("knn", k=2).fit(bank, None, np.zeros(3, dtype=int))
    # query along x: similarities 1, 0.707, 0 -> 2nd largest cos 45° -> distance sqrt(2 - 2·cos 45°)
    assert knn.score(np.array([[5.0, 0.0]]), None)[0] == pytest.approx(np.sqrt(2 - np.sqrt(2)), abs=1e-6)


def test_scorers_validate():
    with pytest.raises(ConfigError, match="did you mean 'mahalanobis'"):
        build_ood_scorer("mahalanobos")
    with pytest.raises(ConfigError, match="bad options for the knn"):
        build_ood_scorer("knn", kk=3)
    with pytest.raises(DataError, match="needs logits"):
        build_ood_scorer("energy").score(np.zeros((1, 2)), None)
    with pytest.raises(DataError, match="not fitted"):
        build_ood_scorer("knn").score(np.zeros((1, 2)), None)
    with pytest.raises(DataError, match="at least 10 training features"):
        build_ood_scorer("knn").fit(np.ones((3, 2)), None, np.zeros(3, dtype=int))
    scorer = build_ood_scorer("mahalanobis").fit(np.eye(3), None, np.arange(3))
    with pytest.raises(DataError, match="features must have 3 columns"):
        scorer.score(np.zeros((1, 2)), None)
    with pytest.raises(DataError, match="no 'whitener' entry"):
        load_ood_scorer("mahalanobis", {"ridge": np.array(1e-6)})


def test_metrics_by_hand():
    known, unknown = np.array([0.1, 0.2, 0.3, 0.4]), np.array([0.35, 0.5, 0.6])
    m = ood_metrics(known, unknown)
    assert m["auroc"] == pytest.approx(11 / 12)   # 0.35 beats 3 knowns, 0.5 and 0.6 beat all 4
    assert m["fpr95"] == pytest.approx(0.25)      # 95 % TPR of 3 needs all 3: t = 0.35 flags 0.4
    assert ood_metrics(np.array([1.0, 1.0]), np.array([1.0]))["auroc"] == 0.5  # ties count half
    assert threshold_for_tpr(np.arange(1.0, 21.0), 0.95) == 2.0
    assert threshold_for_tpr(np.arange(1.0, 21.0), 1.0) == 1.0
    t = threshold_metrics(known, unknown, 0.35)
    assert t == pytest.approx({"threshold": 0.35, "precision": 0.75, "recall": 1.0, "f1": 6 / 7,
                               "known_flagged": 0.25, "unknown_missed": 0.0})
    nothing = threshold_metrics(known, unknown, 9.0)
    assert nothing["precision"] == 0.0 and nothing["f1"] == 0.0 and nothing["unknown_missed"] == 1.0
    with pytest.raises(DataError, match="scores_unknown is empty"):
        ood_metrics(known, np.array([]))
    with pytest.raises(ConfigError, match="tpr must lie in"):
        threshold_for_tpr(unknown, 1.5)


def test_fallback(ranked):
    nodes = ranked.indices(["Sebastes alpha", "Tunicata", "Sebastolobus"])
    flagged = np.array([True, True, False])

    def run(*args, **kw):
        return [ranked.names[i] for i in ood_fallback(nodes, flagged, ranked, *args, **kw)]

    # order: S. alpha -> its order; Tunicata (no rank) -> its deepest ranked ancestor at or above order
    assert run("order") == ["Scorpaeniformes", "Chordata", "Sebastolobus"]
    assert run(2) == ["Actinopterygii", "Tunicata", "Sebastolobus"]
    assert run("depth1") == ["Chordata", "Chordata", "Sebastolobus"]
    probs = np.array([[0.1, 0.5, 0.3, 0.1], [0.5, 0.2, 0.2, 0.1], [0.0, 0.0, 0.0, 1.0]])
    assert run(0.75, probs=probs) == ["Sebastes", "Chordata", "Sebastolobus"]  # Sebastes 0.8; Tunicata 0.5
    # candidates: the family is no candidate, so the order fallback climbs to the next candidate, the class
    assert run("family", candidates=["Sebastes alpha", "Tunicata", "Sebastolobus", "Actinopterygii"]) == \
        ["Actinopterygii", "Tunicata", "Sebastolobus"]
    with pytest.raises(ConfigError, match="needs probs"):
        run(0.5)
    with pytest.raises(ConfigError, match="did you mean 'order'"):
        run("ordr")
    with pytest.raises(DataError, match="flagged must be a boolean array"):
        ood_fallback(nodes, np.array([1, 0, 0]), ranked)
