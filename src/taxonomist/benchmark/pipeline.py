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
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.transforms import v2

from taxonomist.benchmark.measure import sync, timed_steps
from taxonomist.data.augment_presets import resolve_augment
from taxonomist.data.gpu_batch import batch_random_flips, batch_resize_normalize, decode_jpeg_batch_cuda
from taxonomist.data.loading import TaxonDataset, build_loader, build_transforms
from taxonomist.decide import apply_temperature, decide
from taxonomist.train.step import TrainStep, build_optimizer, lr_lambda


def _gpu_batches(dataset, rows, device, batch_size, image_size, mean, std, train, channels_last, augment, seed,
                 label_index=None):
    """Loader-shaped batches (`image`, `target`, `index`) decoded by nvJPEG and cropped/resized/flipped on the
    device (CUDA; on CPU `decode_jpeg_batch_cuda` falls back to CPU decoding, which the tests use)."""
    label_index = label_index or {lab: i for i, lab in enumerate(dataset.labels)}
    paths = [str(dataset.root / p) for p in rows["path"]]
    targets = torch.tensor([label_index[lab] for lab in rows["label"]], device=device)
    order = np.random.default_rng(seed).permutation(len(paths)) if train else np.arange(len(paths))
    scale, ratio = resolve_augment(augment).scale, augment.ratio
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
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, max(1, len(rows) // cfg.train.batch_size)))
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


#: below this share of the whole call, the time the timed batches add is too close to timer and load noise
MIN_DIFFERENCE_SHARE = 0.1


@dataclass(frozen=True)
class PredictTiming:
    """One predict measurement: img/s, how it was timed and why, and the call times behind it (seconds)."""
    img_s: float
    method: str                     #: "steady_state" (difference of two calls) or "whole_call" (start included)
    reason: str
    all_s: float                    #: `infer_rows` over the warm-up + timed batches
    warm_s: float | None = None     #: `infer_rows` over the warm-up batches alone (None without warm-up)

    def as_dict(self) -> dict:
        return {"method": self.method, "reason": self.reason, "all_s": round(self.all_s, 4),
                "warm_s": None if self.warm_s is None else round(self.warm_s, 4)}


def predict_rate(timed_images: int, all_images: int, all_s: float, warm_s: float | None) -> PredictTiming:
    """Predict img/s from the call over warm-up + timed batches (`all_s`) and the one over the warm-up alone.

    Steady state is timed_images / (all_s − warm_s): the loader's start and first batch, which a long predict
    run amortises, cancel out. That needs a difference well above noise; under `MIN_DIFFERENCE_SHARE` of the
    call (a tiny model whose loader start dominates), or without warm-up batches, it is the whole call's
    rate instead, start included: a lower bound that never overstates the steady rate, but one that is not
    comparable with the baseline's steady-state figure.

    >>> t = predict_rate(96, 128, 4.0, 1.5)
    >>> t.method, t.img_s
    ('steady_state', 38.4)
    >>> t = predict_rate(96, 128, 4.0, 3.9)
    >>> t.method, t.img_s
    ('whole_call', 32.0)
    """
    if warm_s is None:
        return PredictTiming(all_images / all_s, "whole_call", "no warm-up batches (--warmup 0): the whole call's "
                             "rate, loader start included (a lower bound on the steady rate)", all_s)
    difference = all_s - warm_s
    if difference < MIN_DIFFERENCE_SHARE * all_s:
        return PredictTiming(all_images / all_s, "whole_call",
                             f"warm-up + timed batches took {all_s:.3f} s, the warm-up alone {warm_s:.3f} s: "
                             f"the difference ({difference:+.3f} s) is under {MIN_DIFFERENCE_SHARE:.0%} of the "
                             "call, within noise, so the whole call's rate, loader start included (a lower bound "
                             "on the steady rate; not comparable with the baseline's steady-state timing)",
                             all_s, warm_s)
    return PredictTiming(timed_images / difference, "steady_state",
                         f"timed images / (warm-up + timed batches {all_s:.3f} s − warm-up alone {warm_s:.3f} s): "
                         "the loader's start cancels out, as in a long predict run", all_s, warm_s)


def taxonomist_predict(model, cfg, dataset, rows, label_index, device, num_workers, warmup, steps,
                       gpu_decode: bool = False) -> PredictTiming:
    """Steady-state img/s of predict: `infer_rows` (as `taxonomist predict` calls it), softmax with the
    checkpoint temperature and the min-risk answer over every taxonomy node.

    Each `infer_rows` call starts its own loader, whose start and first, unoverlapped batch a long predict
    run amortises. So after one untimed call, the `warmup` + `steps` batches are timed in one call and the
    `warmup` batches alone in another, and `predict_rate` turns the two into img/s (and says which method it
    used: with `warmup=0`, or a difference within noise, the whole call, start included)."""
    from taxonomist.inference.run_model import infer_rows
    from taxonomist.inference.forward import run_inference

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
        return predict_rate(steps * bs, len(all_rows), run(all_rows), None)
    run(warm_rows)  # first forwards: allocations, oneDNN/cuDNN primitive choice
    all_s = run(all_rows)
    return predict_rate(steps * bs, len(all_rows), all_s, run(warm_rows))
