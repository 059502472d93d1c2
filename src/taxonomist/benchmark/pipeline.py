"""taxonomist's own train and predict paths from image files: TaxonDataset → build_loader →
build_transforms on CPU (bf16 autocast + channels_last on CUDA), and on CUDA nvJPEG batch decode with the
crop/resize/flips done on the GPU; predict ends in the min-risk decision over every taxonomy node."""
from __future__ import annotations

import numpy as np
import torch
from torchvision.transforms import v2

from taxonomist.benchmark.measure import timed_steps
from taxonomist.data.loading import (
    TaxonDataset,
    batch_random_flips,
    batch_resize_normalize,
    build_loader,
    build_transforms,
    decode_jpeg_batch_cuda,
)
from taxonomist.decide import min_risk_decision


def _cpu_batches(loader, device, channels_last):
    try:
        for batch in loader:
            image = batch["image"].to(device, non_blocking=True)
            if channels_last:
                image = image.contiguous(memory_format=torch.channels_last)
            yield (image, batch["target"].to(device, non_blocking=True)), len(image)
    finally:
        loader.close()


def _gpu_batches(dataset, rows, device, batch_size, image_size, mean, std, train, channels_last, augment, seed):
    """Batches decoded by nvJPEG and cropped/resized/flipped on the GPU (CUDA only; not measured here)."""
    paths = [str(dataset.root / p) for p in rows["path"]]
    targets = torch.tensor([dataset.labels.index(lab) for lab in rows["label"]], device=device)
    order = np.random.default_rng(seed).permutation(len(paths)) if train else np.arange(len(paths))
    scale, ratio = augment.scale, augment.ratio
    for lo in range(0, len(order) - batch_size + 1, batch_size):
        idx = order[lo:lo + batch_size]
        images = decode_jpeg_batch_cuda([paths[i] for i in idx], device)
        if train:  # random-resized crop by slicing on the GPU; the batched resize below does the rest
            crops = [v2.RandomResizedCrop.get_params(im, list(scale), list(ratio)) for im in images]
            images = [im[:, t:t + h, l:l + w] for im, (t, l, h, w) in zip(images, crops)]
        batch = batch_resize_normalize(images, image_size, mean, std, crop_pct=1.0 if train else 0.875)
        if train:
            batch = batch_random_flips(batch, augment.hflip, augment.vflip, rotate90=augment.rotate90)
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        yield (batch, targets[torch.as_tensor(idx, device=device)]), len(idx)


def _batches(cfg, dataset, rows, transform, device, train, num_workers, channels_last, mean, std):
    if device.type == "cuda":
        return _gpu_batches(dataset, rows, device, cfg.train.batch_size, cfg.data.image_size, mean, std, train,
                            channels_last, cfg.augment, cfg.train.seed)
    ds = TaxonDataset(dataset, rows, transform)
    loader = build_loader(ds, cfg.train.batch_size, train=train, num_workers=num_workers, seed=cfg.train.seed)
    return _cpu_batches(loader, device, channels_last)


def taxonomist_train(model, criterion, cfg, dataset, rows, device, num_workers, warmup, steps) -> float:
    """img/s of the training step fed by the project's loader (CPU) or GPU decode path (CUDA)."""
    pre = model.preprocessing
    amp = cfg.train.amp and device.type == "cuda"
    channels_last = cfg.train.channels_last and device.type == "cuda"
    transform = build_transforms(cfg, True, pre["mean"], pre["std"], pre.get("interpolation", "bicubic"))
    batches = _batches(cfg, dataset, rows, transform, device, True, num_workers, channels_last,
                       pre["mean"], pre["std"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    model.train()

    def step(batch):
        image, target = batch
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss, _ = criterion(model(image), target)
        loss.backward()
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    try:
        return timed_steps(batches, step, warmup, steps, device)
    finally:
        batches.close()


def taxonomist_predict(model, cfg, dataset, rows, distance_lc, device, num_workers, warmup, steps) -> float:
    """img/s of predict: eval transform, forward, softmax, min-risk answer over the candidates."""
    pre = model.preprocessing
    amp = cfg.train.amp and device.type == "cuda"
    channels_last = cfg.train.channels_last and device.type == "cuda"
    transform = build_transforms(cfg, False, pre["mean"], pre["std"], pre.get("interpolation", "bicubic"))
    batches = _batches(cfg, dataset, rows, transform, device, False, num_workers, channels_last,
                       pre["mean"], pre["std"])
    model.eval()

    @torch.inference_mode()
    def step(batch):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(batch[0])["logits"]
        probs = logits.float().softmax(1).cpu().numpy()
        min_risk_decision(probs, distance_lc)

    try:
        return timed_steps(batches, step, warmup, steps, device)
    finally:
        batches.close()
