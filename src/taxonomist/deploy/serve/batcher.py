"""Micro-batching: requests that arrive together share one forward pass, run by one worker thread.

A request submits its images and gets a future. The worker takes every waiting request up to `max_batch`
images, waits at most `max_wait_ms` for more while the batch is not full, runs the batch and hands each request
its slice of the results. Under load the queue fills while a batch runs, so batches grow without waiting.
When a batch fails, each of its requests runs again alone, so that one bad request fails alone. If the worker
thread itself ever stops, `alive` turns False and `submit` raises `BatcherStopped` at once (the service answers
503 and `/health` says why) instead of queueing work that nobody runs.
"""
from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any


@dataclass
class BatchStats:
    """What the batcher has run so far."""

    batches: int = 0
    images: int = 0
    requests: int = 0
    largest_batch: int = 0
    retried: int = 0          # failed batches whose requests then ran one by one

    @property
    def mean_batch(self) -> float:
        return self.images / self.batches if self.batches else 0.0

    def as_dict(self) -> dict[str, float]:
        return {"batches": self.batches, "images": self.images, "requests": self.requests,
                "largest_batch": self.largest_batch, "mean_batch": round(self.mean_batch, 3),
                "retried": self.retried}


class BatcherStopped(RuntimeError):
    """The batching worker thread is not running (closed, or stopped by an error it did not expect)."""


class MicroBatcher:
    """Run `fn(items) -> results` (one result per item, same order) on batches gathered from many callers.

    >>> with MicroBatcher(lambda xs: [x * 2 for x in xs], max_batch=8) as batcher:
    ...     batcher.submit([1, 2, 3]).result()
    [2, 4, 6]
    """

    def __init__(self, fn: Callable[[list], Sequence], max_batch: int = 32, max_wait_ms: float = 5.0,
                 name: str = "taxonomist-batcher"):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
        if not (isinstance(max_wait_ms, (int, float)) and math.isfinite(max_wait_ms) and max_wait_ms >= 0):
            raise ValueError(f"max_wait_ms must be a finite number ≥ 0, got {max_wait_ms!r}")
        self.fn, self.max_batch, self.max_wait = fn, max_batch, max_wait_ms / 1000.0
        self.stats = BatchStats()
        self._jobs: deque[tuple[list, Future]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.failure: str | None = None   # why the worker thread stopped, when an error stopped it
        self._taken: list[tuple[list, Future]] = []
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------------ public
    @property
    def alive(self) -> bool:
        """True while the worker thread runs and accepts work."""
        return self._thread.is_alive() and not self._closed

    def submit(self, items: Sequence[Any]) -> Future:
        """Queue `items`; the future resolves to their results (a list) or to the exception `fn` raised."""
        future: Future = Future()
        items = list(items)
        if not items:
            future.set_result([])
            return future
        with self._cond:
            if not self.alive:
                raise BatcherStopped(self.failure or "the batcher is closed")
            self._jobs.append((items, future))
            self._cond.notify()
        return future

    def close(self, timeout: float | None = 10.0) -> None:
        """Finish the queued work, then stop the worker thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)

    def __enter__(self) -> MicroBatcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ worker
    def _take(self) -> list[tuple[list, Future]] | None:
        """Block for the next batch of jobs (None once closed and drained). A job larger than `max_batch`
        comes alone and `_run` splits it."""
        with self._cond:
            while not self._jobs:
                if self._closed:
                    return None
                self._cond.wait()
            jobs = self._taken = [self._jobs.popleft()]   # kept so that a failure below can answer them
            size = len(jobs[0][0])
            deadline = time.monotonic() + self.max_wait
            while size < self.max_batch:
                if self._jobs:
                    if size + len(self._jobs[0][0]) > self.max_batch:
                        break  # the next request waits for the next batch rather than being split
                    job = self._jobs.popleft()
                    jobs.append(job)
                    size += len(job[0])
                    continue
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    break
                self._cond.wait(left)
            return jobs

    def _run(self, jobs: list[tuple[list, Future]]) -> None:
        items = [x for job, _ in jobs for x in job]
        results: list = []
        try:
            for start in range(0, len(items), self.max_batch):
                chunk = items[start:start + self.max_batch]
                out = list(self.fn(chunk))
                if len(out) != len(chunk):
                    raise RuntimeError(f"batch function returned {len(out)} results for {len(chunk)} items")
                results.extend(out)
                self.stats.batches += 1
                self.stats.images += len(chunk)
                self.stats.largest_batch = max(self.stats.largest_batch, len(chunk))
        except BaseException as e:  # noqa: BLE001 — the callers get the error, the worker keeps serving
            if len(jobs) > 1:
                # one request's input must not fail the others that shared its batch: each runs alone
                self.stats.retried += 1
                for job in jobs:
                    self._run([job])
                return
            for _, future in jobs:
                if not future.done():
                    future.set_exception(e)
            return
        self.stats.requests += len(jobs)
        start = 0
        for job, future in jobs:
            future.set_result(results[start:start + len(job)])
            start += len(job)

    def _loop(self) -> None:
        try:
            while True:
                jobs = self._take()
                if jobs is None:
                    return
                self._run(jobs)
        except BaseException as e:  # noqa: BLE001 — a bug here must not leave callers waiting forever
            self.failure = f"the batching thread stopped: {type(e).__name__}: {e}"
            with self._cond:
                pending, self._jobs = self._taken + list(self._jobs), deque()
            for _, future in pending:
                if not future.done():
                    future.set_exception(BatcherStopped(self.failure))
            raise
