"""`TaxonLoss`: the training objective as one module — a classification term, the expected taxonomic
distance, per-level and consistency terms for multirank heads, auxiliary terms for two-stream models.

`build_loss(cfg.loss, taxonomy, distance, class_counts)` is the one door from the config.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from taxonomist.config import LossConfig
from taxonomist.errors import ConfigError, ModelError
from taxonomist.losses.classification import (check_logits, check_target, cross_entropy_unchecked,
                                              focal_loss_unchecked, rows_for, soft_label_loss_unchecked)
from taxonomist.losses.distance import expected_distance_unchecked
from taxonomist.losses.hierarchical import consistency_loss_unchecked, level_matrix, rank_loss_unchecked
from taxonomist.losses.weights import CLASS_WEIGHT_MODES, check_distance, class_weights, soft_label_targets
from taxonomist.taxonomy import Level, Taxonomy

#: `loss.name` choices.
LOSS_NAMES = ("ce", "focal", "soft_labels")

#: Weight of each stream's own classification term in a two-stream model: enough that neither stream
#: starves behind the fused prediction, small enough that the fused logits stay the main objective.
STREAM_WEIGHT = 0.5


class TaxonLoss(nn.Module):
    """The training loss over a taxonomy's labels; `forward(outputs, target) -> (loss, parts)`.

    total = main + distance_weight · distance
            + Σ_level rank_weight[level] · rank/<level>              (outputs with "rank_logits")
            + consistency_weight · consistency                       (outputs with "rank_logits")
            + stream_weight · Σ_stream stream/<name>                 (outputs with "stream_logits")

    - main (`name`): `ce` — cross-entropy with label smoothing ε; `focal` — -α Σ_j t_j (1 - p_j)^γ log p_j
      with t the ε-smoothed target; `soft_labels` — cross-entropy against q_y ∝ exp(-D(y, ·) / T) (no
      extra label smoothing: the soft labels are the smoothing).
    - distance: Σ_j p_j D(y, j) / max(D), the expected taxonomic distance with D divided by its largest
      entry, so it lies in [0, 1] whatever the metric's units and `distance_weight` is scale-free.
    - rank/<level>: cross-entropy (ε-smoothed over the level's nodes) of that level's head, averaged over
      the samples whose label has a node at the level. Level weights are used as given, default 1.0
      each, so by default the level terms sum to the number of levels.
    - consistency: the mean over levels of KL(level head ‖ label head aggregated to the level).
    - stream/<name>: the main term on that stream's logits alone, weight `stream_weight` (0.5) each.

    Class weights w (per label) scale every supervised per-sample term by the sample's weight w[y]
    (t @ w for soft targets) before the batch mean; the consistency term is unweighted. Targets are label
    indices (B,) or MixUp/CutMix probabilities (B, L); soft targets get label smoothing here as hard ones
    do, so build timm's Mixup with `label_smoothing=0`. A one-hot soft target gives exactly the hard
    target's loss. `parts` holds every term's unweighted value as a float, plus "total".

    Example:
        >>> tax = Taxonomy.from_parents({"R": None, "G1": "R", "G2": "R", "A": "G1", "B": "G1", "C": "G2"})
        >>> d = np.array([[0, 2, 4], [2, 0, 4], [4, 4, 0]], dtype=float)
        >>> loss = TaxonLoss(d, name="ce", label_smoothing=0.0, distance_weight=1.0)
        >>> total, parts = loss({"logits": torch.zeros(1, 3)}, torch.tensor([0]))
        >>> round(parts["ce"], 4), round(parts["distance"], 4), round(parts["total"], 4)
        (1.0986, 0.5, 1.5986)
    """

    def __init__(self, distance, name: str = "ce", *, label_smoothing: float = 0.1, focal_gamma: float = 2.0,
                 focal_alpha: float = 0.5, distance_weight: float = 0.0, soft_label_temperature: float = 1.0,
                 class_weight=None, levels: Sequence[Level] = (), rank_weights: Mapping[str, float] | None = None,
                 consistency_weight: float = 0.1, stream_weight: float = STREAM_WEIGHT):
        super().__init__()
        if name not in LOSS_NAMES:
            raise ConfigError(f"unknown loss.name {name!r}; choose one of {', '.join(LOSS_NAMES)}")
        d = check_distance(distance)
        n = d.shape[0]
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"loss.label_smoothing must be in [0, 1), got {label_smoothing!r}")
        for key, value in (("loss.focal_gamma", focal_gamma), ("loss.focal_alpha", focal_alpha),
                           ("loss.distance_weight", distance_weight),
                           ("loss.consistency_weight", consistency_weight), ("stream_weight", stream_weight)):
            if not (np.isfinite(value) and value >= 0):
                raise ConfigError(f"{key} must be a finite number >= 0, got {value!r}")
        self.name = name
        self.label_smoothing = float(label_smoothing)
        self.focal_gamma = float(focal_gamma)
        self.focal_alpha = float(focal_alpha)
        self.distance_weight = float(distance_weight)
        self.consistency_weight = float(consistency_weight)
        self.stream_weight = float(stream_weight)
        self.n_labels = n

        # buffers are not persistent: they are rebuilt from the taxonomy, never read from a checkpoint
        top = d.max()
        self.register_buffer("distance", _f32(d / top if top > 0 else d), persistent=False)
        if name == "soft_labels":
            self.register_buffer("soft_labels", _f32(soft_label_targets(d, soft_label_temperature)),
                                 persistent=False)
        if class_weight is not None:
            w = np.asarray(class_weight, dtype=np.float64)
            if w.shape != (n,):
                raise ConfigError(f"class weights have shape {w.shape}, expected ({n},) for {n} labels")
            bad = np.flatnonzero(~np.isfinite(w) | (w < 0))
            if bad.size:
                raise ConfigError(f"class weight {w[bad[0]]!r} at label index {int(bad[0])} is not a finite "
                                  "number >= 0")
            self.register_buffer("class_weight", _f32(w), persistent=False)
        else:
            self.register_buffer("class_weight", None, persistent=False)

        self.levels = tuple(levels)
        names = [lv.name for lv in self.levels]
        weights = dict(rank_weights or {})
        for key, value in weights.items():
            if key not in names:
                choices = ", ".join(names) if names else "none: the taxonomy has no levels"
                raise ConfigError(f"loss.rank_weights: unknown level {key!r}; levels are {choices}")
            if not (np.isfinite(value) and value >= 0):
                raise ConfigError(f"loss.rank_weights.{key} must be a finite number >= 0, got {value!r}")
        self.rank_weights = {lv: float(weights.get(lv, 1.0)) for lv in names}
        for i, lv in enumerate(self.levels):
            m = level_matrix(lv)
            if m.shape[0] != n:
                raise ConfigError(f"level {lv.name!r} maps {m.shape[0]} labels but the distance matrix has {n}")
            self.register_buffer(f"_level{i}_map", torch.as_tensor(np.asarray(lv.label_to_node, dtype=np.int64)),
                                 persistent=False)
            self.register_buffer(f"_level{i}_matrix", _f32(m), persistent=False)

    def extra_repr(self) -> str:
        extra = f", levels={[lv.name for lv in self.levels]}" if self.levels else ""
        return (f"name={self.name!r}, labels={self.n_labels}, label_smoothing={self.label_smoothing}, "
                f"distance_weight={self.distance_weight}, class_weights={self.class_weight is not None}{extra}")

    def forward(self, outputs: Mapping[str, object], target: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """`outputs`: the model's dict ("logits", optional "rank_logits", "stream_logits"); `target`:
        label indices (B,) or soft targets (B, L). Returns the scalar loss and every term as a float."""
        if not isinstance(outputs, Mapping) or "logits" not in outputs:
            raise ModelError("model outputs must be a dict with a 'logits' entry")
        device = outputs["logits"].device if isinstance(outputs["logits"], torch.Tensor) else torch.device("cpu")
        # the loss is computed in float32 even inside a bf16 autocast region: t @ D and the logs of rare
        # classes' probabilities lose too much in bf16
        with torch.autocast(device_type=device.type, enabled=False):
            terms = self._terms(outputs, target)
        values = torch.stack([v.detach().float() for v in terms.values()]).tolist()  # one device sync
        return terms["total"], dict(zip(terms, values))

    # ------------------------------------------------------------------ terms
    def _terms(self, outputs: Mapping[str, object], target: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = check_logits(outputs["logits"], self.n_labels)
        target = check_target(target, logits.shape[0], self.n_labels).to(logits.device)
        buffers = self._buffers_on(logits.device)
        weight = rows_for(buffers["class_weight"], target) if self.class_weight is not None else None

        def batch_mean(per_sample: torch.Tensor) -> torch.Tensor:
            return (per_sample * weight).mean() if weight is not None else per_sample.mean()

        terms: dict[str, torch.Tensor] = {}
        terms[self.name] = batch_mean(self._main(logits, target, buffers))
        terms["distance"] = batch_mean(expected_distance_unchecked(logits.softmax(dim=1), target, buffers["distance"]))
        total = terms[self.name] + self.distance_weight * terms["distance"]

        streams = outputs.get("stream_logits") or {}
        if not isinstance(streams, Mapping):
            raise ModelError(f"stream_logits must be a dict of (batch, labels) tensors, got {type(streams).__name__}")
        for key, s_logits in streams.items():
            s_logits = check_logits(s_logits, self.n_labels, what=f"stream_logits[{key!r}]")
            _check_batch(s_logits, logits, f"stream_logits[{key!r}]")
            terms[f"stream/{key}"] = batch_mean(self._main(s_logits, target, buffers))
            total = total + self.stream_weight * terms[f"stream/{key}"]

        ranks = outputs.get("rank_logits") or {}
        if not isinstance(ranks, Mapping):
            raise ModelError(f"rank_logits must be a dict of (batch, nodes) tensors, got {type(ranks).__name__}")
        known = {lv.name: i for i, lv in enumerate(self.levels)}
        for key in ranks:
            if key not in known:
                raise ModelError(f"rank_logits has unknown level {key!r}; the taxonomy's levels are "
                                 f"{', '.join(known) or 'none'}")
        if ranks:
            probs = logits.softmax(dim=1)
            consistency = []
            for key, r_logits in ranks.items():
                i = known[key]
                lv = self.levels[i]
                r_logits = check_logits(r_logits, len(lv.nodes), what=f"rank_logits[{key!r}]")
                _check_batch(r_logits, logits, f"rank_logits[{key!r}]")
                mapping, matrix = buffers[f"_level{i}_map"], buffers[f"_level{i}_matrix"]
                terms[f"rank/{key}"] = rank_loss_unchecked(r_logits, target, mapping, matrix, self.label_smoothing,
                                                           weight)
                total = total + self.rank_weights[key] * terms[f"rank/{key}"]
                consistency.append(consistency_loss_unchecked(probs, r_logits, matrix))
            terms["consistency"] = torch.stack(consistency).mean()
            total = total + self.consistency_weight * terms["consistency"]
        terms["total"] = total
        return terms

    def _main(self, logits: torch.Tensor, target: torch.Tensor, buffers: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.name == "ce":
            return cross_entropy_unchecked(logits, target, self.label_smoothing)
        if self.name == "focal":
            return focal_loss_unchecked(logits, target, self.focal_gamma, self.focal_alpha, self.label_smoothing)
        return soft_label_loss_unchecked(logits, target, buffers["soft_labels"])

    def _buffers_on(self, device: torch.device) -> dict[str, torch.Tensor]:
        # the training loop may move the model and forget the loss, or cast it with the model; follow the
        # logits' device and keep the tables in float32 rather than fail
        return {k: b.to(device, torch.float32) if b.is_floating_point() else b.to(device)
                for k, b in self._buffers.items() if b is not None}


def build_loss(loss_cfg: LossConfig, taxonomy: Taxonomy, distance, class_counts=None) -> TaxonLoss:
    """The `TaxonLoss` that `loss_cfg` describes, over `taxonomy.labels`.

    `distance` is the labels × labels matrix (rows truth, columns prediction) of the metric in use;
    `class_counts` (per label, training split) is needed when `loss_cfg.class_weights` is not `none`.

    >>> from taxonomist.config import LossConfig
    >>> tax = Taxonomy.from_parents({"R": None, "G1": "R", "G2": "R", "A": "G1", "B": "G1", "C": "G2"})
    >>> d = np.array([[0, 2, 4], [2, 0, 4], [4, 4, 0]], dtype=float)
    >>> loss = build_loss(LossConfig(name="focal", class_weights="inverse"), tax, d, np.array([10, 10, 5]))
    >>> [round(float(w), 3) for w in loss.class_weight]
    [0.75, 0.75, 1.5]
    """
    if not isinstance(loss_cfg, LossConfig):
        raise ConfigError("build_loss needs the loss section of the config (LossConfig), "
                          f"got {type(loss_cfg).__name__}")
    if loss_cfg.class_weights not in CLASS_WEIGHT_MODES:
        raise ConfigError(f"unknown loss.class_weights {loss_cfg.class_weights!r}; "
                          f"choose one of {', '.join(CLASS_WEIGHT_MODES)}")
    if not isinstance(taxonomy, Taxonomy):
        raise ConfigError(f"build_loss needs a Taxonomy, got {type(taxonomy).__name__}")
    n = len(taxonomy.labels)
    d = check_distance(distance, n)
    if loss_cfg.class_weights == "none":
        weight = None
    else:
        if class_counts is None:
            raise ConfigError(f"loss.class_weights={loss_cfg.class_weights} needs the training class counts")
        counts = np.asarray(class_counts)
        if counts.shape != (n,):
            raise ConfigError(f"class counts have shape {counts.shape}, expected ({n},) for {n} labels")
        weight = class_weights(counts, loss_cfg.class_weights, loss_cfg.effective_beta)
    return TaxonLoss(d, loss_cfg.name, label_smoothing=loss_cfg.label_smoothing, focal_gamma=loss_cfg.focal_gamma,
                     focal_alpha=loss_cfg.focal_alpha, distance_weight=loss_cfg.distance_weight,
                     soft_label_temperature=loss_cfg.soft_label_temperature, class_weight=weight,
                     levels=taxonomy.levels(), rank_weights=loss_cfg.rank_weights,
                     consistency_weight=loss_cfg.consistency_weight)


def _f32(a: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32)


def _check_batch(tensor: torch.Tensor, logits: torch.Tensor, what: str) -> None:
    if tensor.shape[0] != logits.shape[0]:
        raise ModelError(f"{what} has {tensor.shape[0]} rows for a batch of {logits.shape[0]}")
