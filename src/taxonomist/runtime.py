"""Where and how a model runs: the device, the CPU thread and loader-worker policy, the distributed rank.

Shared by every stage that runs a model — training, calibration, evaluation, prediction, serving, the benchmark —
so that none of them imports another stage for it. torch is imported inside the functions that need it.
"""
from __future__ import annotations

import os
import sys
from typing import NamedTuple

from taxonomist.errors import ConfigError
from taxonomist.utils.system import usable_cores

#: share of one core a loader worker keeps busy while the model trains on the CPU: a worker decodes and
#: augments an image in a few ms against tens of ms of model time (docs/performance.md, "The CPU thread
#: policy"), so it never needs a whole core of its own; torch keeps the rest.
LOADER_CORE_SHARE = 0.5


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


def auto_num_workers(cpus: int | None = None) -> int:
    """Loader worker processes for this machine: min(cores - 1, 8), and none on a single core.

    Two cores still get one worker: decoding and augmenting in the main process runs those small per-image
    ops under the model's intra-op threads, which measured 2–4× slower than a one-thread worker on a busy
    2-core machine (train transform at 224 px: 11–48 img/s in-process vs 130–190 img/s with 1–2 workers).

    >>> auto_num_workers(1), auto_num_workers(2), auto_num_workers(16)
    (0, 1, 8)
    """
    cpus = usable_cores() if cpus is None else cpus
    return 0 if cpus <= 1 else min(cpus - 1, 8)


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
    if device.type != "cpu":
        return torch.get_num_threads()
    tune_cpu_allocator()
    if threads > 0:
        torch.set_num_threads(threads)
    elif "OMP_NUM_THREADS" not in os.environ:
        workers = auto_num_workers() if num_workers < 0 else num_workers
        torch.set_num_threads(cpu_threads_for(usable_cores(), workers, distributed_info().world, busy_cores()))
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


class DistributedInfo(NamedTuple):
    """This process's place in a `torchrun` job (world 1, rank 0 when not launched by it)."""
    world: int        # processes in the job (WORLD_SIZE)
    rank: int         # this process among them (RANK); rank 0 writes the run directory
    local_rank: int   # this process among those on its machine (LOCAL_RANK): its GPU


def distributed_info() -> DistributedInfo:
    """World size, rank and local rank from the variables `torchrun` sets.

    >>> distributed_info() if "WORLD_SIZE" not in os.environ else DistributedInfo(1, 0, 0)
    DistributedInfo(world=1, rank=0, local_rank=0)
    """
    return DistributedInfo(int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")),
                           int(os.environ.get("LOCAL_RANK", "0")))


def is_main_process() -> bool:
    """True for the process that writes files: rank 0, or the only process."""
    return distributed_info().rank == 0


__all__ = ["LOADER_CORE_SHARE", "DistributedInfo", "auto_num_workers", "busy_cores", "configure_threads",
           "cpu_threads_for", "distributed_info", "is_main_process", "select_device", "tune_cpu_allocator"]
