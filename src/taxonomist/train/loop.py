"""The training loop: `train()` from a Config to a run directory, in stages — prepare the run, then per epoch
train, validate, record and save — with callbacks (train/callbacks.py) for everything that only watches.

AdamW + warmup/cosine (or plateau), gradient accumulation and clipping, bf16 autocast on CUDA, EMA,
MixUp/CutMix, model selection on validation mean hierarchical distance, early stopping, resumable at
epoch boundaries, DDP through torchrun (rank 0 writes).
"""
from __future__ import annotations

import csv
import dataclasses
import math
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from taxonomist.config import Config
from taxonomist.data.augment_presets import check_preset, describe_augment, resolve_augment, saved_augment
from taxonomist.data.dataset import load_dataset
from taxonomist.data.split import split_rows, trainable_labels
from taxonomist.errors import ConfigError, DataError
from taxonomist.runtime import configure_threads, distributed_info, select_device
from taxonomist.taxonomy import default_metric, distance_matrix, write_taxonomy
from taxonomist.train.callbacks import BatchEnd, Callback, CallbackList, EpochHook, standard_callbacks
from taxonomist.train.checkpoint import (check_resume_config, load_resume_state, save_checkpoint,
                                         save_resume_state, taxonomy_to_json)
from taxonomist.train.head_warmup import check_head_warmup, freeze_bn_stats, head_warmup_reason, warm_up_head
from taxonomist.train.progress import training_plan
from taxonomist.train.step import lr_lambda
from taxonomist.utils.files import atomic_write_text
from taxonomist.utils.run_status import update_status

METRICS_CSV_COLUMNS = ["epoch", "train_loss", "train_top1", "train_macro_f1", "val_loss", "val_top1", "val_mhd",
                       "val_macro_f1", "lr", "img_s", "seconds"]
MONITORS = {"val_mhd": "min", "val_loss": "min", "val_macro_f1": "max"}


@dataclass
class TrainResult:
    run_dir: Path
    best_epoch: int
    best_metric: float
    monitor: str
    history: list[dict]
    skipped_images: list
    warmup_metrics: dict | None = None   #: val metrics of the warmed-up head (best_epoch 0 when nothing beat it)


def seed_everything(seed: int) -> None:
    import torch
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _context_scale(rows, uses_context: bool) -> str | None:
    """The context scale a context-using model saw ("3", "full", … from `data prepare`'s `context/<scale>/`
    paths), so that `taxonomist serve` can cut the same context from a frame and a box; None when unknown."""
    from taxonomist.data.coco import context_scale

    if not uses_context or "context_path" not in rows.columns:
        return None
    return context_scale(rows["context_path"].tolist())


def is_run_dir(folder: str | Path) -> bool:
    """True for a taxonomist run directory: RUN/run.json (written since the run status existed), or for runs of
    older versions a checkpoint in RUN/checkpoints (`*.safetensors` with its `.json`)."""
    from taxonomist.utils.run_status import read_status

    folder = Path(folder)
    if read_status(folder):
        return True
    ckpts = folder / "checkpoints"
    return ckpts.is_dir() and any(p.with_suffix(".json").is_file() for p in ckpts.glob("*.safetensors"))


def check_run_out(cfg: Config, resume: bool = False, force: bool = False, kfold: bool = False) -> Path:
    """Refuse an `out` that training must not write into, before anything is read or written; return it.

    Refused always: an empty `out` (it would be the current folder), a filesystem root, a file, and a folder whose
    files training would overwrite that are its own inputs (the dataset's annotations.csv or taxonomy.csv, the
    data.taxonomy file). Refused unless `resume` or `force`: a folder that exists, is not empty and is not a
    taxonomist run (`is_run_dir`; with `kfold`, one of its `fold_K` runs counts too).
    """
    text = str(cfg.out or "").strip()
    if not text:
        raise ConfigError("out is empty: give the run directory, e.g. --set out=runs/first (an empty out would "
                          "train into the current folder)")
    out = Path(text).expanduser()
    resolved = out.resolve()
    if resolved.parent == resolved:
        raise ConfigError(f"out={text}: a filesystem root cannot be a run directory; give a folder such as runs/first")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={text}: is a file, not a folder; give the run directory")
    written = {resolved / name for name in ("config.yaml", "taxonomy.csv", "metrics.csv", "metrics.json",
                                            "predictions.csv", "report.html", "run.json", "errors.log")}
    if cfg.data.root and Path(cfg.data.root).expanduser().resolve() == resolved:
        raise ConfigError(f"out={text} is the dataset folder data.root={cfg.data.root}: training would write its "
                          "taxonomy.csv and config.yaml among the dataset's files; give another run directory")
    tax = Path(cfg.data.taxonomy).expanduser() if cfg.data.taxonomy not in ("", "fathomnet2025") else None
    if tax is not None and tax.resolve() in written:
        raise ConfigError(f"out={text}: training would write over its own input data.taxonomy={cfg.data.taxonomy}; "
                          "give another run directory")
    if resume or force or not out.is_dir() or not any(out.iterdir()):
        return out
    if is_run_dir(out) or (kfold and any(is_run_dir(f) for f in out.glob("fold_*"))):
        return out
    raise ConfigError(f"out={text} exists, is not empty and is not a taxonomist run (no run.json or checkpoints); "
                      "training would write config.yaml, taxonomy.csv and report.html among its files — choose "
                      "another out, or pass --force to write into it")


@dataclass
class TrainingRun:
    """What the stages of `train()` share: the config, the process, the data, the model and its optimiser, and
    the state that a resume restores (epoch, best metric, history). Callbacks receive it."""
    cfg: Config
    log: Callable[[str], object]
    resume: bool
    world: int
    rank: int
    device: Any
    dataset: Any
    taxonomy: Any
    D: np.ndarray                     #: label × label distances of the decision metric (val MHD)
    train_rows: Any
    train_ds: Any
    val_ds: Any
    train_loader: Any
    val_loader: Any
    sampler: Any                      #: the DistributedSampler under torchrun, else None
    model: Any
    train_model: Any                  #: what runs forward: the model, compiled and/or DDP-wrapped
    criterion: Any
    optimizer: Any
    scheduler: Any
    ema: Any
    train_step: Any                   #: `train.step.TrainStep`
    warm: bool                        #: the head was warmed up (LP-FT) before fine-tuning
    base_meta: dict = dataclasses.field(default_factory=dict)  #: checkpoint metadata shared by every epoch
    start_epoch: int = 0
    global_step: int = 0
    best: float = math.inf            #: sign × monitor of the best epoch (lower is better)
    best_epoch: int = -1
    stale: int = 0                    #: epochs since the monitor last improved
    history: list = dataclasses.field(default_factory=list)
    warm_metrics: dict | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.out)

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def resume_file(self) -> Path:
        return self.ckpt_dir / "last.state.pt"

    @property
    def sign(self) -> float:
        return 1.0 if MONITORS[self.cfg.train.monitor] == "min" else -1.0

    @property
    def amp(self) -> bool:
        return self.cfg.train.amp and self.device.type == "cuda"

    @property
    def eval_model(self):
        """The weights validated and saved: the EMA's when there is one."""
        return self.ema.module if self.ema is not None else self.model


def train(cfg: Config, progress: bool = True, resume: bool = False, log=print, on_epoch=None,
          force: bool = False, callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Train a model as `cfg` says and write the run directory of DESIGN.md (config, taxonomy, checkpoints,
    metrics.csv). Evaluation files (metrics.json, predictions.csv) are written by `taxonomist.evaluate`.

    `out` must be new, empty or a taxonomist run (`check_run_out`); `force` lets training write into another
    existing folder (never over the dataset's own files), `resume` continues the run there.

    `callbacks` (`train.callbacks.Callback`) watch training on rank 0, after the progress output, TensorBoard
    and W&B; one may stop training after an epoch. `on_epoch(epoch, row)` is the short form of a callback
    (`EpochHook`): called after each epoch's checkpoints and metrics.csv row are written; an exception it raises
    (e.g. a sweep pruning the trial) stops training and propagates, leaving a run that `resume=True` continues.
    """
    check_train_config(cfg)
    # every rank checks before the process group forms, so that no rank sees rank 0's first files
    check_run_out(cfg, resume=resume, force=force)
    hooks = CallbackList(standard_callbacks(progress, log) + list(callbacks)
                         + ([EpochHook(on_epoch)] if on_epoch is not None else []))
    run = None
    try:
        run = prepare_run(cfg, progress=progress, resume=resume, log=log)
        hooks.on_train_start(run)
        if run.warm and not resume:
            validate_warmed_head(run)
        for epoch in range(run.start_epoch, cfg.train.epochs):
            trained = train_epoch(run, epoch, hooks)
            row = epoch_row(run, epoch, trained, validate(run))
            improved = record_epoch(run, row)
            if run.is_main:
                save_epoch(run, row, improved)
                log(epoch_line(run, row, improved))
            if everyone_agrees(hooks.on_epoch_end(run, row), run.world):
                if run.is_main:
                    log(f"training stopped by a callback after epoch {row['epoch']}/{cfg.train.epochs}")
                break
            if trained.out_of_steps:
                break
            if cfg.train.patience and run.stale >= cfg.train.patience:
                if run.is_main:
                    log(f"early stopping: {cfg.train.monitor} did not improve for {run.stale} epochs")
                break
    finally:  # the one cleanup, whether training finished, stopped or failed
        if run is not None:
            for loader in (run.train_loader, run.val_loader):
                loader.close()
            hooks.on_train_end(run)
    return finish_training(run)


def check_train_config(cfg: Config) -> None:
    """Refuse a config `train` cannot run, before anything is read or written."""
    if cfg.train.monitor not in MONITORS:
        raise ConfigError(f"train.monitor {cfg.train.monitor!r}: choose one of {', '.join(MONITORS)}")
    check_head_warmup(cfg.train.head_warmup)
    freeze_bn_stats(cfg, False)  # checks the value
    if cfg.train.scheduler not in ("cosine", "plateau", "constant"):
        raise ConfigError(f"train.scheduler {cfg.train.scheduler!r}: choose cosine, plateau or constant")
    if cfg.train.epochs < 1 or cfg.train.batch_size < 1 or cfg.train.accumulate < 1:
        raise ConfigError("train.epochs, train.batch_size and train.accumulate must be at least 1")
    if not cfg.data.root:
        raise ConfigError("data.root is not set: pass --set data.root=DATASET_DIR (or data: {root: …} in the YAML)")
    check_preset(cfg.augment.preset)


def prepare_run(cfg: Config, *, progress: bool, resume: bool, log) -> TrainingRun:
    """Everything before the first epoch: the process (device, DDP, seeds, threads), the data and its split, the
    loaders, the model, loss, head warm-up, optimiser and schedule, the run directory's config.yaml, taxonomy.csv
    and run.json, and with `resume` the state of the last finished epoch."""
    import torch

    from taxonomist.data.loading import TaxonDataset, build_loader, build_transforms, class_counts
    from taxonomist.losses import build_loss
    from taxonomist.models import build_model, model_metadata
    from taxonomist.train.step import TrainStep, build_optimizer

    world, rank, local_rank = distributed_info()
    is_main = rank == 0
    device = select_device(cfg.train.device)
    if world > 1:
        import torch.distributed as dist
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    seed_everything(cfg.train.seed + rank)
    threads = configure_threads(cfg.train.threads, device, cfg.data.num_workers)

    # ---- data and taxonomy
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = load_dataset(cfg.data.root, cfg.data.taxonomy or None)
    for w in caught:
        if is_main:
            log(f"warning: {w.message}")
    if not dataset.labels:
        raise DataError(f"{dataset.root}: no labelled rows to train on")
    taxonomy = dataset.taxonomy
    train_rows, val_rows = split_rows(dataset, cfg)
    if train_rows.empty or val_rows.empty:
        raise DataError(f"{dataset.root}: need both training and validation rows "
                        f"(got {len(train_rows)} train, {len(val_rows)} val)")
    # the model predicts the labels of its training and validation rows: held-out (`ood`, test-only) taxa
    # get no output. Every fold of a K-fold split sees the same labels, so their outputs line up.
    pool = trainable_labels(dataset)
    taxonomy = taxonomy.with_labels([lab for lab in taxonomy.labels if lab in pool])
    metric = default_metric(taxonomy) if cfg.decide.metric == "auto" else cfg.decide.metric
    labels = list(taxonomy.labels)
    label_index = {lab: i for i, lab in enumerate(labels)}
    D = distance_matrix(taxonomy, metric, labels, labels)

    run_dir = Path(cfg.out)
    ckpt_dir = run_dir / "checkpoints"
    resume_file = ckpt_dir / "last.state.pt"
    if is_main:
        # the resume state is written last in an epoch: a kill right after the first last.safetensors leaves a
        # run that cannot be resumed, and starting it again must not be refused
        if not resume and resume_file.exists():
            raise ConfigError(f"{run_dir}: already holds a run; pass --resume to continue it or choose another --out")
        if resume:  # before config.yaml is rewritten: a resume with another model or data must not touch the run
            check_resume_config(run_dir, _model_config_dict(cfg), taxonomy)
    if is_main:  # before the model's weights load: a log shows at once what runs, on what, into where
        log(training_plan(cfg, dataset.root, train_rows, len(val_rows), len(labels), device, threads, world))
    # augmentation strength from augment.preset and the budget, once; config.yaml records the resolved values
    budget = {"epochs": cfg.train.epochs, "train_images": len(train_rows),
              "saved": saved_augment(run_dir) if resume else None}
    if is_main:
        log(describe_augment(cfg.augment, **budget))
    cfg = dataclasses.replace(cfg, augment=resolve_augment(cfg.augment, **budget))

    # ---- model, datasets and loaders
    model = build_model(cfg.model, taxonomy, cfg.data.image_size)
    pre = model.preprocessing
    two_stream = cfg.model.head == "two_stream"
    if two_stream and "context_path" not in dataset.annotations.columns:
        raise DataError(f"{dataset.root}: model.head=two_stream needs a context_path column in annotations.csv")
    train_tf = build_transforms(cfg, True, pre["mean"], pre["std"], pre.get("interpolation", "bicubic"))
    eval_tf = build_transforms(cfg, False, pre["mean"], pre["std"], pre.get("interpolation", "bicubic"))
    cache = None
    if cfg.data.cache:
        from taxonomist.data.cache import ResizedCache, default_cache_size
        size = default_cache_size(cfg.data.image_size, cfg.augment.crop_pct)
        if is_main:  # one process decodes; the others map the finished file
            # the eval transform's interpolation: small images (PlanktonSet's median side is 54 px) are
            # upscaled here, and evaluation without the cache must see the same pixels training saw
            ResizedCache.build(dataset, dataset.annotations, cfg.data.cache, size=size, resize=cfg.data.resize,
                               interpolation=pre.get("interpolation", "bicubic"), progress=progress)
        if world > 1:
            import torch.distributed as dist
            dist.barrier()
        cache = ResizedCache.open(cfg.data.cache)
    input_col = "context_path" if (cfg.data.input == "context" and not two_stream) else "path"
    train_ds = TaxonDataset(dataset, train_rows, train_tf, context_transform=train_tf if two_stream else None,
                            with_context=two_stream, strict=cfg.data.strict, cache=cache, label_index=label_index,
                            path_column=input_col)
    val_ds = TaxonDataset(dataset, val_rows, eval_tf, context_transform=eval_tf if two_stream else None,
                          with_context=two_stream, strict=cfg.data.strict, cache=cache, label_index=label_index,
                          path_column=input_col)
    sampler = None
    if world > 1:
        from torch.utils.data.distributed import DistributedSampler
        sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=cfg.train.seed,
                                     drop_last=True)
    train_loader = build_loader(train_ds, cfg.train.batch_size, train=True, num_workers=cfg.data.num_workers,
                                seed=cfg.train.seed, sampler=sampler)
    val_loader = build_loader(val_ds, cfg.train.batch_size, train=False, num_workers=cfg.data.num_workers,
                              seed=cfg.train.seed)
    if len(train_loader) == 0:
        raise DataError(f"{dataset.root}: {len(train_rows)} training rows make no full batch of "
                        f"{cfg.train.batch_size}; lower train.batch_size")
    counts = class_counts(train_rows, label_index)
    criterion = build_loss(cfg.loss, taxonomy, D, counts).to(device)

    # ---- head warm-up, optimiser, schedule, EMA, MixUp, the step
    model.to(device)
    if cfg.train.channels_last and device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    warm, why = head_warmup_reason(cfg, model.pretrained_source, cfg.model.head)
    model.freeze_norm_stats = freeze_bn_stats(cfg, warm)
    if warm and not resume:  # LP-FT: the head first, on the frozen features; a resumed run has its head already
        seed_everything(cfg.train.seed + rank)
        # the training rows as the val rows are read: evaluation transforms, no augmentation
        warm_loader = build_loader(TaxonDataset(dataset, train_rows, eval_tf, strict=cfg.data.strict, cache=cache,
                                                label_index=label_index, path_column=input_col),
                                   cfg.train.batch_size, train=False, num_workers=cfg.data.num_workers,
                                   seed=cfg.train.seed)
        done = warm_up_head(model, warm_loader, criterion, device, cfg.train.head_warmup_epochs,
                            seed=cfg.train.seed, amp=cfg.train.amp and device.type == "cuda")
        warm_loader.close()
        if is_main:
            log(done.summary())
    elif not warm and is_main and cfg.train.head_warmup == "auto" and progress:
        log(f"head warm-up skipped: {why}")
    # from a warmed-up head, fine-tuning moves the pretrained features gently (LP-FT's smaller rate)
    optimizer = build_optimizer(model, cfg, lr_scale=cfg.train.head_warmup_lr_scale if warm else 1.0)
    steps_per_epoch = max(1, len(train_loader) // cfg.train.accumulate)
    if cfg.train.scheduler == "plateau":
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=MONITORS[cfg.train.monitor],
                                                               factor=0.5, patience=1)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, steps_per_epoch))
    ema = None
    if cfg.train.ema:
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(model, decay=cfg.train.ema_decay)
    mixup = None
    if cfg.augment.mixup > 0 or cfg.augment.cutmix > 0:
        from timm.data import Mixup
        mixup = Mixup(mixup_alpha=cfg.augment.mixup, cutmix_alpha=cfg.augment.cutmix, label_smoothing=0.0,
                      num_classes=len(labels))
    train_model = model
    if cfg.train.compile:
        train_model = torch.compile(model)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel
        train_model = DistributedDataParallel(train_model, device_ids=[device] if device.type == "cuda" else None,
                                              find_unused_parameters=cfg.model.head != "flat")
    # the step the benchmark times too (train/step.py): forward, loss, backward, clip, AdamW, scheduler, EMA
    train_step = TrainStep.from_config(cfg, model, criterion, optimizer, device, train_model=train_model,
                                       scheduler=None if cfg.train.scheduler == "plateau" else scheduler,
                                       ema=ema, mixup=mixup)

    if is_main:  # written once every part of the config has been checked: a rejected config leaves no run behind
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())
        # a (re)started training makes the steps after it due again
        update_status(run_dir, status="training", epochs=cfg.train.epochs, steps=None, failed_step=None,
                      error=None, redo=None)
        write_taxonomy(taxonomy, run_dir / "taxonomy.csv")

    run = TrainingRun(cfg=cfg, log=log, resume=resume, world=world, rank=rank, device=device, dataset=dataset,
                      taxonomy=taxonomy, D=D, train_rows=train_rows, train_ds=train_ds, val_ds=val_ds,
                      train_loader=train_loader, val_loader=val_loader, sampler=sampler, model=model,
                      train_model=train_model, criterion=criterion, optimizer=optimizer, scheduler=scheduler,
                      ema=ema, train_step=train_step, warm=warm)
    if resume:
        load_resume(run)
    run.base_meta = {
        "labels": labels, "taxonomy": taxonomy_to_json(taxonomy), "taxonomy_hash": taxonomy.hash,
        "backbone": cfg.model.backbone, "head": cfg.model.head, "image_size": cfg.data.image_size,
        "preprocessing": pre, "model_config": _model_config_dict(cfg), "metric": metric,
        "model": model_metadata(model),
        "data": {"resize": cfg.data.resize, "grayscale": cfg.data.grayscale, "crop_pct": cfg.augment.crop_pct,
                 "input": input_col, "context": _context_scale(train_rows, two_stream or input_col == "context_path")},
        "monitor": cfg.train.monitor,
    }
    if cfg.loss.class_weights == "none":  # a class-weighted loss learns a flatter prior: the card says uniform
        run.base_meta["label_prior"] = [round(float(c) / float(counts.sum()), 8) for c in counts]
    return run


def load_resume(run: TrainingRun) -> None:
    """Continue after the last finished epoch: weights, optimiser, schedule, EMA, step count, best and history."""
    state = load_resume_state(run.resume_file)
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if run.ema is not None and state.get("ema") is not None:
        run.ema.load_state_dict(state["ema"])
    run.start_epoch, run.global_step = state["epoch"] + 1, state["global_step"]
    run.best, run.best_epoch, run.stale, run.history = (state["best"], state["best_epoch"], state["stale"],
                                                        state["history"])
    if run.is_main:
        run.log(f"resuming {run.run_dir} after epoch {state['epoch'] + 1}/{run.cfg.train.epochs}")


def validate_warmed_head(run: TrainingRun) -> None:
    """The warmed-up head alone is a candidate too: it stays the best checkpoint unless an epoch beats it on
    val, so a short fine-tuning budget never ends below the linear probe it started from."""
    metrics = validate(run, run.model)
    run.warm_metrics = metrics
    run.best, run.best_epoch = run.sign * metrics[run.cfg.train.monitor], 0
    if run.is_main:
        save_checkpoint(run.ckpt_dir / "best.safetensors", run.model, {**run.base_meta, "epoch": 0, "metrics": metrics})
        update_status(run.run_dir, warm_up=metrics)
        run.log(f"warmed-up head on val: top-1 {metrics['val_top1']:.3f}  MHD {metrics['val_mhd']:.3f} "
                "(the best checkpoint until an epoch beats it)")


@dataclass
class EpochTraining:
    """What one pass over the training batches measured."""
    started: float      #: time.time() at the epoch's start
    seconds: float      #: training batches only (img/s)
    seen: int
    loss_sum: float
    preds: Any          #: argmax of the logits, per image
    targets: Any
    out_of_steps: bool  #: train.max_steps reached within the epoch


def train_epoch(run: TrainingRun, epoch: int, hooks: CallbackList) -> EpochTraining:
    """One pass over the training batches (0-based `epoch`), reseeded so that a resumed run replays exactly the
    same batches and augmentations."""
    import torch

    cfg = run.cfg
    seed_everything(cfg.train.seed * 1000 + epoch * 10 + run.rank)
    if run.sampler is not None:
        run.sampler.set_epoch(epoch)
    generator = run.train_loader.generator
    if hasattr(generator, "manual_seed") and generator is not None:
        generator.manual_seed(cfg.train.seed * 1000 + epoch)
    run.train_model.train()
    t0, seen, loss_sum, preds, targets = time.time(), 0, 0.0, [], []
    hooks.on_epoch_start(run, epoch)
    run.train_step.zero_grad()
    out_of_steps = False
    batches = len(run.train_loader)
    asked = time.perf_counter()
    for step, batch in enumerate(run.train_loader):
        waited = time.perf_counter() - asked
        out = run.train_step(batch, step, run.global_step)
        if out.updated:
            run.global_step += 1
        seen += out.n
        loss_sum += float(out.loss) * out.n
        preds.append(out.outputs["logits"].detach().argmax(1).cpu())
        targets.append(out.target.cpu())
        hooks.on_batch_end(run, BatchEnd(epoch, step, batches, seen, loss_sum, time.time() - t0, waited, out))
        if cfg.train.max_steps and run.global_step >= cfg.train.max_steps:
            out_of_steps = True
            break
        asked = time.perf_counter()
    seconds = time.time() - t0
    if run.world > 1:
        import torch.distributed as dist
        dist.barrier()
    return EpochTraining(t0, seconds, seen, loss_sum, torch.cat(preds).numpy(), torch.cat(targets).numpy(),
                         out_of_steps)


def validate(run: TrainingRun, model=None) -> dict:
    """The val columns of metrics.csv for `model` (default: the weights that are saved, the EMA's if any)."""
    from taxonomist.inference.forward import run_inference

    val = run_inference(model if model is not None else run.eval_model, run.val_loader, run.device, amp=run.amp,
                        progress=False, criterion=run.criterion)
    return _val_metrics(val, run.D)


def epoch_row(run: TrainingRun, epoch: int, trained: EpochTraining, val: dict) -> dict:
    """The metrics.csv row of 0-based `epoch` (the columns of METRICS_CSV_COLUMNS, in that order)."""
    from taxonomist.decide.scores import macro_f1

    p, t = trained.preds, trained.targets
    return {
        "epoch": epoch + 1,
        "train_loss": trained.loss_sum / max(1, trained.seen),
        "train_top1": float((p == t).mean()),
        "train_macro_f1": macro_f1(t, p),
        **val,
        "lr": max(g["lr"] for g in run.optimizer.param_groups),  # the head's rate under layer decay
        "img_s": trained.seen * run.world / max(trained.seconds, 1e-9),
        "seconds": time.time() - trained.started,
    }


def record_epoch(run: TrainingRun, row: dict) -> bool:
    """Add the epoch to the history, step a plateau schedule, track the best epoch; True when it improved."""
    run.history.append(row)
    if run.cfg.train.scheduler == "plateau":
        run.scheduler.step(row[run.cfg.train.monitor])
    improved = run.sign * row[run.cfg.train.monitor] < run.best
    if improved:
        run.best, run.best_epoch, run.stale = run.sign * row[run.cfg.train.monitor], row["epoch"], 0
    else:
        run.stale += 1
    return improved


def save_epoch(run: TrainingRun, row: dict, improved: bool) -> None:
    """Write the epoch (rank 0): best/epoch_N/last checkpoints, metrics.csv, then the resume state — last, so
    that a run killed at any moment resumes from a complete epoch."""
    meta = {**run.base_meta, "epoch": row["epoch"], "metrics": row}
    weights, ckpt_dir = run.eval_model, run.ckpt_dir
    if improved:
        save_checkpoint(ckpt_dir / "best.safetensors", weights, meta)
    if run.cfg.train.save_every and row["epoch"] % run.cfg.train.save_every == 0:
        save_checkpoint(ckpt_dir / f"epoch_{row['epoch']}.safetensors", weights, meta)
    save_checkpoint(ckpt_dir / "last.safetensors", weights, meta)
    _write_metrics_csv(run.run_dir / "metrics.csv", run.history)
    save_resume_state(run.resume_file, {
        "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(), "ema": run.ema.state_dict() if run.ema is not None else None,
        "epoch": row["epoch"] - 1, "global_step": run.global_step, "best": run.best, "best_epoch": run.best_epoch,
        "stale": run.stale, "history": run.history,
    })


def epoch_line(run: TrainingRun, row: dict, improved: bool) -> str:
    """The log line of an epoch; `*` marks a new best."""
    return (f"epoch {row['epoch']}/{run.cfg.train.epochs}  train loss {row['train_loss']:.3f}  "
            f"val loss {row['val_loss']:.3f}  top-1 {row['val_top1']:.3f}  MHD {row['val_mhd']:.3f}  "
            f"macro-F1 {row['val_macro_f1']:.3f}  {row['img_s']:.0f} img/s" + ("  *" if improved else ""))


def everyone_agrees(stop: bool, world: int) -> bool:
    """Rank 0's decision to stop, shared with every process of a torchrun job (callbacks run on rank 0 only)."""
    if world == 1:
        return stop
    import torch.distributed as dist
    decision = [stop]
    dist.broadcast_object_list(decision, src=0)
    return bool(decision[0])


def finish_training(run: TrainingRun) -> TrainResult:
    """After a finished (or stopped) training: wait for every process, warn about skipped images, mark run.json
    "trained" and return the result."""
    if run.world > 1:
        import torch.distributed as dist
        dist.barrier()
    skipped = list(getattr(run.train_ds, "skipped", [])) + list(getattr(run.val_ds, "skipped", []))
    if skipped and run.is_main:
        run.log(f"warning: {len(skipped)} unreadable image(s) were skipped, e.g. {skipped[0]}")
    cfg = run.cfg
    if run.is_main:
        update_status(run.run_dir, status="trained", epochs=cfg.train.epochs, epochs_trained=len(run.history),
                      best_epoch=run.best_epoch, monitor=cfg.train.monitor, best_metric=run.sign * run.best)
    return TrainResult(run.run_dir, run.best_epoch, run.sign * run.best, cfg.train.monitor, run.history, skipped,
                       run.warm_metrics)


def _val_metrics(val, D: np.ndarray) -> dict:
    """The val columns of metrics.csv from one pass over the val rows (`run_inference` with a criterion)."""
    from taxonomist.decide.scores import macro_f1
    vp = val.logits.argmax(1)
    return {"val_loss": val.loss, "val_top1": float((vp == val.targets).mean()),
            "val_mhd": float(D[val.targets, vp].mean()),
            "val_macro_f1": macro_f1(val.targets, vp)}


def _model_config_dict(cfg: Config) -> dict:
    return cfg.to_dict()["model"]


def _write_metrics_csv(path: Path, history: list[dict]) -> None:
    import io
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=METRICS_CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for row in history:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())


def load_history(run_dir: str | Path) -> list[dict]:
    """metrics.csv of a run as a list of dicts with float values."""
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
