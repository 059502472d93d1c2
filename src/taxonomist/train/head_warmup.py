"""Head warm-up before fine-tuning (LP-FT, Kumar et al., ICLR 2022): fit the head on the frozen backbone's
features first, then fine-tune everything from that head.

A randomly initialised head sends large, noisy gradients into pretrained features during the first steps of
fine-tuning and distorts them; on a short CPU budget the model never recovers what it lost, and loses to a linear
probe on the same features. The warm-up costs one pass over the training images without augmentation plus a few
seconds of linear-head training on the cached features.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from taxonomist.config import Config
from taxonomist.errors import ConfigError

HEAD_WARMUP_CHOICES = ("auto", "on", "off")
#: the head's optimiser on the cached features: AdamW at this rate, cosine, batches of this size (checked on
#: PlanktonSet 1.0's frozen Lite0 features: 10 epochs at 3e-3 give val top-1 0.671, the 30-epoch probe 0.667)
HEAD_WARMUP_LR = 3e-3
HEAD_WARMUP_WEIGHT_DECAY = 1e-4
HEAD_WARMUP_BATCH = 256
#: backbone weight sources that are pretrained (`Backbone.source`); `factory` and `none` are not known to be
PRETRAINED_SOURCES = ("timm", "open_clip")


@dataclass
class HeadWarmup:
    """What the warm-up did: on how many images, for how many epochs, the head's training top-1 and loss."""
    images: int
    epochs: int
    train_top1: float
    loss: float
    seconds: float

    def summary(self) -> str:
        return (f"head warm-up (LP-FT): head fitted on the frozen backbone's features of {self.images:,} training "
                f"images ({self.epochs} epochs, train top-1 {self.train_top1:.3f}, loss {self.loss:.3f}) in "
                f"{self.seconds:.0f} s; fine-tuning starts from it")


def check_head_warmup(value: str) -> str:
    if value not in HEAD_WARMUP_CHOICES:
        raise ConfigError(f"train.head_warmup {value!r}: choose one of {', '.join(HEAD_WARMUP_CHOICES)}")
    return value


def freeze_bn_stats(cfg: Config, warmed_up: bool) -> bool:
    """Whether BatchNorm layers keep their loaded running statistics while training (`train.freeze_bn_stats`):
    `auto` when the head is warmed up — it was fitted on the features those statistics give, and a training batch's
    own statistics (small, augmented, another domain) move every feature under it."""
    value = cfg.train.freeze_bn_stats
    if value not in HEAD_WARMUP_CHOICES:
        raise ConfigError(f"train.freeze_bn_stats {value!r}: choose one of {', '.join(HEAD_WARMUP_CHOICES)}")
    return value == "on" or (value == "auto" and warmed_up)


def head_warmup_reason(cfg: Config, source: str, head_type: str) -> tuple[bool, str]:
    """(whether to warm the head up, why) for `train.head_warmup` and the model that was built.

    `auto` warms up a head over a pretrained backbone (weights from timm, the offline Lite packages, open_clip or
    a `model.pretrained` file) that training will change (`model.finetune` full, last_n or lora); `on` always,
    `off` never. A linear probe (`finetune=linear`) trains the head alone anyway; two-stream heads are not warmed
    up (their head needs ROI and context features together).
    """
    mode = check_head_warmup(cfg.train.head_warmup)
    if mode == "off":
        return False, "train.head_warmup=off"
    if head_type == "two_stream":
        return False, "the two_stream head is not warmed up"
    if mode == "on":
        return True, "train.head_warmup=on"
    pretrained = source in PRETRAINED_SOURCES or source.endswith("-offline") or source.startswith("file:")
    if not pretrained:
        return False, f"the backbone is not pretrained (weights: {source})"
    if cfg.model.finetune == "linear":
        return False, "model.finetune=linear trains the head alone"
    return True, f"pretrained backbone ({source})"


def warm_up_head(model, loader, criterion, device, epochs: int, seed: int = 0, amp: bool = False) -> HeadWarmup:
    """Fit `model.head` on the features `model.backbone` gives for `loader` (evaluation transforms), leaving the
    backbone untouched.

    The features are centred and scaled by one number for the fit (one learning rate then suits any backbone) and
    that is folded back into the head's Linear layers, so the model computes exactly what was fitted on raw
    features.
    """
    import torch
    from torch import nn

    from taxonomist.inference.forward import run_inference

    start = time.time()
    res = run_inference(model, loader, device, amp=amp, progress=False, desc="head warm-up")
    x = torch.from_numpy(np.ascontiguousarray(res.features, dtype=np.float32)).to(device)
    y = torch.from_numpy(np.asarray(res.targets, dtype=np.int64)).to(device)
    if len(y) == 0:
        raise ConfigError("head warm-up: no readable training image")
    # centred and scaled by one number: a per-feature scale would fold into large weights on the near-constant
    # units, which explode once augmentation or fine-tuning makes those units move
    mean = x.mean(0)
    scale = (x - mean).pow(2).mean().sqrt().clamp_min(1e-6)
    z = (x - mean) / scale
    head = model.head
    head.train()
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(y) / HEAD_WARMUP_BATCH)
    total = max(1, epochs * steps_per_epoch)
    opt = torch.optim.AdamW(head.parameters(), lr=HEAD_WARMUP_LR, weight_decay=HEAD_WARMUP_WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(len(y), generator=generator).to(device)
            for s in range(0, len(order), HEAD_WARMUP_BATCH):
                idx = order[s:s + HEAD_WARMUP_BATCH]
                loss, _ = criterion(head(z[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    head.eval()
    with torch.no_grad():
        for layer in head.modules():  # W z + b with z = (x − μ)/s  ==  (W/s) x + (b − (W/s) μ)
            if isinstance(layer, nn.Linear) and layer.in_features == x.shape[1]:
                layer.weight.div_(scale)
                layer.bias.sub_(layer.weight @ mean)
        out = head(x)
        final_loss, _ = criterion(out, y)
        top1 = float((out["logits"].argmax(1) == y).float().mean())
    return HeadWarmup(len(y), epochs, top1, float(final_loss), time.time() - start)


__all__ = ["HeadWarmup", "HEAD_WARMUP_CHOICES", "check_head_warmup", "freeze_bn_stats", "head_warmup_reason",
           "warm_up_head"]
