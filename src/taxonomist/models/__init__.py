"""Models: timm (or user) backbones with taxonomy heads, pretrained weights and fine-tuning modes.

>>> from taxonomist.models import build_model           # doctest: +SKIP
>>> model = build_model(cfg.model, taxonomy, cfg.data.image_size)   # doctest: +SKIP
"""
from taxonomist.models.backbones import Backbone, backbone_blocks, create_backbone
from taxonomist.models.finetune import param_groups
from taxonomist.models.heads import FlatHead, MultiRankHead, TwoStreamHead, entropy_gated_fusion
from taxonomist.models.pretrained import (LITE0_PREPROCESSING, efficientnet_pytorch_to_timm, lite_imagenet_model,
                                          load_lite_offline, load_weights_file, read_state_dict)
from taxonomist.models.scratch import ScratchCNN
from taxonomist.models.taxon_model import HEADS, TaxonModel, build_model, model_metadata

__all__ = [
    "Backbone", "backbone_blocks", "create_backbone", "param_groups", "FlatHead", "MultiRankHead", "TwoStreamHead",
    "entropy_gated_fusion", "LITE0_PREPROCESSING", "efficientnet_pytorch_to_timm", "lite_imagenet_model",
    "load_lite_offline", "load_weights_file", "read_state_dict", "ScratchCNN", "HEADS", "TaxonModel",
    "build_model", "model_metadata",
]
