"""Per-sample terms: cross-entropy with label smoothing, focal, soft labels, expected taxonomic distance."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from taxonomist.errors import ConfigError, DataError, ModelError
from taxonomist.losses import (cross_entropy, expected_distance, focal_loss, soft_label_loss,
                               soft_label_targets)

torch.set_num_threads(1)

# labels A, B (siblings), C (another genus), G2 (C's genus, itself a label): lca distances
D = torch.tensor([[0.0, 2.0, 4.0, 3.0],
                  [2.0, 0.0, 4.0, 3.0],
                  [4.0, 4.0, 0.0, 1.0],
                  [3.0, 3.0, 1.0, 0.0]])


def test_cross_entropy_with_label_smoothing_matches_torch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4, generator=g)
    target = torch.tensor([0, 3, 1, 1, 2])
    for eps in (0.0, 0.1, 0.3):
        ours = cross_entropy(logits, target, label_smoothing=eps)
        ref = F.cross_entropy(logits, target, label_smoothing=eps, reduction="none")
        torch.testing.assert_close(ours, ref)
    # soft targets: torch also smooths probability targets
    soft = torch.softmax(torch.randn(5, 4, generator=g), dim=1)
    torch.testing.assert_close(cross_entropy(logits, soft, 0.1),
                               F.cross_entropy(logits, soft, label_smoothing=0.1, reduction="none"))


def test_focal_with_gamma_zero_is_alpha_times_cross_entropy():
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0], [0.0, 0.0, 3.0, -2.0]])
    target = torch.tensor([0, 1])
    torch.testing.assert_close(focal_loss(logits, target, gamma=0.0, alpha=0.5, label_smoothing=0.1),
                               0.5 * cross_entropy(logits, target, 0.1))


def test_focal_down_weights_easy_examples():
    # p = (0.9, 0.1): the first sample is easy (truth 0), the second hard (truth 1)
    logits = torch.log(torch.tensor([[0.9, 0.1], [0.9, 0.1]]))
    target = torch.tensor([0, 1])
    focal = focal_loss(logits, target, gamma=2.0, alpha=0.5)
    # -α (1 - p_y)^γ log p_y
    expected = [0.5 * 0.1 ** 2 * -math.log(0.9), 0.5 * 0.9 ** 2 * -math.log(0.1)]
    torch.testing.assert_close(focal, torch.tensor(expected))
    ratio = focal / cross_entropy(logits, target)
    assert ratio[0] == pytest.approx(0.005) and ratio[1] == pytest.approx(0.405)


def test_focal_gradients_stay_finite_at_certainty_and_fractional_gamma():
    logits = torch.tensor([[60.0, -60.0, 0.0, 0.0]], requires_grad=True)
    focal_loss(logits, torch.tensor([0]), gamma=0.5, alpha=0.5).sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_soft_label_loss_is_cross_entropy_against_distance_soft_labels():
    q = torch.tensor(soft_label_targets(D.numpy(), temperature=1.0), dtype=torch.float32)
    logits = torch.tensor([[1.0, 0.5, -1.0, 0.0]])
    logp = torch.log_softmax(logits, dim=1)[0]
    expected = -(q[0] * logp).sum()
    torch.testing.assert_close(soft_label_loss(logits, torch.tensor([0]), q)[0], expected)
    # the soft labels put the sibling B ahead of G2 and C
    assert q[0, 1] > q[0, 3] > q[0, 2]
    # numpy tables are accepted too; a MixUp target mixes the rows
    mix = torch.tensor([[0.5, 0.0, 0.5, 0.0]])
    torch.testing.assert_close(soft_label_loss(logits, mix, q.numpy())[0], -((0.5 * q[0] + 0.5 * q[2]) * logp).sum())


def test_expected_distance_hand_values():
    probs = torch.tensor([[0.5, 0.25, 0.25, 0.0], [0.0, 0.0, 0.5, 0.5]])
    # sample 0, truth A: 0.25·2 + 0.25·4 = 1.5; sample 1, truth G2: 0.5·1 + 0.5·0 = 0.5
    torch.testing.assert_close(expected_distance(probs, torch.tensor([0, 3]), D), torch.tensor([1.5, 0.5]))
    # soft target ½A + ½B: row mix (1, 1, 4, 3) → 0.5 + 0.25 + 1.0 = 1.75
    soft = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    torch.testing.assert_close(expected_distance(probs[:1], soft, D.numpy()), torch.tensor([1.75]))


def _train_free_logits(loss_fn, steps=60, lr=1.0):
    """SGD on a free logit vector where the truth A is blocked (its logit pinned far below)."""
    free = torch.zeros(1, 3, requires_grad=True)  # logits of B, C, G2
    opt = torch.optim.SGD([free], lr=lr)
    for _ in range(steps):
        logits = torch.cat([torch.full((1, 1), -30.0), free], dim=1)
        opt.zero_grad()
        loss_fn(logits).sum().backward()
        opt.step()
    with torch.no_grad():
        return torch.softmax(torch.cat([torch.full((1, 1), -30.0), free], dim=1), dim=1)[0]


def test_expected_distance_gradient_moves_probability_to_the_truths_relatives():
    target = torch.tensor([0])
    p = _train_free_logits(lambda z: expected_distance(torch.softmax(z, dim=1), target, D))
    # B (sibling, D=2) > G2 (D=3) > C (D=4), starting from a tie
    assert p[1] > p[3] > p[2]
    assert p[1] > 0.9
    # cross-entropy alone cannot tell relatives from strangers: the blocked truth leaves them tied
    p_ce = _train_free_logits(lambda z: cross_entropy(z, target))
    torch.testing.assert_close(p_ce[1], p_ce[2])
    torch.testing.assert_close(p_ce[1], p_ce[3])


def test_term_errors_are_one_line_taxonomist_errors():
    logits = torch.zeros(2, 4)
    with pytest.raises(DataError, match="index 7 is out of range for 4 labels"):
        cross_entropy(logits, torch.tensor([0, 7]))
    with pytest.raises(DataError, match=r"shape \(2, 3\), expected \(2, 4\)"):
        cross_entropy(logits, torch.zeros(2, 3))
    with pytest.raises(ModelError, match="batch, classes"):
        cross_entropy(torch.zeros(4), torch.tensor([0]))
    with pytest.raises(ConfigError, match="label_smoothing"):
        cross_entropy(logits, torch.tensor([0, 1]), label_smoothing=1.0)
    with pytest.raises(ConfigError, match="focal_gamma"):
        focal_loss(logits, torch.tensor([0, 1]), gamma=-1.0)
    with pytest.raises(ConfigError, match="3×3 but there are 4 labels"):
        expected_distance(torch.softmax(logits, 1), torch.tensor([0, 1]), np.zeros((3, 3)))
    with pytest.raises(ConfigError, match="not a finite distance"):
        expected_distance(torch.softmax(logits, 1), torch.tensor([0, 1]), -np.ones((4, 4)))
