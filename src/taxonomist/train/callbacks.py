"""What watches training without being training: the callback surface of `train()` and the callbacks it always
runs (progress output, TensorBoard, Weights & Biases). A sweep's pruner and the profiler plug in here too.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

from taxonomist.errors import ConfigError
from taxonomist.train.progress import ProgressLines

if TYPE_CHECKING:
    from taxonomist.train.loop import TrainingRun


@dataclass
class BatchEnd:
    """What one training batch of an epoch did, for `Callback.on_batch_end`."""
    epoch: int          #: 0-based epoch
    step: int           #: 0-based batch of the epoch
    batches: int        #: batches in the epoch
    seen: int           #: images trained on so far in the epoch (this process)
    loss_sum: float     #: sum of the per-image losses so far in the epoch
    seconds: float      #: since the epoch's first batch was asked for
    waited: float       #: seconds this batch was waited for from the loader
    output: Any         #: the `train.step.StepOutput` of the batch


class Callback:
    """Hooks `train()` calls on the process that writes the run (rank 0); override the ones you need.

    Order within an epoch: `on_epoch_start`, `on_batch_end` after each batch, then — once validation, the
    checkpoints, the metrics.csv row and the epoch's log line are written — `on_epoch_end`. Returning True from
    `on_epoch_end` stops training after that epoch (its files are complete; the run is "trained"); raising
    stops it too and the exception reaches the caller, leaving a run that `resume=True` continues.
    `on_train_end` runs once, in training's cleanup, whether training finished or failed.

    >>> class Until(Callback):
    ...     def on_epoch_end(self, run, row):
    ...         return row["val_top1"] >= 0.9
    >>> train(cfg, callbacks=[Until()])   # doctest: +SKIP
    """

    def on_train_start(self, run: TrainingRun) -> None:
        """The model, optimiser and loaders are ready and the run directory written; no epoch has run."""

    def on_epoch_start(self, run: TrainingRun, epoch: int) -> None:
        """Epoch `epoch` (0-based) is about to ask for its first batch."""

    def on_batch_end(self, run: TrainingRun, batch: BatchEnd) -> None:
        """A training batch went through the step."""

    def on_epoch_end(self, run: TrainingRun, row: dict) -> bool | None:
        """Epoch `row["epoch"]` (1-based) is written; `row` is its metrics.csv row. True stops training."""

    def on_train_end(self, run: TrainingRun) -> None:
        """Training finished or failed: release what `on_train_start` opened."""


class CallbackList:
    """Calls each callback's hooks in order, on rank 0 only. A callback needs only the hooks it uses (any object
    with some of `Callback`'s methods will do). `on_epoch_end` stops when any callback says so; every callback
    still sees the row."""

    def __init__(self, callbacks: Sequence[Callback]):
        self.callbacks = list(callbacks)
        self.started = False

    def on_train_start(self, run: TrainingRun) -> None:
        self.started = True
        self._call(run, "on_train_start")

    def on_epoch_start(self, run: TrainingRun, epoch: int) -> None:
        self._call(run, "on_epoch_start", epoch)

    def on_batch_end(self, run: TrainingRun, batch: BatchEnd) -> None:
        self._call(run, "on_batch_end", batch)

    def on_epoch_end(self, run: TrainingRun, row: dict) -> bool:
        return any([bool(stop) for stop in self._call(run, "on_epoch_end", row, copy=True)])

    def on_train_end(self, run: TrainingRun) -> None:
        if self.started:  # once, and only after on_train_start
            self.started = False
            self._call(run, "on_train_end")

    def _call(self, run: TrainingRun, name: str, *args, copy: bool = False) -> list:
        if not run.is_main:
            return []
        answers = []
        for cb in self.callbacks:
            hook = getattr(cb, name, None)
            if hook is not None:  # each its own copy of the row: one callback cannot change another's
                answers.append(hook(run, *(dict(a) for a in args) if copy else args))
        return answers


class EpochHook(Callback):
    """A plain function `on_epoch(epoch, row)` as a callback (the `on_epoch=` of `train` and `fit`): called
    after each epoch; what it raises (a sweep pruning its trial) stops training and reaches the caller."""

    def __init__(self, on_epoch: Callable[[int, dict], object]):
        self.on_epoch = on_epoch

    def on_epoch_end(self, run: TrainingRun, row: dict) -> None:
        self.on_epoch(int(row["epoch"]), row)


class TrainingProgress(Callback):
    """Progress within an epoch: a tqdm bar on a terminal (`terminal`), otherwise a log line every
    `train.log_seconds` (`ProgressLines`), so that a log file is never silent for a whole epoch."""

    def __init__(self, terminal: bool, log: Callable[[str], object]):
        self.terminal, self.log = terminal, log
        self.bar = self.ticker = None

    def on_epoch_start(self, run: TrainingRun, epoch: int) -> None:
        desc, total = f"epoch {epoch + 1}/{run.cfg.train.epochs}", len(run.train_loader)
        if self.terminal:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, unit="batch", leave=False, file=sys.stderr, dynamic_ncols=True)
        else:
            self.ticker = ProgressLines(self.log, desc, total, run.cfg.train.log_seconds)

    def on_batch_end(self, run: TrainingRun, batch: BatchEnd) -> None:
        if self.bar is not None:
            if batch.step % max(1, run.cfg.train.log_every) == 0:
                self.bar.set_postfix(loss=f"{batch.loss_sum / batch.seen:.3f}",
                                     img_s=f"{batch.seen / max(batch.seconds, 1e-9):.0f}", refresh=False)
            self.bar.update(1)
            if batch.step + 1 >= batch.batches:  # the bar goes before validation starts
                self._close()
        if self.ticker is not None:
            self.ticker.update(batch.step + 1, batch.seen, batch.loss_sum)

    def on_epoch_end(self, run: TrainingRun, row: dict) -> None:
        self._close()

    def on_train_end(self, run: TrainingRun) -> None:
        self._close()

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar = self.ticker = None


class TensorBoardLogger(Callback):
    """Each epoch's metrics.csv row as scalars in RUN/tensorboard (`train.tensorboard`; nothing when the
    optional tensorboard package is missing)."""

    def __init__(self):
        self.writer = None

    def on_train_start(self, run: TrainingRun) -> None:
        if not run.cfg.train.tensorboard:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return  # tensorboard is an optional extra
        self.writer = SummaryWriter(log_dir=str(run.run_dir / "tensorboard"))

    def on_epoch_end(self, run: TrainingRun, row: dict) -> None:
        if self.writer is not None:
            for k, v in row.items():
                if k != "epoch":
                    self.writer.add_scalar(k, v, row["epoch"])
            self.writer.flush()

    def on_train_end(self, run: TrainingRun) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class WandbLogger(Callback):
    """Each epoch's row to Weights & Biases project `train.wandb` (refused when wandb is not installed)."""

    def __init__(self):
        self.run = None

    def on_train_start(self, run: TrainingRun) -> None:
        cfg = run.cfg
        if not cfg.train.wandb:
            return
        try:
            import wandb
        except ImportError:
            raise ConfigError("train.wandb is set but wandb is not installed: pip install 'taxonomist[wandb]'") from None
        self.run = wandb.init(project=cfg.train.wandb, config=cfg.to_dict(), dir=cfg.out)

    def on_epoch_end(self, run: TrainingRun, row: dict) -> None:
        if self.run is not None:
            self.run.log(row)

    def on_train_end(self, run: TrainingRun) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def standard_callbacks(progress: bool, log: Callable[[str], object]) -> list[Callback]:
    """The callbacks every `train()` runs before the caller's: progress output, TensorBoard, W&B."""
    return [TrainingProgress(progress, log), TensorBoardLogger(), WandbLogger()]
