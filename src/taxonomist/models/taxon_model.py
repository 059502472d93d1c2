"""`TaxonModel` (backbone + taxonomy head) and `build_model`, the one door from a ModelConfig to a model.

`forward(image, context=None)` returns a dict: `logits` over the labels, pooled `features`, and per head
`rank_logits` (multirank) or `stream_logits` / `stream_weights` (two_stream).
"""
from __future__ import annotations

import copy
from typing import Any, Iterator

import torch
from torch import nn

from taxonomist.config import ModelConfig
from taxonomist.errors import ConfigError, ModelError
from taxonomist.models.backbones import Backbone, create_backbone
from taxonomist.models.finetune import add_lora, check_finetune, freeze_frozen_norms, param_groups, set_trainable
from taxonomist.models.heads import FlatHead, MultiRankHead, TwoStreamHead
from taxonomist.taxonomy import Taxonomy
from taxonomist.taxonomy.core import suggest

HEADS = ("flat", "multirank", "two_stream")


class TaxonModel(nn.Module):
    """A backbone (two for an unshared two-stream model) and a head over `taxonomy.labels`.

    Attributes: `backbone_name`, `head_type`, `finetune`, `labels`, `num_features` (width of the
    `features` output: the backbone's F, or 2F for two_stream where ROI and context features are
    concatenated), `preprocessing` (`mean`, `std`, `interpolation`, `input_size`), `pretrained_source`.

    In training mode a linear probe keeps its whole backbone in eval mode, and frozen BatchNorm layers
    (last_n, lora) keep their statistics: see `train`.
    """

    def __init__(self, backbone: Backbone, head: nn.Module, head_type: str, labels: tuple[str, ...],
                 context_backbone: nn.Module | None = None, finetune: str = "full"):
        super().__init__()
        self.backbone = backbone.module
        self.context_backbone = context_backbone
        self.head = head
        self.head_type = head_type
        self.backbone_name = backbone.name
        self.labels = tuple(labels)
        self.finetune = finetune
        self.pretrained_source = backbone.source
        self.preprocessing = dict(backbone.preprocessing)
        self.backbone_features = backbone.num_features
        self.num_features = backbone.num_features * (2 if head_type == "two_stream" else 1)
        self.lora_layers = 0
        #: keep every BatchNorm's running statistics as loaded while training (`train.freeze_bn_stats`)
        self.freeze_norm_stats = False

    def named_backbones(self) -> Iterator[tuple[str, nn.Module]]:
        yield "backbone", self.backbone
        if self.context_backbone is not None:
            yield "context_backbone", self.context_backbone

    def forward(self, image: torch.Tensor, context: torch.Tensor | None = None) -> dict[str, Any]:
        if image.ndim != 4:
            raise ModelError(f"model input must be images (B, C, H, W), got shape {tuple(image.shape)}")
        features = self.backbone(image)
        if self.head_type != "two_stream":
            out = self.head(features)  # context, if given, is not used by single-stream heads
            out["features"] = features
            return out
        if context is None:
            raise ModelError("a two_stream model needs the context image too: model(image, context)")
        if context.shape[0] != image.shape[0]:
            raise ModelError(f"ROI batch has {image.shape[0]} images but context batch has {context.shape[0]}")
        context_features = (self.context_backbone or self.backbone)(context)
        out = self.head(features, context_features)
        out["features"] = torch.cat([features, context_features], dim=1)
        return out

    def train(self, mode: bool = True) -> "TaxonModel":
        super().train(mode)
        if mode and (self.finetune != "full" or self.freeze_norm_stats):
            for _, bb in self.named_backbones():
                freeze_frozen_norms(bb, whole=self.finetune == "linear", all_norms=self.freeze_norm_stats)
        return self

    def param_groups(self, lr: float, head_lr: float = 0.0, layer_decay: float = 0.0,
                     weight_decay: float = 0.05) -> list[dict[str, Any]]:
        """AdamW groups: see `taxonomist.models.finetune.param_groups`."""
        return param_groups(self, lr, head_lr=head_lr, layer_decay=layer_decay, weight_decay=weight_decay)

    def trainable_parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def build_model(model_cfg: ModelConfig, taxonomy: Taxonomy, image_size: int) -> TaxonModel:
    """Build backbone(s) with their pretrained weights, the head, and the fine-tuning mode of `model_cfg`.

    >>> from taxonomist.config import ModelConfig
    >>> tax = Taxonomy.from_parents({"Fungi": None, "Amanita": "Fungi", "Boletus": "Fungi"})
    >>> cfg = ModelConfig(backbone="test_efficientnet", pretrained="none", head="flat")
    >>> model = build_model(cfg, tax, image_size=32)
    >>> model(torch.zeros(2, 3, 32, 32))["logits"].shape
    torch.Size([2, 2])
    """
    if not isinstance(taxonomy, Taxonomy):
        raise ModelError(f"build_model needs a Taxonomy, got {type(taxonomy).__name__}")
    if model_cfg.head not in HEADS:
        raise ConfigError(f"model.head={model_cfg.head!r} is not one of {', '.join(HEADS)}"
                          f"{suggest(model_cfg.head, HEADS)}")
    check_finetune(model_cfg.finetune, model_cfg.lora.r)
    if not taxonomy.labels:
        raise ModelError("the taxonomy has no labels to predict")

    bb = create_backbone(model_cfg.backbone, image_size, model_cfg.pretrained)
    num_labels = len(taxonomy.labels)
    context_module = None
    if model_cfg.head == "flat":
        head: nn.Module = FlatHead(bb.num_features, num_labels, model_cfg.drop_rate)
    elif model_cfg.head == "multirank":
        head = MultiRankHead(bb.num_features, taxonomy, model_cfg.drop_rate)
    else:
        head = TwoStreamHead(bb.num_features, num_labels, model_cfg.drop_rate,
                             tau=getattr(model_cfg, "fusion_temperature", 1.0))
        if not model_cfg.shared_backbone:
            # Same starting weights for both streams without loading (or downloading) them twice.
            context_module = copy.deepcopy(bb.module)
    model = TaxonModel(bb, head, model_cfg.head, taxonomy.labels, context_module, model_cfg.finetune)

    for _, module in model.named_backbones():
        set_trainable(module, model_cfg.finetune, model_cfg.last_n_blocks, bb.name)
        if model_cfg.finetune == "lora":
            lora = model_cfg.lora
            model.lora_layers += add_lora(module, lora.r, lora.alpha, lora.dropout, list(lora.target_modules), bb.name)
    return model


def model_metadata(model: TaxonModel) -> dict[str, Any]:
    """What a checkpoint's JSON needs to describe the model (JSON-serializable).

    >>> meta = model_metadata(model)                                   # doctest: +SKIP
    >>> meta["backbone"], meta["head"], meta["preprocessing"]["mean"]  # doctest: +SKIP
    ('tf_efficientnet_lite0', 'flat', [0.5, 0.5, 0.5])
    """
    if not isinstance(model, TaxonModel):
        raise ModelError(f"model_metadata needs a TaxonModel, got {type(model).__name__}")
    pre = model.preprocessing
    meta: dict[str, Any] = {
        "backbone": model.backbone_name,
        "head": model.head_type,
        "num_labels": len(model.labels),
        "num_features": model.num_features,
        "preprocessing": {"mean": [float(v) for v in pre["mean"]], "std": [float(v) for v in pre["std"]],
                          "interpolation": pre["interpolation"], "input_size": int(pre["input_size"])},
        "finetune": model.finetune,
        "pretrained": model.pretrained_source,
        "trainable_parameters": model.trainable_parameter_count(),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    if model.head_type == "multirank":
        meta["levels"] = list(model.head.level_names)
    if model.head_type == "two_stream":
        meta["shared_backbone"] = model.context_backbone is None
        meta["fusion_temperature"] = model.head.tau
    if model.finetune == "lora":
        meta["lora_layers"] = model.lora_layers
    return meta
