"""Which parameters train and at what learning rate: full, linear probe, last N blocks, LoRA adapters.

Frozen BatchNorm layers also keep their running statistics (see `freeze_frozen_norms`), and
`param_groups` builds AdamW groups with a head learning rate and layer-wise decay over the backbone blocks.
"""
from __future__ import annotations

import logging
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from taxonomist.errors import ConfigError, ModelError
from taxonomist.models.backbones import backbone_blocks
from taxonomist.taxonomy.core import suggest

log = logging.getLogger(__name__)

FINETUNE_MODES = ("full", "linear", "last_n", "lora")
#: layer types peft can put LoRA adapters on
LORA_LAYER_TYPES = (nn.Linear, nn.Conv2d, nn.Conv1d, nn.Embedding)


def check_finetune(mode: str, lora_r: int) -> None:
    if mode not in FINETUNE_MODES:
        raise ConfigError(f"model.finetune={mode!r} is not one of {', '.join(FINETUNE_MODES)}"
                          f"{suggest(mode, FINETUNE_MODES)}")
    if mode == "lora" and lora_r < 1:
        raise ConfigError("model.finetune=lora needs model.lora.r ≥ 1 (e.g. --set model.lora.r=8)")
    if mode != "lora" and lora_r > 0:
        raise ConfigError(f"model.lora.r={lora_r} only applies with model.finetune=lora (now {mode!r}); "
                          "set model.lora.r=0 or model.finetune=lora")


def layer_ids(backbone: nn.Module, name: str = "backbone") -> tuple[dict[str, int], int]:
    """Layer id of each backbone parameter: 0 = stem (before the blocks), 1…N = blocks, N+1 = after them.

    Returns ({parameter name: id}, N). Parameters outside the blocks are placed by their registration
    order relative to the first block parameter (timm registers modules in forward order).
    """
    blocks = backbone_blocks(backbone, name)
    in_block = {id(p): i + 1 for i, block in enumerate(blocks) for p in block.parameters()}
    ids: dict[str, int] = {}
    seen_block = False
    for pname, p in backbone.named_parameters():
        if id(p) in in_block:
            seen_block = True
            ids[pname] = in_block[id(p)]
        else:
            ids[pname] = len(blocks) + 1 if seen_block else 0
    return ids, len(blocks)


def set_trainable(backbone: nn.Module, mode: str, last_n_blocks: int = 0, name: str = "backbone") -> None:
    """Set `requires_grad` on a backbone's parameters for `full`, `linear` or `last_n` (LoRA: `add_lora`).

    `last_n` trains the last `last_n_blocks` blocks (see `backbone_blocks`: EfficientNet stages, ConvNeXt
    stages, ViT blocks) and everything after them (EfficientNet's conv_head, ViT's final norm).

    >>> import timm
    >>> bb = timm.create_model("test_convnext", num_classes=0)
    >>> set_trainable(bb, "last_n", 1)
    >>> sorted({n.split(".")[0] + "." + n.split(".")[1] for n, p in bb.named_parameters() if p.requires_grad})
    ['head.norm', 'stages.3']
    """
    if mode == "full":
        rule = lambda pname: True  # noqa: E731
    elif mode in ("linear", "lora"):
        rule = lambda pname: False  # noqa: E731
    elif mode == "last_n":
        ids, n_blocks = layer_ids(backbone, name)
        if not 1 <= last_n_blocks <= n_blocks:
            raise ConfigError(f"model.last_n_blocks={last_n_blocks}: backbone {name} has {n_blocks} blocks; "
                              f"choose 1…{n_blocks}")
        first = n_blocks - last_n_blocks + 1
        rule = lambda pname: ids[pname] >= first  # noqa: E731
    else:
        check_finetune(mode, 0)
        return
    for pname, p in backbone.named_parameters():
        p.requires_grad_(rule(pname))


def add_lora(backbone: nn.Module, r: int, alpha: float, dropout: float, target_modules: list[str],
             name: str = "backbone") -> int:
    """Inject LoRA adapters (peft) into the backbone's layers named by `target_modules`; freeze the rest.

    A target matches a Linear/Conv layer whose name is the target or ends with `.target`; targets that
    match nothing are skipped (the default list covers ViT and EfficientNet names), but at least one must
    match. Returns the number of adapted layers.

    >>> import timm
    >>> bb = timm.create_model("test_vit", num_classes=0)
    >>> add_lora(bb, r=4, alpha=8, dropout=0.0, target_modules=["qkv"])   # one qkv per block
    6
    """
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ModelError("model.finetune=lora needs peft (pip install 'taxonomist[lora]')") from None
    if r < 1:
        raise ConfigError(f"model.lora.r must be ≥ 1, got {r}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"model.lora.dropout must be in [0, 1), got {dropout}")
    targets = [t for t in target_modules if t]
    layers = [n for n, m in backbone.named_modules() if n and isinstance(m, LORA_LAYER_TYPES)]
    chosen = [n for n in layers if any(n == t or n.endswith("." + t) for t in targets)]
    if not chosen:
        leaf = sorted({n.rsplit(".", 1)[-1] for n in layers})
        raise ModelError(f"model.lora.target_modules {targets} match no Linear/Conv layer of backbone {name}; "
                         f"its layers are named {', '.join(leaf[:12])}{' …' if len(leaf) > 12 else ''}")
    unused = [t for t in targets if not any(n == t or n.endswith("." + t) for n in chosen)]
    if unused:
        log.debug("LoRA targets absent from %s: %s", name, ", ".join(unused))
    for p in backbone.parameters():
        p.requires_grad_(False)
    # Exact layer names, so that peft adapts precisely the layers checked above.
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=chosen, bias="none")
    try:
        inject_adapter_in_model(config, backbone)
    except (ValueError, TypeError, RuntimeError) as e:
        raise ModelError(f"cannot add LoRA adapters to backbone {name}: {str(e).splitlines()[0]}") from None
    for pname, p in backbone.named_parameters():
        p.requires_grad_("lora_" in pname)
    return len(chosen)


def freeze_frozen_norms(backbone: nn.Module, whole: bool = False, all_norms: bool = False) -> None:
    """Put frozen parts of a backbone in eval mode; call after `model.train()`.

    `whole=True` (linear probe): the whole backbone, so BatchNorm statistics and dropout stay as loaded.
    Otherwise each BatchNorm whose affine parameters are frozen: a frozen layer should not drift with the
    new data's batch statistics either. `all_norms=True`: every BatchNorm normalises with its loaded running
    statistics (its affine parameters still train), so training sees the features a warmed-up head was fitted on.
    """
    if whole:
        backbone.eval()
        return
    for m in backbone.modules():
        if isinstance(m, _BatchNorm) and (all_norms or (m.weight is not None and not m.weight.requires_grad)):
            m.eval()


def param_groups(model: nn.Module, lr: float, head_lr: float = 0.0, layer_decay: float = 0.0,
                 weight_decay: float = 0.05) -> list[dict[str, Any]]:
    """Optimizer parameter groups for a `TaxonModel` (only parameters that train).

    Heads (everything outside the backbones) learn at `head_lr` when > 0, else `lr`. With `layer_decay`
    in (0, 1), backbone layer k of N blocks learns at `lr · layer_decay^(N + 1 - k)` (stem k = 0, blocks
    1…N, the part after the blocks N + 1 at full `lr`). Norm weights, biases and 1-d parameters (and
    timm's `no_weight_decay()` names such as `pos_embed`) get no weight decay. Each group carries `name`,
    `lr`, `weight_decay` and `lr_scale`.

    >>> groups = param_groups(model, lr=1e-3, head_lr=1e-2, layer_decay=0.75)   # doctest: +SKIP
    >>> torch.optim.AdamW(groups)                                              # doctest: +SKIP
    """
    for key, value, low in (("lr", lr, 0.0), ("head_lr", head_lr, 0.0), ("weight_decay", weight_decay, 0.0)):
        if not isinstance(value, (int, float)) or value < low or (key == "lr" and value == 0):
            raise ConfigError(f"train.{key} must be {'> 0' if key == 'lr' else '≥ 0'}, got {value!r}")
    if not 0.0 <= layer_decay <= 1.0:
        raise ConfigError(f"train.layer_decay must be in [0, 1] (0 = off), got {layer_decay!r}")

    backbone_params: dict[int, tuple[int, int, bool]] = {}  # id → (layer id, N, no-decay)
    for bb_name, bb in model.named_backbones():
        no_wd_names = set(bb.no_weight_decay()) if hasattr(bb, "no_weight_decay") else set()
        if layer_decay > 0:
            ids, n_blocks = layer_ids(bb, model.backbone_name)
        else:
            ids, n_blocks = {n: 0 for n, _ in bb.named_parameters()}, 0
        for pname, p in bb.named_parameters():
            backbone_params[id(p)] = (ids[pname], n_blocks, _no_decay(pname, p) or pname in no_wd_names)

    groups: dict[tuple, dict[str, Any]] = {}
    for pname, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in backbone_params:
            layer, n_blocks, no_wd = backbone_params[id(p)]
            scale = layer_decay ** (n_blocks + 1 - layer) if layer_decay > 0 else 1.0
            key = ("backbone", layer, no_wd)
            label = f"backbone.layer{layer}" if layer_decay > 0 else "backbone"
            base = lr
        else:
            no_wd, scale, key, label = _no_decay(pname, p), 1.0, ("head", 0, _no_decay(pname, p)), "head"
            base = head_lr if head_lr > 0 else lr
        group = groups.setdefault(key, {"name": label + (".no_decay" if no_wd else ""), "params": [],
                                        "lr": base * scale, "lr_scale": scale,
                                        "weight_decay": 0.0 if no_wd else float(weight_decay)})
        group["params"].append(p)
    order = sorted(groups, key=lambda k: (k[0] == "head", k[1], k[2]))
    return [groups[k] for k in order]


def _no_decay(name: str, p: nn.Parameter) -> bool:
    return p.ndim <= 1 or name.endswith(".bias")
