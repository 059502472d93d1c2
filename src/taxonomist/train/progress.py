"""What training says while it runs: one plan line at the start, and progress lines within an epoch when no
terminal shows the progress bar (a log file, a pipe, a batch job), so that a log is never silent for long.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

#: images whose size the plan line looks at (their headers only)
SIZE_SAMPLE = 16


def median_image_side(root: str | Path, paths: Sequence[str], sample: int = SIZE_SAMPLE) -> int | None:
    """The median longer side of the first `sample` readable images of `paths` (relative to `root`), from their
    headers; None when none can be read."""
    from PIL import Image

    sides = []
    for rel in list(paths)[:sample]:
        try:
            with Image.open(Path(root) / rel) as image:
                sides.append(max(image.size))
        except Exception:  # an unreadable image is training's business (skipped or strict), not the plan's
            continue
    return int(statistics.median(sides)) if sides else None


def training_plan(cfg, root: str | Path, train_rows, n_val: int, n_labels: int, device, threads: int,
                  processes: int = 1) -> str:
    """The one line `train` prints before it starts (`format_plan`), from the config and the rows it trains on."""
    from taxonomist.runtime import auto_num_workers

    column = "context_path" if (cfg.data.input == "context" and cfg.model.head != "two_stream") else "path"
    workers = auto_num_workers() if cfg.data.num_workers < 0 else cfg.data.num_workers
    return format_plan(root=root, n_train=len(train_rows), n_val=n_val, n_labels=n_labels,
                       backbone=cfg.model.backbone, head=cfg.model.head, pretrained=cfg.model.pretrained,
                       epochs=cfg.train.epochs, image_size=cfg.data.image_size, batch_size=cfg.train.batch_size,
                       device=str(device), threads=threads, workers=workers, out=cfg.out, processes=processes,
                       image_side=median_image_side(root, train_rows[column].tolist()))


def format_plan(*, root: str | Path, n_train: int, n_val: int, n_labels: int, backbone: str, head: str,
                pretrained: str, epochs: int, image_size: int, batch_size: int, device: str, threads: int,
                workers: int, out: str | Path, processes: int = 1, image_side: int | None = None) -> str:
    """The plan line: what training trains, on what, where, for how long, and into which run directory.

    >>> print(format_plan(root="data/synth", n_train=672, n_val=144, n_labels=24, backbone="tf_efficientnet_lite0",
    ...                   head="flat", pretrained="auto", epochs=5, image_size=224, batch_size=32, device="cpu",
    ...                   threads=2, workers=1, out="runs/first", image_side=96))
    training tf_efficientnet_lite0 (flat head, pretrained auto) on data/synth: 672 train + 144 val images, 24 labels; 5 epochs at 224 px (the images are ~96 px: upsampled 2.3x), batch 32; cpu, 2 torch threads + 1 loader worker; run directory runs/first
    """
    size = f"{image_size} px"
    if image_side and image_size >= 1.5 * image_side:
        size += f" (the images are ~{image_side} px: upsampled {image_size / image_side:.1f}x)"
    where = f"{device}, {threads} torch thread{'s' * (threads != 1)} + {workers} loader worker{'s' * (workers != 1)}"
    if processes > 1:
        where += f", × {processes} processes"
    return (f"training {backbone} ({head} head, pretrained {pretrained}) on {root}: {n_train:,} train + {n_val:,} val "
            f"images, {n_labels} labels; {epochs} epoch{'s' * (epochs != 1)} at {size}, batch {batch_size}; {where}; "
            f"run directory {out}")


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


class ProgressLines:
    """Progress within an epoch as log lines, for when there is no progress bar: at most one line every
    `every_s` seconds (0 = after every batch), none after the last batch (the epoch's own line follows).

    >>> lines = []
    >>> ticker = ProgressLines(lines.append, "epoch 1/5", total=4, every_s=0)
    >>> for done in range(1, 5):
    ...     ticker.update(done, seen=32 * done, loss_sum=1.5 * 32 * done)
    >>> len(lines), lines[0].startswith("epoch 1/5  batch 1/4 (25 %)  loss 1.500")
    (3, True)
    """

    def __init__(self, log: Callable[[str], object], desc: str, total: int, every_s: float,
                 clock: Callable[[], float] = time.monotonic):
        self.log, self.desc, self.total, self.every_s, self.clock = log, desc, total, float(every_s), clock
        self.start = self.last = clock()

    def update(self, done: int, seen: int, loss_sum: float) -> None:
        now = self.clock()
        if done >= self.total or now - self.last < self.every_s:
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        left = elapsed / done * (self.total - done)
        self.log(f"{self.desc}  batch {done}/{self.total} ({100 * done / self.total:.0f} %)  "
                 f"loss {loss_sum / max(seen, 1):.3f}  {seen / elapsed:.0f} img/s  {_duration(left)} left in the epoch")
