"""Per-sample classification terms on logits: cross-entropy with label smoothing, focal, soft-label CE.

Every function takes a target that is either label indices (B,) or a probability matrix (B, C) from
MixUp/CutMix, and returns one value per sample, so the caller decides how samples are weighted.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from taxonomist.errors import ConfigError, DataError, ModelError


def check_logits(logits: torch.Tensor, n_classes: int | None = None, what: str = "logits") -> torch.Tensor:
    """`logits` as float32 (B, C), or a one-line `ModelError` naming `what` and the shape."""
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ModelError(f"{what} must be a (batch, classes) tensor, got {shape}")
    if n_classes is not None and logits.shape[1] != n_classes:
        raise ModelError(f"{what} has {logits.shape[1]} columns but there are {n_classes} classes")
    # float32 whatever the autocast dtype: log-probabilities of rare classes need the range
    return logits.float()


def check_target(target: torch.Tensor, batch: int, n_classes: int) -> torch.Tensor:
    """Validate a hard (B,) integer or soft (B, C) float target; returns it (soft targets as float32).

    The range of hard targets is checked on CPU only: on an accelerator the check would stall the stream
    on every step, and the gather that follows fails loudly there anyway.
    """
    if not isinstance(target, torch.Tensor):
        raise DataError(f"target must be a tensor, got {type(target).__name__}")
    if target.ndim == 1 and not target.is_floating_point():
        if target.shape[0] != batch:
            raise DataError(f"target has {target.shape[0]} labels for a batch of {batch}")
        if target.device.type == "cpu" and target.numel():
            lo, hi = int(target.min()), int(target.max())
            if lo < 0 or hi >= n_classes:
                bad = lo if lo < 0 else hi
                raise DataError(f"target label index {bad} is out of range for {n_classes} labels")
        return target.long()
    if target.ndim == 2 and target.is_floating_point():
        if tuple(target.shape) != (batch, n_classes):
            raise DataError(f"soft target has shape {tuple(target.shape)}, expected ({batch}, {n_classes})")
        return target.float()
    raise DataError(f"target must be label indices (B,) or probabilities (B, C); got {target.dtype} "
                    f"of shape {tuple(target.shape)}")


def is_hard(target: torch.Tensor) -> bool:
    """True for label indices (B,), False for a probability matrix (B, C)."""
    return target.ndim == 1


def target_distribution(target: torch.Tensor, n_classes: int, label_smoothing: float = 0.0) -> torch.Tensor:
    """The (B, C) target distribution: one-hot or soft, then (1 - ε)·t + ε/C as torch's cross_entropy does.

    >>> [round(v, 4) for v in target_distribution(torch.tensor([1]), 2, 0.2)[0].tolist()]
    [0.1, 0.9]
    """
    t = F.one_hot(target, n_classes).float() if is_hard(target) else target
    if label_smoothing:
        t = t * (1.0 - label_smoothing) + label_smoothing / n_classes
    return t


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-sample cross-entropy -Σ_j t_j log p_j against the (smoothed) target distribution.

    With hard targets, equals `F.cross_entropy(..., label_smoothing=ε, reduction="none")`.

    >>> logits = torch.tensor([[2.0, 0.0]])
    >>> round(float(cross_entropy(logits, torch.tensor([0]))), 4)
    0.1269
    """
    logits = check_logits(logits)
    target = check_target(target, logits.shape[0], logits.shape[1])
    _check_fraction(label_smoothing, "loss.label_smoothing")
    return cross_entropy_unchecked(logits, target, label_smoothing)


def cross_entropy_unchecked(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """`cross_entropy` without its input checks: `TaxonLoss` checks its inputs once, when it is built, and calls
    this at every step."""
    t = target_distribution(target, logits.shape[1], label_smoothing)
    return -(t * F.log_softmax(logits, dim=1)).sum(dim=1)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, alpha: float = 0.5,
               label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-sample multi-class focal loss: -α Σ_j t_j (1 - p_j)^γ log p_j.

    t is the (smoothed) target distribution; for a hard target without smoothing this is the focal loss
    of Lin et al. (2017), -α (1 - p_y)^γ log p_y, with α a scalar balance factor (no per-class α).
    γ = 0 gives α × cross-entropy; γ > 0 shrinks the loss of examples the model already gets right.

    >>> logits = torch.tensor([[2.0, 0.0]])
    >>> round(float(focal_loss(logits, torch.tensor([0]), gamma=0.0, alpha=0.5)), 4)
    0.0635
    """
    logits = check_logits(logits)
    target = check_target(target, logits.shape[0], logits.shape[1])
    _check_fraction(label_smoothing, "loss.label_smoothing")
    if not gamma >= 0:
        raise ConfigError(f"loss.focal_gamma must be >= 0, got {gamma!r}")
    if not alpha >= 0:
        raise ConfigError(f"loss.focal_alpha must be >= 0, got {alpha!r}")
    return focal_loss_unchecked(logits, target, gamma, alpha, label_smoothing)


def focal_loss_unchecked(logits: torch.Tensor, target: torch.Tensor, gamma: float, alpha: float,
                         label_smoothing: float) -> torch.Tensor:
    """`focal_loss` without its input checks: `TaxonLoss` checks its inputs once, when it is built, and calls
    this at every step."""
    t = target_distribution(target, logits.shape[1], label_smoothing)
    logp = F.log_softmax(logits, dim=1)
    if gamma == 0:
        return -alpha * (t * logp).sum(dim=1)
    # 1 - p from log p without cancellation; the floor keeps (1 - p)^γ differentiable for γ < 1 at p = 1
    one_minus_p = (-torch.expm1(logp)).clamp(min=1e-12)
    return -alpha * (t * one_minus_p.pow(gamma) * logp).sum(dim=1)


def soft_label_loss(logits: torch.Tensor, target: torch.Tensor, soft_labels: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy against distance-based soft labels: q = soft_labels[y] (or t @ soft_labels).

    `soft_labels` is the (C, C) row-stochastic matrix of `soft_label_targets` (tensor or numpy).

    >>> q = torch.tensor([[0.75, 0.25], [0.25, 0.75]])
    >>> round(float(soft_label_loss(torch.zeros(1, 2), torch.tensor([0]), q)), 4)
    0.6931
    """
    logits = check_logits(logits)
    target = check_target(target, logits.shape[0], logits.shape[1])
    soft_labels = torch.as_tensor(soft_labels, dtype=torch.float32, device=logits.device)
    if tuple(soft_labels.shape) != (logits.shape[1],) * 2:
        raise ConfigError(f"soft-label matrix has shape {tuple(soft_labels.shape)}, "
                          f"expected ({logits.shape[1]}, {logits.shape[1]})")
    return soft_label_loss_unchecked(logits, target, soft_labels)


def soft_label_loss_unchecked(logits: torch.Tensor, target: torch.Tensor, soft_labels: torch.Tensor) -> torch.Tensor:
    """`soft_label_loss` without its input checks: `TaxonLoss` checks its inputs once, when it is built, and calls
    this at every step."""
    q = rows_for(soft_labels, target)
    return -(q * F.log_softmax(logits, dim=1)).sum(dim=1)


def rows_for(table: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Row y of a per-label table for hard targets, or the target-weighted mix t @ table for soft ones.

    Works for a (C,) vector (per-class weights → (B,)) and a (C, K) matrix (→ (B, K)).
    """
    if is_hard(target):
        return table[target]
    return target @ table


def _check_fraction(value: float, key: str) -> None:
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{key} must be in [0, 1), got {value!r}")
