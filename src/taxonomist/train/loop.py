"""The training loop: one readable function from a Config to a run directory.

AdamW + warmup/cosine (or plateau), gradient accumulation and clipping, bf16 autocast on CUDA, EMA,
MixUp/CutMix, model selection on validation mean hierarchical distance, early stopping, resumable at
epoch boundaries, DDP through torchrun (rank 0 writes).
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from taxonomist.config import Config
from taxonomist.data.augment_presets import check_preset, describe_augment, resolve_augment, saved_augment
from taxonomist.data.dataset import Dataset, load_dataset
from taxonomist.errors import ConfigError, DataError
from taxonomist.taxonomy import default_metric, distance_matrix, write_taxonomy
from taxonomist.train.checkpoint import (check_resume_config, load_resume_state, save_checkpoint,
                                         save_resume_state, taxonomy_to_json)
from taxonomist.train.head_warmup import check_head_warmup, freeze_bn_stats, head_warmup_reason, warm_up_head
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


def select_device(name: str = "auto"):
    """`auto` picks cuda, then mps, then cpu; an explicit device that is absent is an error."""
    import torch
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available (use auto or cpu)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("train.device=mps but MPS is not available (use auto or cpu)")
    if name not in ("cpu", "cuda", "mps") and not name.startswith("cuda:"):
        raise ConfigError(f"unknown train.device {name!r}; use auto, cpu, cuda or mps")
    return torch.device(name)


#: share of one core a loader worker keeps busy while the model trains on the CPU: a worker decodes and
#: augments an image in a few ms against tens of ms of model time (docs/performance.md, "The CPU thread
#: policy"), so it never needs a whole core of its own; torch keeps the rest.
LOADER_CORE_SHARE = 0.5


def cpu_threads_for(cores: int, workers: int, world: int = 1, busy: int = 0) -> int:
    """Intra-op threads that leave the loader workers the cores they actually use, and other programs the
    cores they are busy on: cores − ⌊workers × share⌋ − busy, at least one.

    A worker needs a fraction of a core (`LOADER_CORE_SHARE`); reserving a whole core for it left half of a
    2-core machine idle (Lite0 at 224 px trained at 7.5 img/s with 1 thread, 13.8 img/s with 2 beside the
    worker). A core another program keeps busy is worse than idle for an OpenMP thread: the thread that loses
    it holds up the others at every barrier (docs/performance.md).

    >>> cpu_threads_for(2, 1), cpu_threads_for(4, 3), cpu_threads_for(16, 8), cpu_threads_for(1, 0)
    (2, 3, 12, 1)
    >>> cpu_threads_for(16, 4, world=2)  # two processes on one machine share its cores
    6
    >>> cpu_threads_for(2, 1, busy=1)  # another program is running on one of the two cores
    1
    """
    per_process = max(1, cores // max(1, world))
    return max(1, per_process - int(workers * LOADER_CORE_SHARE) - max(0, busy))


def busy_cores(samples: int = 5, interval: float = 0.02) -> int:
    """Cores other programs keep busy right now: the median count of runnable tasks in /proc/loadavg over a
    few samples, minus this one. 0 where /proc/loadavg is missing (macOS, Windows).

    The instantaneous count, not the load average: the 1-minute average still counts a process that ended
    seconds ago (the previous run of a script), and would cost the next run its threads.
    """
    import statistics
    import time

    counts = []
    for i in range(samples):
        try:
            with open("/proc/loadavg") as f:
                counts.append(int(f.read().split()[3].split("/")[0]))
        except (OSError, ValueError, IndexError):
            return 0
        if i + 1 < samples:
            time.sleep(interval)
    return max(0, int(statistics.median(counts)) - 1)


def configure_threads(threads: int, device, num_workers: int) -> int:
    """CPU intra-op threads for training and inference: `threads` when set, else `cpu_threads_for` this
    machine, its loader workers and the cores other programs are busy on (`busy_cores`) at the start.

    On a dedicated 2-core machine that is 2 threads beside one loader worker; while another program runs, 1.
    OMP_NUM_THREADS, when the user set it, wins over the automatic choice.
    """
    import torch
    from taxonomist.data.loading import auto_num_workers
    if device.type != "cpu":
        return torch.get_num_threads()
    tune_cpu_allocator()
    if threads > 0:
        torch.set_num_threads(threads)
    elif "OMP_NUM_THREADS" not in os.environ:
        workers = auto_num_workers() if num_workers < 0 else num_workers
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        torch.set_num_threads(cpu_threads_for(cores, workers, world, busy_cores()))
    return torch.get_num_threads()


def tune_cpu_allocator() -> None:
    """Keep large CPU tensors from being page-faulted in again at every step (Linux).

    glibc serves blocks above its mmap threshold with fresh mmaps and returns them on free, so every
    forward/backward re-faults its activations: EfficientNet-Lite0 at 224 px, batch 32, one thread spent a
    third of each training step in the kernel (3.5 M minor faults per 3 steps). Transparent huge pages for
    torch's large allocations (`THP_MEM_ALLOC_ENABLE`, read at the first large allocation; the user's value
    wins) and a higher mmap/trim threshold cut the faults ~25× and raised training from 5.7 to 6.9 img/s
    (docs/performance.md). Numerics are unchanged; freed memory up to the trim threshold stays mapped.
    """
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 * 2 ** 20)   # M_MMAP_THRESHOLD: blocks up to 32 MB come from the heap and are reused
        libc.mallopt(-1, 512 * 2 ** 20)  # M_TRIM_THRESHOLD: keep up to 512 MB of freed heap mapped
    except (OSError, AttributeError):    # not glibc (musl, …): nothing to tune
        pass


def seed_everything(seed: int) -> None:
    import torch
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def split_rows(dataset: Dataset, cfg: Config):
    """Training and validation rows: the `split` column, a `fold` column with data.fold, or a seeded
    stratified split of the labelled rows."""
    frame = dataset.annotations
    frame = frame[frame["label"] != ""]
    fold = cfg.data.fold
    if fold < 0 and "fold" in frame.columns and not ("split" in frame.columns and (frame["split"] == "val").any()):
        # a K-fold dataset has no val rows: validate on its first fold unless told otherwise
        values = sorted({int(v) for v in frame["fold"] if v not in ("", "-1")})
        if values:
            fold = values[0]
            warnings.warn(f"{dataset.root}: no val rows; validating on fold {fold} (set data.fold, or train "
                          "every fold with --kfold)", stacklevel=2)
    if fold >= 0:
        cfg = copy.deepcopy(cfg)
        cfg.data.fold = fold
        if "fold" not in frame.columns:
            raise DataError(f"{dataset.root}: data.fold={cfg.data.fold} but annotations.csv has no 'fold' column; "
                            "run `taxonomist data split --folds K`")
        in_folds = frame[frame["fold"] != ""]
        if "split" in frame.columns:
            in_folds = in_folds[in_folds["split"].isin(["train", "val", ""])]
        val = in_folds[in_folds["fold"] == str(cfg.data.fold)]
        if val.empty:
            raise DataError(f"{dataset.root}: fold {cfg.data.fold} has no rows")
        return in_folds[in_folds["fold"] != str(cfg.data.fold)], val
    if "split" in frame.columns and (frame["split"] == "train").any():
        train, val = frame[frame["split"] == "train"], frame[frame["split"] == "val"]
        if val.empty:
            raise DataError(f"{dataset.root}: annotations.csv has a split column but no 'val' rows")
        return train, val
    rng = np.random.default_rng(cfg.train.seed)
    val_idx = []
    for _, group in frame.groupby("label", sort=True):
        n_val = int(round(len(group) * cfg.data.val_fraction))
        if len(group) >= 2:
            n_val = min(max(n_val, 1), len(group) - 1)
        else:
            n_val = 0
        val_idx.extend(rng.choice(group.index.to_numpy(), size=n_val, replace=False).tolist())
    val = frame.loc[sorted(val_idx)]
    return frame.drop(index=val_idx), val


def trainable_labels(dataset: Dataset) -> set[str]:
    """Labels of the rows that training may see (every split but `test` and `ood`)."""
    frame = dataset.annotations
    frame = frame[frame["label"] != ""]
    if "split" in frame.columns:
        frame = frame[~frame["split"].isin(["test", "ood"])]
    return set(frame["label"])


def _distributed():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))


def _context_scale(rows, uses_context: bool) -> str | None:
    """The context scale a context-using model saw ("3", "full", … from `data prepare`'s `context/<scale>/`
    paths), so that `taxonomist serve` can cut the same context from a frame and a box; None when unknown."""
    from taxonomist.data.coco import context_scale

    if not uses_context or "context_path" not in rows.columns:
        return None
    return context_scale(rows["context_path"].tolist())


def _lr_lambda(cfg: Config, steps_per_epoch: int):
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


def train(cfg: Config, progress: bool = True, resume: bool = False, log=print, on_epoch=None,
          force: bool = False) -> TrainResult:
    """Train a model as `cfg` says and write the run directory of DESIGN.md (config, taxonomy, checkpoints,
    metrics.csv). Evaluation files (metrics.json, predictions.csv) are written by `taxonomist.evaluate`.

    `out` must be new, empty or a taxonomist run (`check_run_out`); `force` lets training write into another
    existing folder (never over the dataset's own files), `resume` continues the run there.

    `on_epoch(epoch, row)`, when given, is called on rank 0 after each epoch's checkpoints and metrics.csv row
    are written (`row`: that row as a dict); an exception it raises (e.g. a sweep pruning the trial) stops
    training and propagates, leaving a run directory that `resume=True` can continue.
    """
    import torch

    from taxonomist.data.loading import TaxonDataset, build_loader, build_transforms, class_counts
    from taxonomist.losses import build_loss
    from taxonomist.models import build_model, model_metadata
    from taxonomist.train.inference import run_inference
    from taxonomist.train.step import TrainStep, build_optimizer

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

    # every rank checks before the process group forms, so that no rank sees rank 0's first files
    check_run_out(cfg, resume=resume, force=force)
    world, rank, local_rank = _distributed()
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
    configure_threads(cfg.train.threads, device, cfg.data.num_workers)

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
    # augmentation strength from augment.preset and the budget, once; config.yaml records the resolved values
    budget = {"epochs": cfg.train.epochs, "train_images": len(train_rows),
              "saved": saved_augment(run_dir) if resume else None}
    if is_main:
        log(describe_augment(cfg.augment, **budget))
    cfg = dataclasses.replace(cfg, augment=resolve_augment(cfg.augment, **budget))

    # ---- model, loss, optimiser
    model = build_model(cfg.model, taxonomy, cfg.data.image_size)
    pre = model.preprocessing
    two_stream = cfg.model.head == "two_stream"
    if two_stream and "context_path" not in dataset.annotations.columns:
        raise DataError(f"{dataset.root}: model.head=two_stream needs a context_path column in annotations.csv")
    train_tf = build_transforms(cfg, True, pre["mean"], pre["std"], pre.get("interpolation", "bicubic"))
    eval_tf = build_transforms(cfg, False, pre["mean"], pre["std"], pre.get("interpolation", "bicubic"))
    cache = None
    if cfg.data.cache:
        from taxonomist.data.loading import ResizedCache, default_cache_size
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
    eval_criterion = criterion

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
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, steps_per_epoch))
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
    amp = cfg.train.amp and device.type == "cuda"
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

    # ---- state
    start_epoch, global_step = 0, 0
    sign = 1.0 if MONITORS[cfg.train.monitor] == "min" else -1.0
    best, best_epoch, stale = math.inf, -1, 0
    history: list[dict] = []
    if resume:
        state = load_resume_state(resume_file)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        start_epoch, global_step = state["epoch"] + 1, state["global_step"]
        best, best_epoch, stale, history = state["best"], state["best_epoch"], state["stale"], state["history"]
        if is_main:
            log(f"resuming {run_dir} after epoch {state['epoch'] + 1}/{cfg.train.epochs}")
    tb = _tensorboard(run_dir, cfg) if is_main else None
    wandb_run = _wandb(cfg) if is_main else None
    model_meta = model_metadata(model)
    base_meta = {
        "labels": labels, "taxonomy": taxonomy_to_json(taxonomy), "taxonomy_hash": taxonomy.hash,
        "backbone": cfg.model.backbone, "head": cfg.model.head, "image_size": cfg.data.image_size,
        "preprocessing": pre, "model_config": _model_config_dict(cfg), "metric": metric, "model": model_meta,
        "data": {"resize": cfg.data.resize, "grayscale": cfg.data.grayscale, "crop_pct": cfg.augment.crop_pct,
                 "input": input_col, "context": _context_scale(train_rows, two_stream or input_col == "context_path")},
        "monitor": cfg.train.monitor,
    }

    warm_metrics = None
    if warm and not resume:
        # the warmed-up head alone is a candidate too: it stays the best checkpoint unless an epoch beats it on
        # val, so a short fine-tuning budget never ends below the linear probe it started from
        warm_metrics = _val_metrics(run_inference(model, val_loader, device, amp=amp, progress=False,
                                                  criterion=eval_criterion), D)
        best, best_epoch = sign * warm_metrics[cfg.train.monitor], 0
        if is_main:
            save_checkpoint(ckpt_dir / "best.safetensors", model, {**base_meta, "epoch": 0, "metrics": warm_metrics})
            update_status(run_dir, warm_up=warm_metrics)
            log(f"warmed-up head on val: top-1 {warm_metrics['val_top1']:.3f}  MHD {warm_metrics['val_mhd']:.3f} "
                "(the best checkpoint until an epoch beats it)")

    # ---- epochs
    for epoch in range(start_epoch, cfg.train.epochs):
        # reseed per epoch so that a resumed run replays exactly the same batches and augmentations
        seed_everything(cfg.train.seed * 1000 + epoch * 10 + rank)
        if sampler is not None:
            sampler.set_epoch(epoch)
        if hasattr(train_loader.generator, "manual_seed") and train_loader.generator is not None:
            train_loader.generator.manual_seed(cfg.train.seed * 1000 + epoch)
        train_model.train()
        t0, seen, loss_sum, preds, targets = time.time(), 0, 0.0, [], []
        bar = _bar(train_loader, f"epoch {epoch + 1}/{cfg.train.epochs}", progress and is_main)
        train_step.zero_grad()
        stop_now = False
        for step, batch in enumerate(bar):
            out = train_step(batch, step, global_step)
            if out.updated:
                global_step += 1
            n = out.n
            seen += n
            loss_sum += float(out.loss) * n
            preds.append(out.outputs["logits"].detach().argmax(1).cpu())
            targets.append(out.target.cpu())
            if progress and is_main and step % max(1, cfg.train.log_every) == 0:
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", img_s=f"{seen / (time.time() - t0):.0f}")
            if cfg.train.max_steps and global_step >= cfg.train.max_steps:
                stop_now = True
                break
        train_seconds = time.time() - t0
        if world > 1:
            import torch.distributed as dist
            dist.barrier()
        from sklearn.metrics import f1_score
        p, t = torch.cat(preds).numpy(), torch.cat(targets).numpy()
        eval_model = ema.module if ema is not None else model
        val = run_inference(eval_model, val_loader, device, amp=amp, progress=False, criterion=eval_criterion)
        row = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(1, seen),
            "train_top1": float((p == t).mean()),
            "train_macro_f1": float(f1_score(t, p, labels=np.unique(t), average="macro", zero_division=0)),
            **_val_metrics(val, D),
            "lr": max(g["lr"] for g in optimizer.param_groups),  # the head's rate under layer decay
            "img_s": seen * world / max(train_seconds, 1e-9),
            "seconds": time.time() - t0,
        }
        history.append(row)
        if cfg.train.scheduler == "plateau":
            scheduler.step(row[cfg.train.monitor])
        score = sign * row[cfg.train.monitor]
        improved = score < best
        if improved:
            best, best_epoch, stale = score, epoch + 1, 0
        else:
            stale += 1
        if is_main:
            meta = {**base_meta, "epoch": epoch + 1, "metrics": row}
            weights = ema.module if ema is not None else model
            if improved:
                save_checkpoint(ckpt_dir / "best.safetensors", weights, meta)
            if cfg.train.save_every and (epoch + 1) % cfg.train.save_every == 0:
                save_checkpoint(ckpt_dir / f"epoch_{epoch + 1}.safetensors", weights, meta)
            save_checkpoint(ckpt_dir / "last.safetensors", weights, meta)
            _write_metrics_csv(run_dir / "metrics.csv", history)
            save_resume_state(resume_file, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                "epoch": epoch, "global_step": global_step, "best": best, "best_epoch": best_epoch,
                "stale": stale, "history": history,
            })
            if tb is not None:
                for k, v in row.items():
                    if k != "epoch":
                        tb.add_scalar(k, v, epoch + 1)
                tb.flush()
            if wandb_run is not None:
                wandb_run.log(row)
            log(f"epoch {epoch + 1}/{cfg.train.epochs}  train loss {row['train_loss']:.3f}  "
                f"val loss {row['val_loss']:.3f}  top-1 {row['val_top1']:.3f}  MHD {row['val_mhd']:.3f}  "
                f"macro-F1 {row['val_macro_f1']:.3f}  {row['img_s']:.0f} img/s" + ("  *" if improved else ""))
            if on_epoch is not None:
                try:
                    on_epoch(epoch + 1, dict(row))
                except BaseException:
                    for loader in (train_loader, val_loader):
                        loader.close()
                    if tb is not None:
                        tb.close()
                    raise
        if stop_now:
            break
        if cfg.train.patience and stale >= cfg.train.patience:
            if is_main:
                log(f"early stopping: {cfg.train.monitor} did not improve for {stale} epochs")
            break
    for loader in (train_loader, val_loader):
        loader.close()
    if tb is not None:
        tb.close()
    if wandb_run is not None:
        wandb_run.finish()
    if world > 1:
        import torch.distributed as dist
        dist.barrier()
    skipped = list(getattr(train_ds, "skipped", [])) + list(getattr(val_ds, "skipped", []))
    if skipped and is_main:
        log(f"warning: {len(skipped)} unreadable image(s) were skipped, e.g. {skipped[0]}")
    if is_main:
        update_status(run_dir, status="trained", epochs=cfg.train.epochs, epochs_trained=len(history),
                      best_epoch=best_epoch, monitor=cfg.train.monitor, best_metric=sign * best)
    return TrainResult(run_dir, best_epoch, sign * best, cfg.train.monitor, history, skipped, warm_metrics)


def _val_metrics(val, D: np.ndarray) -> dict:
    """The val columns of metrics.csv from one pass over the val rows (`run_inference` with a criterion)."""
    from sklearn.metrics import f1_score
    vp = val.logits.argmax(1)
    return {"val_loss": val.loss, "val_top1": float((vp == val.targets).mean()),
            "val_mhd": float(D[val.targets, vp].mean()),
            "val_macro_f1": float(f1_score(val.targets, vp, labels=np.unique(val.targets), average="macro",
                                           zero_division=0))}


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


def _bar(iterable, desc: str, enabled: bool):
    from tqdm import tqdm
    return tqdm(iterable, desc=desc, unit="batch", leave=False, disable=not enabled, file=sys.stderr, dynamic_ncols=True)


def _tensorboard(run_dir: Path, cfg: Config):
    if not cfg.train.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None  # tensorboard is an optional extra
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


def _wandb(cfg: Config):
    if not cfg.train.wandb:
        return None
    try:
        import wandb
    except ImportError:
        raise ConfigError("train.wandb is set but wandb is not installed: pip install 'taxonomist[wandb]'") from None
    return wandb.init(project=cfg.train.wandb, config=cfg.to_dict(), dir=cfg.out)


def load_history(run_dir: str | Path) -> list[dict]:
    """metrics.csv of a run as a list of dicts with float values."""
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
