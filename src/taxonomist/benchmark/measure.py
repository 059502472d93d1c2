"""Timing and memory helpers shared by the three measurements: steady-state img/s after warm-up steps,
and a sampler of peak host RSS (this process and its loader workers)."""
from __future__ import annotations

import threading
import time

import psutil
import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(batches, step, warmup: int, steps: int, device: torch.device) -> float:
    """img/s of `step(batch)` over `steps` batches after `warmup` untimed ones (worker start-up, first
    allocations, cudnn autotuning fall in the warm-up). `batches` yields (batch, n_images)."""
    seen, start = 0, None
    for i, (batch, n) in enumerate(batches):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        step(batch)
        if i >= warmup:
            seen += n
        if i + 1 >= warmup + steps:
            break
    sync(device)
    if start is None or seen == 0:
        raise RuntimeError("benchmark: the loader ran out of batches before the timed steps")
    return seen / (time.perf_counter() - start)


class PeakRSS:
    """Samples RSS of this process plus its children every `interval` s in a thread; `.peak_mb`."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        me = psutil.Process()
        total = me.memory_info().rss
        for child in me.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())

    @property
    def peak_mb(self) -> float:
        return self.peak / 2 ** 20
