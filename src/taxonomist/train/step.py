"""One training step, shared by `train()` and `taxonomist benchmark` so that both run the same code (and the
learning-rate schedule, `lr_lambda`, that steps with it).

`TrainStep` holds what a step needs (model, loss, optimiser, scheduler, EMA, MixUp/CutMix, autocast and
memory-format policy); calling it with a loader batch moves the batch to the device, runs forward and loss
under autocast, back-propagates `loss / accumulate`, and on every `accumulate`-th micro-batch clips the
gradients, steps the optimiser, zeroes the gradients, steps a per-step scheduler and updates the EMA.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def lr_lambda(cfg, steps_per_epoch: int):
    """The learning-rate factor per optimiser step for `LambdaLR`: a linear warm-up over train.warmup_epochs, then
    cosine down to 1 % of the rate (train.scheduler=cosine) or constant; the schedule `train()` uses.

    >>> from taxonomist.config import load_config
    >>> factor = lr_lambda(load_config(None, ["train.epochs=2", "train.warmup_epochs=1"]), steps_per_epoch=10)
    >>> [round(factor(s), 3) for s in (0, 9, 10, 19)]
    [0.1, 1.0, 1.0, 0.034]
    """
    import math

    warmup = int(cfg.train.warmup_epochs * steps_per_epoch)
    total = max(1, cfg.train.epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if cfg.train.scheduler == "cosine":
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0
    return factor


def build_optimizer(model, cfg, lr_scale: float = 1.0):
    """AdamW over the model's parameter groups (head learning rate, layer-wise decay, no weight decay on
    norms and biases) as `cfg.train` sets them, every rate × `lr_scale`; the optimiser `train()` uses.

    >>> opt = build_optimizer(model, cfg)          # doctest: +SKIP
    """
    import torch

    lr = cfg.train.lr * lr_scale
    groups = model.param_groups(lr, head_lr=cfg.train.head_lr * lr_scale, layer_decay=cfg.train.layer_decay,
                                weight_decay=cfg.train.weight_decay)
    return torch.optim.AdamW(groups, lr=lr)


@dataclass
class StepOutput:
    """What one micro-batch gave: its loss (a detached scalar tensor), the model's outputs, the targets
    before MixUp (for accuracy), the batch size, and whether the optimiser stepped on it."""

    loss: Any
    outputs: dict
    target: Any
    n: int
    updated: bool


class TrainStep:
    """The training step of `train()` as a callable.

    Args:
        model: the module whose parameters are clipped and whose weights the EMA follows.
        criterion: a taxonomist loss, `criterion(outputs, target) -> (loss, parts)`.
        optimizer: e.g. `build_optimizer(model, cfg)`.
        device: where batches go (`non_blocking` copies, pinned by the loader on CUDA).
        train_model: what runs forward (the compiled or DDP-wrapped model); default `model`.
        scheduler: stepped after each optimiser step (None for a per-epoch scheduler such as plateau).
        ema: a `timm.utils.ModelEmaV3` updated after each optimiser step, or None.
        mixup: a `timm.data.Mixup`, applied to even-sized batches, or None.
        accumulate: micro-batches per optimiser step; grad_clip: max gradient norm, 0 = off.
        amp: bf16 autocast (CUDA only); channels_last: NHWC input (CUDA only).
        two_stream: the model takes `(image, context)`.

    >>> step = TrainStep(model, criterion, build_optimizer(model, cfg), torch.device("cpu"))  # doctest: +SKIP
    >>> step.zero_grad()                                                                          # doctest: +SKIP
    >>> out = step(batch, 0, global_step=0)                                                       # doctest: +SKIP
    >>> out.updated, float(out.loss)                                                              # doctest: +SKIP
    (True, 2.07...)
    """

    def __init__(self, model, criterion, optimizer, device, *, train_model=None, scheduler=None, ema=None,
                 mixup=None, accumulate: int = 1, grad_clip: float = 0.0, amp: bool = False,
                 channels_last: bool = False, two_stream: bool = False):
        import torch

        if accumulate < 1:
            raise ValueError(f"accumulate must be at least 1, got {accumulate}")
        self.model, self.criterion, self.optimizer = model, criterion, optimizer
        self.device = torch.device(device)
        self.train_model = train_model if train_model is not None else model
        self.scheduler, self.ema, self.mixup = scheduler, ema, mixup
        self.accumulate, self.grad_clip = accumulate, grad_clip
        cuda = self.device.type == "cuda"
        self.amp, self.channels_last, self.two_stream = amp and cuda, channels_last and cuda, two_stream

    @classmethod
    def from_config(cls, cfg, model, criterion, optimizer, device, **kwargs) -> TrainStep:
        """A step with `cfg.train`'s accumulation, clipping, autocast and memory format."""
        return cls(model, criterion, optimizer, device, accumulate=cfg.train.accumulate,
                   grad_clip=cfg.train.grad_clip, amp=cfg.train.amp, channels_last=cfg.train.channels_last,
                   two_stream=cfg.model.head == "two_stream", **kwargs)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def __call__(self, batch: dict, micro_step: int, global_step: int = 0) -> StepOutput:
        """Run micro-batch number `micro_step` of the epoch (0-based; the optimiser steps when
        `(micro_step + 1) % accumulate == 0`). `global_step` is the count of optimiser steps so far (EMA
        warm-up)."""
        import torch
        from torch import nn

        image = batch["image"].to(self.device, non_blocking=True)
        target = batch["target"].to(self.device, non_blocking=True)
        context = batch["context"].to(self.device, non_blocking=True) if self.two_stream else None
        if self.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        hard_target = target
        if self.mixup is not None and len(image) % 2 == 0:
            image, target = self.mixup(image, target)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            outputs = self.train_model(image, context) if self.two_stream else self.train_model(image)
            loss, _ = self.criterion(outputs, target)
        (loss / self.accumulate).backward()
        updated = (micro_step + 1) % self.accumulate == 0
        if updated:
            if self.grad_clip > 0:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.scheduler is not None:
                self.scheduler.step()
            if self.ema is not None:
                self.ema.update(self.model, step=global_step)
        return StepOutput(loss.detach(), outputs, hard_target, len(image), updated)
