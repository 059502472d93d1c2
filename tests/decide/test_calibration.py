"""Temperature scaling recovers a known over-confidence; ECE on hand-made bins."""
from __future__ import annotations

import numpy as np
import pytest

from taxonomist.decide import apply_temperature, expected_calibration_error, fit_temperature, softmax
from taxonomist.errors import ConfigError, DataError


def calibrated_sample(n: int, n_labels: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits z and targets drawn from softmax(z): calibrated by construction."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, (n, n_labels))
    y = (rng.random(n)[:, None] > np.cumsum(softmax(z), axis=1)).sum(axis=1)
    return z, np.minimum(y, n_labels - 1)


def top1_ece(probs: np.ndarray, y: np.ndarray) -> float:
    return expected_calibration_error(probs.max(axis=1), probs.argmax(axis=1) == y)


def test_fit_temperature_recovers_overconfidence_and_lowers_ece():
    z, y = calibrated_sample(20000, 10, seed=0)
    t = fit_temperature(3.0 * z, y)
    assert t == pytest.approx(3.0, abs=0.15)
    before = top1_ece(softmax(3.0 * z), y)
    after = top1_ece(apply_temperature(3.0 * z, t), y)
    assert after < before / 3 and after < 0.02
    # under-confident logits are sharpened (T < 1)
    assert fit_temperature(0.5 * z, y) == pytest.approx(0.5, abs=0.05)


def test_fit_temperature_stays_in_bounds_on_noise():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(500, 4))
    y = rng.integers(0, 4, 500)  # logits unrelated to the targets: the best T is "as flat as allowed"
    assert fit_temperature(z, y, bounds=(0.1, 10.0)) == pytest.approx(10.0, rel=1e-3)


def test_apply_temperature():
    expected = [np.e / (np.e + 1), 1 / (np.e + 1)]  # softmax([1, 0])
    assert apply_temperature(np.array([[2.0, 0.0]]), 2.0)[0].tolist() == pytest.approx(expected)
    p32 = apply_temperature(np.zeros((2, 3), dtype=np.float32), 1.5)
    assert p32.dtype == np.float32 and np.allclose(p32, 1 / 3)
    with pytest.raises(ConfigError, match="temperature must be a finite number > 0"):
        apply_temperature(np.zeros((1, 2)), 0.0)
    with pytest.raises(DataError, match="logits contains NaN"):
        apply_temperature(np.array([[np.nan, 0.0]]), 1.0)


def test_fit_temperature_validates():
    with pytest.raises(DataError, match=r"targets must lie in \[0, 2\)"):
        fit_temperature(np.zeros((2, 2)), np.array([0, 2]))
    with pytest.raises(DataError, match="targets must have 2 entries"):
        fit_temperature(np.zeros((2, 2)), np.array([0]))
    with pytest.raises(DataError, match="logits must be 2-D"):
        fit_temperature(np.zeros(3), np.array([0]))


def test_expected_calibration_error_by_hand():
    # bins of width 1/10: {0.95, 0.95} right 1 of 2 -> |0.5 - 0.95| · 2; {0.35} right -> |1 - 0.35| · 1
    ece = expected_calibration_error(np.array([0.95, 0.95, 0.35]), np.array([True, False, True]), bins=10)
    assert ece == pytest.approx((0.9 + 0.65) / 3)
    assert expected_calibration_error(np.array([1.0]), np.array([1]), bins=10) == pytest.approx(0.0)
    assert np.isnan(expected_calibration_error(np.array([]), np.array([])))
    with pytest.raises(DataError, match="confidence must lie in"):
        expected_calibration_error(np.array([1.2]), np.array([1]))
    with pytest.raises(DataError, match="correct must have 1 entries"):
        expected_calibration_error(np.array([0.5]), np.array([1, 0]))


# ---------------------------------------------------------------------------------------------- objectives
def _tree_and_sample(seed: int):
    from taxonomist.taxonomy import Taxonomy, distance_matrix
    parents = {"root": None, **{f"g{g}": "root" for g in range(3)},
               **{f"g{g}s{s}": f"g{g}" for g in range(3) for s in range(3)}}
    tax = Taxonomy.from_parents(parents)
    z, y = calibrated_sample(6000, len(tax.labels), seed)
    return tax, z, y, distance_matrix(tax, "lca", tax.labels, tax.names)


def test_node_nll_and_risk_objectives_undo_an_overconfidence():
    from taxonomist.decide import min_risk_decision
    from taxonomist.decide.calibration import RISK_GRID, fit_temperature_for
    tax, z, y, d = _tree_and_sample(1)
    assert fit_temperature_for(3.0 * z, y, "nll") == pytest.approx(fit_temperature(3.0 * z, y))
    t_node = fit_temperature_for(3.0 * z, y, "node-nll", taxonomy=tax)
    assert t_node == pytest.approx(3.0, abs=0.3)
    t_risk = fit_temperature_for(3.0 * z, y, "risk", taxonomy=tax, distance_lc=d)
    assert t_risk in RISK_GRID or t_risk == 1.0

    def risk(t):
        return d[y, min_risk_decision(apply_temperature(3.0 * z, t), d)[0]].mean()
    assert risk(t_risk) == min(risk(t) for t in (*RISK_GRID, 1.0))  # the grid's best, by construction
    assert risk(t_risk) < risk(1.0)                                   # and better than leaving the logits alone
    assert 1.5 < t_risk < 6.0                                         # near the true 3 (the risk is flat near it)


def test_objectives_keep_t_1_when_it_serves_as_well_and_check_their_inputs():
    from taxonomist.decide.calibration import fit_temperature_for
    tax, z, y, d = _tree_and_sample(2)
    assert fit_temperature_for(z, y, "node-nll", taxonomy=tax) == pytest.approx(1.0, abs=0.1)
    with pytest.raises(ConfigError, match="choose one of nll, node-nll, risk"):
        fit_temperature_for(z, y, "ece")
    with pytest.raises(ConfigError, match="needs the taxonomy"):
        fit_temperature_for(z, y, "risk")
    with pytest.raises(ConfigError, match="needs distance_lc"):
        fit_temperature_for(z, y, "risk", taxonomy=tax)
