"""Losses: cross-entropy with label smoothing, focal, distance-based soft labels, expected taxonomic
distance, per-rank and consistency terms; `build_loss(cfg.loss, taxonomy, distance, counts)` is the door.

The numpy helpers (`class_weights`, `soft_label_targets`) load without torch; the rest imports it on
first use, so the CLI can list its commands without paying for torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from taxonomist.losses.weights import CLASS_WEIGHT_MODES, check_distance, class_weights, soft_label_targets

_LAZY = {
    "LOSS_NAMES": "taxon_loss", "STREAM_WEIGHT": "taxon_loss", "TaxonLoss": "taxon_loss", "build_loss": "taxon_loss",
    "cross_entropy": "classification", "focal_loss": "classification", "soft_label_loss": "classification",
    "target_distribution": "classification", "expected_distance": "distance",
    "level_matrix": "hierarchical", "level_targets": "hierarchical", "rank_loss": "hierarchical",
    "consistency_loss": "hierarchical",
}

if TYPE_CHECKING:
    from taxonomist.losses.classification import cross_entropy, focal_loss, soft_label_loss, target_distribution
    from taxonomist.losses.distance import expected_distance
    from taxonomist.losses.hierarchical import consistency_loss, level_matrix, level_targets, rank_loss
    from taxonomist.losses.taxon_loss import LOSS_NAMES, STREAM_WEIGHT, TaxonLoss, build_loss


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CLASS_WEIGHT_MODES", "check_distance", "class_weights", "soft_label_targets", *_LAZY]
