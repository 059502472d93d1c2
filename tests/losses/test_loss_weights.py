"""Class weights and distance-based soft-label targets (numpy, no torch)."""
import numpy as np
import pytest

from taxonomist.errors import ConfigError, DataError
from taxonomist.losses import class_weights, soft_label_targets


def test_inverse_weights_are_one_over_count_with_mean_one_over_present_classes():
    w = class_weights([1, 3, 0, 4], "inverse")
    # 1/n = 1, 1/3, 1/4 → mean 0.527778; the absent class keeps the neutral weight 1
    np.testing.assert_allclose(w, [1.894737, 0.631579, 1.0, 0.473684], atol=1e-6)
    assert w[[0, 1, 3]].mean() == pytest.approx(1.0)


def test_effective_number_weights_match_cui_et_al():
    w = class_weights(np.array([1, 3, 0, 4]), "effective", beta=0.9)
    # (1 - β) / (1 - β^n): 1, 0.1/0.271, 0.1/0.3439 → normalised to mean 1
    np.testing.assert_allclose(w, [1.807462, 0.666960, 1.0, 0.525578], atol=1e-6)
    # β = 0 treats every class alike; β → 1 approaches inverse frequency
    np.testing.assert_allclose(class_weights([1, 3, 4], "effective", beta=0.0), [1, 1, 1])
    np.testing.assert_allclose(class_weights([1, 3, 4], "effective", beta=0.999999),
                               class_weights([1, 3, 4], "inverse"), rtol=1e-5)


def test_none_weights_are_ones():
    np.testing.assert_array_equal(class_weights([5, 0, 2], "none"), [1.0, 1.0, 1.0])


def test_class_weight_errors_name_the_problem():
    with pytest.raises(ConfigError, match="none, inverse, effective"):
        class_weights([1, 2], "balanced")
    with pytest.raises(DataError, match="label index 1"):
        class_weights([1, -2], "inverse")
    with pytest.raises(DataError, match="all zero"):
        class_weights([0, 0], "inverse")
    with pytest.raises(ConfigError, match="effective_beta"):
        class_weights([1, 2], "effective", beta=1.0)


def test_soft_label_rows_sum_to_one_and_follow_distance():
    d = np.array([[0, 2, 4, 3], [2, 0, 4, 3], [4, 4, 0, 1], [3, 3, 1, 0]], dtype=float)
    q = soft_label_targets(d, temperature=1.0)
    np.testing.assert_allclose(q.sum(axis=1), 1.0)
    np.testing.assert_allclose(q[0], [0.830953, 0.112457, 0.015219, 0.041371], atol=1e-6)
    for row_d, row_q in zip(d, q):
        # closer labels get strictly more mass; equal distances get equal mass
        order = np.argsort(row_d, kind="stable")
        assert np.all(np.diff(row_q[order]) <= 1e-12)
        assert np.all((np.diff(row_d[order]) > 0) == (np.diff(row_q[order]) < 0))
    # a lower temperature concentrates the mass on the truth
    assert np.all(np.diag(soft_label_targets(d, 0.25)) > np.diag(q))
    np.testing.assert_allclose(soft_label_targets(d * 100, 0.01), np.eye(4), atol=1e-12)


def test_soft_label_errors():
    with pytest.raises(ConfigError, match="square"):
        soft_label_targets(np.zeros((2, 3)))
    with pytest.raises(ConfigError, match=r"entry \[0, 1\]"):
        soft_label_targets([[0, -1], [1, 0]])
    with pytest.raises(ConfigError, match="soft_label_temperature"):
        soft_label_targets([[0, 1], [1, 0]], temperature=0)
