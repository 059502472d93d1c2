"""Expected taxonomic distance: the mistake severity a softmax puts on each sample, Σ_j p_j D(y, j).

Minimising it moves probability towards the truth's close relatives rather than towards any other label,
which is what the FathomNet score (mean hierarchical distance) rewards.
"""
from __future__ import annotations

import torch

from taxonomist.errors import ConfigError, ModelError
from taxonomist.losses.classification import check_target, rows_for
from taxonomist.losses.weights import check_distance


def expected_distance(probs: torch.Tensor, target: torch.Tensor, distance) -> torch.Tensor:
    """Per-sample expected distance Σ_j p_ij D(y_i, j); for soft targets t, Σ_j p_ij (t_i @ D)_j.

    `probs` (B, L) are predicted probabilities (a softmax), `target` label indices (B,) or soft targets
    (B, L), `distance` the (L, L) matrix with rows = truth and columns = prediction, used as given (the
    `TaxonLoss` term divides it by its maximum first). Differentiable in `probs`.

    >>> d = torch.tensor([[0.0, 2.0, 4.0], [2.0, 0.0, 4.0], [4.0, 4.0, 0.0]])
    >>> expected_distance(torch.tensor([[0.5, 0.25, 0.25]]), torch.tensor([0]), d).tolist()
    [1.5]
    """
    if not isinstance(probs, torch.Tensor) or probs.ndim != 2:
        raise ModelError(f"probs must be a (batch, labels) tensor, got "
                         f"{tuple(probs.shape) if isinstance(probs, torch.Tensor) else type(probs).__name__}")
    n = probs.shape[1]
    if not isinstance(distance, torch.Tensor):  # a tensor may sit on an accelerator: check its shape only
        distance = check_distance(distance, n)
    d = torch.as_tensor(distance, dtype=torch.float32, device=probs.device)
    if tuple(d.shape) != (n, n):
        raise ConfigError(f"distance matrix has shape {tuple(d.shape)}, expected ({n}, {n}) for {n} labels")
    target = check_target(target, probs.shape[0], n)
    return expected_distance_unchecked(probs.float(), target, d)


def expected_distance_unchecked(probs: torch.Tensor, target: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
    """`expected_distance` without its input checks: `TaxonLoss` checks its inputs once, when it is built, and calls
    this at every step."""
    return (rows_for(distance, target) * probs).sum(dim=1)
