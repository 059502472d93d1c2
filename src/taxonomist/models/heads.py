"""Classification heads on pooled features: flat over the labels, one per rank, or two fused streams.

Every head returns `logits` over `taxonomy.labels`, the scores decisions use; ancestor probabilities
come from `softmax(logits) @ taxonomy.ancestor_matrix()` (a node's probability = sum of its labels').
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from taxonomist.errors import ModelError
from taxonomist.taxonomy import Taxonomy


class FlatHead(nn.Module):
    """Dropout + one Linear over the labels: `{"logits": (B, L)}`.

    >>> head = FlatHead(8, 3)
    >>> head(torch.zeros(2, 8))["logits"].shape
    torch.Size([2, 3])
    """

    def __init__(self, num_features: int, num_labels: int, drop_rate: float = 0.0):
        super().__init__()
        _check_dims(num_features, num_labels, drop_rate)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(num_features, num_labels)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.fc(self.drop(features))}


class MultiRankHead(nn.Module):
    """The flat label head plus one Linear per taxonomy level (`taxonomy.levels()`).

    `logits` (the label head) stays the prediction, so species top-1 is that of a flat model; the
    `rank_logits` {level name: (B, nodes at that level)} give the loss its per-rank cross-entropy and
    consistency terms (a label's target at a level is `level.label_to_node[label]`, -1 = none).

    >>> tax = Taxonomy.from_parents({"A": None, "a1": "A", "a2": "A"},
    ...                             ranks={"A": "genus", "a1": "species", "a2": "species"})
    >>> out = MultiRankHead(8, tax)(torch.zeros(2, 8))
    >>> {k: tuple(v.shape) for k, v in out["rank_logits"].items()}
    {'genus': (2, 1), 'species': (2, 2)}
    """

    def __init__(self, num_features: int, taxonomy: Taxonomy, drop_rate: float = 0.0):
        super().__init__()
        _check_dims(num_features, len(taxonomy.labels), drop_rate)
        levels = taxonomy.levels()
        if not levels:
            raise ModelError("model.head=multirank needs a taxonomy with at least one level below the root")
        self.level_names = tuple(level.name for level in levels)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(num_features, len(taxonomy.labels))
        self.rank_fc = nn.ModuleDict({level.name: nn.Linear(num_features, len(level.nodes)) for level in levels})

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor | dict[str, torch.Tensor]]:
        x = self.drop(features)
        return {"logits": self.fc(x), "rank_logits": {name: self.rank_fc[name](x) for name in self.level_names}}


def entropy_gated_fusion(stream_logits: Sequence[torch.Tensor], tau: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Fuse per-stream logits, weighting each sample's streams by their confidence.

    w_s = softmax_s(-H_s / tau), with H_s the entropy of stream s's softmax; fused log-probabilities are
    log_softmax(sum_s w_s · log p_s). The weights are computed without gradient: each stream has its own
    loss, and a gate that could be trained would reward a stream for merely looking confident.

    Returns (fused logits (B, L), weights (B, S)); weights sum to 1 over streams.

    >>> confident, unsure = torch.tensor([[4.0, 0.0, 0.0]]), torch.zeros(1, 3)
    >>> fused, w = entropy_gated_fusion([confident, unsure])
    >>> bool(w[0, 0] > w[0, 1]), round(float(w.sum()), 6)
    (True, 1.0)
    """
    if len(stream_logits) < 1:
        raise ModelError("entropy_gated_fusion needs at least one stream")
    if tau <= 0:
        raise ModelError(f"model.fusion_temperature must be > 0, got {tau}")
    log_p = torch.stack([torch.log_softmax(s.float(), dim=-1) for s in stream_logits], dim=1)  # (B, S, L)
    with torch.no_grad():
        entropy = -(log_p.exp() * log_p).sum(-1)                                                # (B, S)
        weights = torch.softmax(-entropy / tau, dim=1)
    fused = torch.log_softmax((weights.unsqueeze(-1) * log_p).sum(1), dim=-1)
    return fused.to(stream_logits[0].dtype), weights


class TwoStreamHead(nn.Module):
    """One label head per stream (ROI, context) and their entropy-gated fusion.

    Returns `logits` (fused), `stream_logits` {"roi", "context"} for the loss to supervise both, and
    `stream_weights` (B, 2) in that order.

    >>> head = TwoStreamHead(8, 3)
    >>> out = head(torch.zeros(2, 8), torch.zeros(2, 8))
    >>> out["logits"].shape, out["stream_weights"].shape
    (torch.Size([2, 3]), torch.Size([2, 2]))
    """

    streams = ("roi", "context")

    def __init__(self, num_features: int, num_labels: int, drop_rate: float = 0.0, tau: float = 1.0):
        super().__init__()
        if tau <= 0:
            raise ModelError(f"model.fusion_temperature must be > 0, got {tau}")
        self.tau = float(tau)
        self.heads = nn.ModuleDict({s: FlatHead(num_features, num_labels, drop_rate) for s in self.streams})

    def forward(self, roi_features: torch.Tensor, context_features: torch.Tensor) -> dict:
        per_stream = {s: self.heads[s](f)["logits"] for s, f in zip(self.streams, (roi_features, context_features))}
        fused, weights = entropy_gated_fusion([per_stream[s] for s in self.streams], self.tau)
        return {"logits": fused, "stream_logits": per_stream, "stream_weights": weights}


def _check_dims(num_features: int, num_labels: int, drop_rate: float) -> None:
    if num_features < 1:
        raise ModelError(f"a head needs at least one input feature, got {num_features}")
    if num_labels < 1:
        raise ModelError("the taxonomy has no labels to predict")
    if not 0.0 <= drop_rate < 1.0:
        raise ModelError(f"model.drop_rate must be in [0, 1), got {drop_rate}")
