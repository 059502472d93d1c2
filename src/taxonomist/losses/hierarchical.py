"""Per-level terms for the multirank head: cross-entropy at each level of the taxonomy, and the
consistency between the label head and each level head.

A level (`Taxonomy.levels()`) maps every label to its ancestor-or-self among the level's nodes, or to -1
when the label's lineage has no node there (a genus-level label at the species level); such samples are
left out of that level's terms.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from taxonomist.errors import ConfigError, ModelError
from taxonomist.losses.classification import check_logits, check_target, is_hard
from taxonomist.taxonomy import Level

_TINY = 1e-12  # floor for logs and denominators; far below any probability a float32 softmax resolves


def level_matrix(level: Level) -> np.ndarray:
    """The (L, n_nodes) 0/1 matrix with M[l, k] = 1 when node k is label l's ancestor-or-self at `level`.

    `probs @ M` gives each node's probability; a label with no node at the level has an all-zero row.

    >>> from taxonomist.taxonomy import Taxonomy
    >>> tax = Taxonomy.from_parents({"R": None, "G1": "R", "G2": "R", "A": "G1", "B": "G1", "C": "G2"})
    >>> level_matrix(tax.levels()[0]).tolist()
    [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
    """
    mapping = np.asarray(level.label_to_node, dtype=np.int64)
    n = len(level.nodes)
    if mapping.ndim != 1 or (mapping.size and (mapping.min() < -1 or mapping.max() >= n)):
        raise ConfigError(f"level {level.name!r}: label_to_node must hold node positions in [-1, {n}), "
                          f"got {mapping.tolist()[:10]}")
    m = np.zeros((mapping.size, n), dtype=np.float64)
    has = np.flatnonzero(mapping >= 0)
    m[has, mapping[has]] = 1.0
    return m


def level_targets(target: torch.Tensor, label_to_node: torch.Tensor,
                  matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The target distribution over a level's nodes, and each sample's mass at that level.

    Hard targets map through `label_to_node` (mass 1, or 0 for -1); soft targets aggregate as t @ M and
    are renormalised over the level, their mass being the share of the target that has a node there (a
    MixUp of a species-level and a genus-level label has mass 0.5 at the species level).

    >>> from taxonomist.taxonomy import Taxonomy
    >>> tax = Taxonomy.from_parents({"R": None, "A": "R", "B": "A"}, labels=["A", "B"])
    >>> lv = tax.levels()[1]                       # depth 2: only B has a node there
    >>> m = torch.tensor(level_matrix(lv), dtype=torch.float32)
    >>> t, mass = level_targets(torch.tensor([0, 1]), torch.tensor(lv.label_to_node), m)
    >>> t.tolist(), mass.tolist()
    ([[0.0], [1.0]], [0.0, 1.0])
    """
    n = matrix.shape[1]
    if is_hard(target):
        node = label_to_node.to(target.device)[target]
        mass = (node >= 0).float()
        return F.one_hot(node.clamp(min=0), n).float() * mass[:, None], mass
    agg = target @ matrix
    mass = agg.sum(dim=1)
    return agg / mass.clamp(min=_TINY)[:, None], mass


def rank_loss(level_logits: torch.Tensor, target: torch.Tensor, level: Level, label_smoothing: float = 0.0,
              sample_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of a level head against the level targets, averaged over the samples with a node there.

    loss = Σ_i m_i w_i CE_i / Σ_i m_i, with m_i the sample's mass at the level (0 or 1 for hard targets,
    so -1 samples are ignored exactly as `F.cross_entropy(ignore_index=-1)` does) and w_i its class
    weight. Label smoothing spreads ε over the level's nodes. Returns 0 when no sample has a node there.

    >>> from taxonomist.taxonomy import Taxonomy
    >>> tax = Taxonomy.from_parents({"R": None, "G1": "R", "G2": "R", "A": "G1", "B": "G1", "C": "G2"})
    >>> round(float(rank_loss(torch.zeros(2, 2), torch.tensor([0, 2]), tax.levels()[0])), 4)
    0.6931
    """
    matrix = torch.as_tensor(level_matrix(level), dtype=torch.float32)
    level_logits = check_logits(level_logits, len(level.nodes), what=f"rank_logits[{level.name!r}]")
    target = check_target(target, level_logits.shape[0], matrix.shape[0])
    if not 0.0 <= label_smoothing < 1.0:
        raise ConfigError(f"loss.label_smoothing must be in [0, 1), got {label_smoothing!r}")
    dev = level_logits.device
    mapping = torch.as_tensor(np.asarray(level.label_to_node, dtype=np.int64), device=dev)
    return rank_loss_unchecked(level_logits, target.to(dev), mapping, matrix.to(dev), label_smoothing, sample_weight)


def rank_loss_unchecked(level_logits: torch.Tensor, target: torch.Tensor, label_to_node: torch.Tensor,
                        matrix: torch.Tensor, label_smoothing: float,
                        sample_weight: torch.Tensor | None) -> torch.Tensor:
    """`rank_loss` without its input checks: `TaxonLoss` checks its inputs once, when it is built, and calls
    this at every step."""
    t, mass = level_targets(target, label_to_node, matrix)
    n = level_logits.shape[1]
    if label_smoothing:
        t = t * (1.0 - label_smoothing) + label_smoothing / n
    per_sample = -(t * F.log_softmax(level_logits, dim=1)).sum(dim=1)
    coef = mass if sample_weight is None else mass * sample_weight
    return (coef * per_sample).sum() / mass.sum().clamp(min=_TINY)


def consistency_loss(label_logits: torch.Tensor, level_logits: torch.Tensor, level: Level) -> torch.Tensor:
    """KL(level head ‖ label head aggregated to the level), averaged over the batch.

    The label head's probabilities are summed per node (p @ M) and renormalised over the level's nodes
    (labels with no node at the level carry no opinion there); each sample's KL is weighted by that
    aggregated mass m_i (detached, so the label head is not rewarded for moving probability onto labels
    that escape the level): Σ_i m_i KL_i / Σ_i m_i. Zero exactly when the two heads agree; both heads get
    gradients, which pulls them towards one lineage.

    >>> from taxonomist.taxonomy import Taxonomy
    >>> tax = Taxonomy.from_parents({"R": None, "G1": "R", "G2": "R", "A": "G1", "B": "G1", "C": "G2"})
    >>> labels = torch.log(torch.tensor([[0.25, 0.25, 0.5]]))
    >>> abs(float(consistency_loss(labels, torch.zeros(1, 2), tax.levels()[0]))) < 1e-6
    True
    """
    matrix = torch.as_tensor(level_matrix(level), dtype=torch.float32)
    label_logits = check_logits(label_logits, matrix.shape[0], what="logits")
    level_logits = check_logits(level_logits, len(level.nodes), what=f"rank_logits[{level.name!r}]")
    if level_logits.shape[0] != label_logits.shape[0]:
        raise ModelError(f"rank_logits[{level.name!r}] has {level_logits.shape[0]} rows for a batch of "
                         f"{label_logits.shape[0]}")
    return consistency_loss_unchecked(label_logits.softmax(dim=1), level_logits, matrix.to(label_logits.device))


def consistency_loss_unchecked(label_probs: torch.Tensor, level_logits: torch.Tensor,
                               matrix: torch.Tensor) -> torch.Tensor:
    """`consistency_loss` without its input checks: `TaxonLoss` checks its inputs once, when it is built, and calls
    this at every step."""
    agg = label_probs @ matrix
    mass = agg.sum(dim=1)
    log_agg = agg.clamp(min=_TINY).log() - mass.clamp(min=_TINY).log()[:, None]
    log_level = F.log_softmax(level_logits, dim=1)
    kl = (log_level.exp() * (log_level - log_agg)).sum(dim=1)
    mass = mass.detach()
    return (mass * kl).sum() / mass.sum().clamp(min=_TINY)
