"""taxonomist's own train and predict paths from image files, through the code `taxonomist train` and
`taxonomist predict` run:

- train: `TaxonDataset` → `build_loader` → `build_transforms(train)` as `train()` builds them, then
  `train.step.TrainStep` (the step `train()` calls: device copy, autocast, loss, backward, clipping, AdamW,
  scheduler, EMA) and the loop's per-batch bookkeeping (loss value, argmax to the host);
- predict: `inference.run_model.infer_rows` (the checkpoint's eval transform, loader and `run_inference`, as
  `taxonomist predict` calls it), then `apply_temperature` and `decide(..., "min-risk")` over every node.

On CUDA a second pair of figures times the device-side decoder (`_gpu_batches`: nvJPEG batch decode, crop,
resize and flips on the GPU) through the same step and `run_inference`; `train()` does not use it yet.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from torchvision.transforms import v2

from taxonomist.benchmark.measure import sync, timed_steps
from taxonomist.data.loading import (
    TaxonDataset,
    batch_random_flips,
    batch_resize_normalize,
    build_loader,
    build_transforms,
    decode_jpeg_batch_cuda,
)
from taxonomist.decide import apply_temperature, decide
from taxonomist.train.step import TrainStep, build_optimizer


def _gpu_batches(dataset, rows, device, batch_size, image_size, mean, std, train, channels_last, augment, seed,
                 label_index=None):
    """Loader-shaped batches (`image`, `target`, `index`) decoded by nvJPEG and cropped/resized/flipped on the
    device (CUDA; on CPU `decode_jpeg_batch_cuda` falls back to CPU decoding, which the tests use)."""
    label_index = label_index or {lab: i for i, lab in enumerate(dataset.labels)}
    paths = [str(dataset.root / p) for p in rows["path"]]
    targets = torch.tensor([label_index[lab] for lab in rows["label"]], device=device)
    order = np.random.default_rng(seed).permutation(len(paths)) if train else np.arange(len(paths))
    scale, ratio = augment.scale, augment.ratio
    for lo in range(0, len(order) - batch_size + 1, batch_size):
        idx = order[lo:lo + batch_size]
        images = decode_jpeg_batch_cuda([paths[i] for i in idx], device)
        if train:  # random-resized crop by slicing on the GPU; the batched resize below does the rest
            crops = [v2.RandomResizedCrop.get_params(im, list(scale), list(ratio)) for im in images]
            images = [im[:, t:t + h, left:left + w] for im, (t, left, h, w) in zip(images, crops)]
        batch = batch_resize_normalize(images, image_size, mean, std, crop_pct=1.0 if train else 0.875)
        if train:
            batch = batch_random_flips(batch, augment.hflip, augment.vflip, rotate90=augment.rotate90)
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        index = torch.as_tensor(idx, device=device)
        yield {"image": batch, "target": targets[index], "index": index}


def train_loader(cfg, dataset, rows, label_index, model, num_workers):
    """The training loader `train()` builds for these rows (no cache)."""
    pre = model.preprocessing
    tf = build_transforms(cfg, True, pre["mean"], pre["std"], pre.get("interpolation", "bicubic"))
    ds = TaxonDataset(dataset, rows, tf, strict=cfg.data.strict, label_index=label_index)
    return build_loader(ds, cfg.train.batch_size, train=True, num_workers=num_workers, seed=cfg.train.seed)


def taxonomist_train(model, criterion, cfg, dataset, rows, label_index, device, num_workers, warmup, steps,
                     gpu_decode: bool = False, train_model=None) -> float:
    """img/s of `TrainStep` fed by the project's loader (or, with `gpu_decode`, the device-side decoder)."""
    from taxonomist.train.loop import _lr_lambda

    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, max(1, len(rows) // cfg.train.batch_size)))
    ema = None
    if cfg.train.ema:
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(model, decay=cfg.train.ema_decay)
    step_fn = TrainStep.from_config(cfg, model, criterion, optimizer, device, train_model=train_model,
                                    scheduler=scheduler, ema=ema)
    if gpu_decode:
        pre = model.preprocessing
        loader = None
        batches = _gpu_batches(dataset, rows, device, cfg.train.batch_size, cfg.data.image_size, pre["mean"],
                               pre["std"], True, step_fn.channels_last, cfg.augment, cfg.train.seed, label_index)
    else:
        loader = train_loader(cfg, dataset, rows, label_index, model, num_workers)
        batches = iter(loader)
    (train_model or model).train()
    step_fn.zero_grad()
    state = {"micro": 0, "global": 0, "preds": []}

    def step(batch):  # the body of train()'s batch loop
        out = step_fn(batch, state["micro"], state["global"])
        state["micro"] += 1
        state["global"] += int(out.updated)
        float(out.loss)
        state["preds"].append(out.outputs["logits"].detach().argmax(1).cpu())

    try:
        return timed_steps(((b, len(b["index"])) for b in batches), step, warmup, steps, device)
    finally:
        if loader is not None:
            loader.close()


def checkpoint_meta(cfg, model) -> dict:
    """The part of a checkpoint's metadata that `infer_rows` reads (eval transform, head, input column)."""
    return {"image_size": cfg.data.image_size, "preprocessing": dict(model.preprocessing), "head": cfg.model.head,
            "data": {"resize": cfg.data.resize, "grayscale": cfg.data.grayscale, "crop_pct": cfg.augment.crop_pct,
                     "input": "path"}}


def taxonomist_predict(model, cfg, dataset, rows, label_index, device, num_workers, warmup, steps,
                       gpu_decode: bool = False) -> float:
    """Steady-state img/s of predict: `infer_rows` (as `taxonomist predict` calls it), softmax with the
    checkpoint temperature and the min-risk answer over every taxonomy node.

    Each `infer_rows` call starts its own loader, whose start and first, unoverlapped batch a long predict
    run amortises. So after one untimed call, the `warmup` batches are timed alone (T_w) and then with the
    `steps` batches after them (T_ws): img/s = steps × batch / (T_ws − T_w), loader start cancelling out.
    With `warmup=0`, or when the difference is under a tenth of T_ws (timer noise on a tiny model), it is
    the images of one call over its time, start included."""
    from taxonomist.inference.run_model import infer_rows
    from taxonomist.train.inference import run_inference

    taxonomy = dataset.taxonomy
    candidates = list(taxonomy.internal_nodes) + list(taxonomy.labels)  # min-risk may answer a genus or family
    bs = cfg.train.batch_size
    warm_rows, all_rows = rows.iloc[:warmup * bs], rows.iloc[:(warmup + steps) * bs]
    if len(all_rows) < (warmup + steps) * bs:
        raise RuntimeError("benchmark: too few images for the timed predict batches")
    meta = checkpoint_meta(cfg, model)

    def run(part) -> float:
        sync(device)
        start = time.perf_counter()
        if gpu_decode:
            pre = model.preprocessing
            batches = _gpu_batches(dataset, part, device, bs, cfg.data.image_size, pre["mean"], pre["std"], False,
                                   cfg.train.channels_last, cfg.augment, cfg.train.seed, label_index)
            logits = run_inference(model, batches, device, amp=cfg.train.amp).logits
        else:
            logits = infer_rows(model, meta, dataset, part, device, label_index, batch_size=bs,
                                num_workers=num_workers).result.logits
        probs = apply_temperature(logits.astype(np.float64), 1.0)
        nodes = decide(probs, taxonomy, "min-risk", candidates=candidates).nodes
        sync(device)
        if len(nodes) != len(part):
            raise RuntimeError(f"benchmark: predict answered {len(nodes)} of {len(part)} images")
        return time.perf_counter() - start

    model.eval()
    if not warmup:
        return steps * bs / run(all_rows)
    run(warm_rows)  # first forwards: allocations, oneDNN/cuDNN primitive choice
    t_all = run(all_rows)
    seconds = t_all - run(warm_rows)
    if seconds < 0.1 * t_all:  # noise swamps the difference (tiny models): the whole call, start included
        return len(all_rows) / t_all
    return steps * bs / seconds
