"""taxonomist.runtime: the CPU thread policy — `cpu_threads_for` (cores − ⌊workers × LOADER_CORE_SHARE⌋ per process)
and `configure_threads` (explicit count, OMP_NUM_THREADS, non-CPU devices, this 2-core machine's case) — the loader
workers, the busy cores and the distributed rank."""
from __future__ import annotations

import os

import pytest
import torch

from taxonomist import runtime
from taxonomist.runtime import (LOADER_CORE_SHARE, DistributedInfo, auto_num_workers, configure_threads,
                                cpu_threads_for, distributed_info, is_main_process)
from taxonomist.runtime import busy_cores as BUSY_CORES  # the real one: the autouse fixture stubs runtime's

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def threads_restored(monkeypatch):
    """Each test starts from a known environment and leaves torch's thread count as it found it; the
    allocator tuning (process-wide mallopt) is not this file's subject."""
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(runtime, "tune_cpu_allocator", lambda: None)
    monkeypatch.setattr(runtime, "busy_cores", lambda: 0)  # a quiet machine, whatever the test machine runs
    yield
    torch.set_num_threads(before)


def _cores(monkeypatch, n: int) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(n)), raising=False)


@pytest.mark.parametrize("cores, workers, world, expected", [
    (2, 1, 1, 2),    # this VM: a worker needs half a core, torch keeps both
    (2, 0, 1, 2),
    (2, 2, 1, 1),
    (2, 4, 1, 1),    # never below one thread
    (1, 0, 1, 1),
    (1, 1, 1, 1),
    (4, 3, 1, 3),
    (8, 7, 1, 5),
    (16, 8, 1, 12),
    (16, 4, 2, 6),   # two processes share the machine: 8 cores each, minus 2
    (16, 4, 4, 2),
    (16, 8, 4, 1),   # 4 cores per process, ⌊8 × 0.5⌋ = 4 of them for its workers: the floor of one
    (4, 0, 8, 1),    # more processes than cores
])
def test_cpu_threads_for(cores, workers, world, expected):
    assert LOADER_CORE_SHARE == 0.5
    assert cpu_threads_for(cores, workers, world) == expected


def test_explicit_threads_win(monkeypatch):
    _cores(monkeypatch, 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # an explicit train.threads beats the environment too
    torch.set_num_threads(1)
    assert configure_threads(3, CPU, 1) == 3 and torch.get_num_threads() == 3


def test_omp_num_threads_leaves_torch_alone(monkeypatch):
    _cores(monkeypatch, 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(3)  # whatever the process has: the user's OMP_NUM_THREADS already set it at start-up
    assert configure_threads(0, CPU, 1) == 3 and torch.get_num_threads() == 3


def test_non_cpu_device_changes_nothing(monkeypatch):
    _cores(monkeypatch, 2)
    called = []
    monkeypatch.setattr(runtime, "tune_cpu_allocator", lambda: called.append(1))
    torch.set_num_threads(3)
    assert configure_threads(0, torch.device("cuda"), 1) == 3  # a device object only: no GPU needed
    assert configure_threads(5, torch.device("cuda"), 1) == 3  # not even an explicit count
    assert torch.get_num_threads() == 3 and called == []


@pytest.mark.parametrize("workers", [1, -1])  # -1: auto_num_workers picks 1 on 2 cores
def test_two_cores_one_worker_gets_two_threads(monkeypatch, workers):
    _cores(monkeypatch, 2)
    torch.set_num_threads(1)
    assert configure_threads(0, CPU, workers) == 2 and torch.get_num_threads() == 2


def test_policy_follows_cores_workers_and_world(monkeypatch):
    _cores(monkeypatch, 4)
    torch.set_num_threads(1)
    assert configure_threads(0, CPU, -1) == 3        # 4 cores, 3 auto workers: 4 − 1
    assert configure_threads(0, CPU, 0) == 4
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert configure_threads(0, CPU, 1) == 2         # 2 cores per process, the worker's half core rounds down


def test_cores_other_programs_keep_busy_are_left_to_them(monkeypatch):
    _cores(monkeypatch, 2)
    monkeypatch.setattr(runtime, "busy_cores", lambda: 1)
    torch.set_num_threads(2)
    assert configure_threads(0, CPU, 1) == 1
    monkeypatch.setattr(runtime, "busy_cores", lambda: 5)  # never below one thread
    assert configure_threads(0, CPU, 1) == 1
    assert cpu_threads_for(8, 2, busy=3) == 4


def test_busy_cores_reads_the_runnable_tasks_and_not_the_load_average(monkeypatch, tmp_path):
    """The median of the runnable counts, minus this process; a load average left by a finished process
    does not count; no /proc/loadavg means no information, so 0."""
    import builtins

    samples = iter(["9.50 9.00 8.00 3/400 123\n", "9.50 9.00 8.00 1/400 123\n", "9.50 9.00 8.00 3/400 123\n"])
    real_open = builtins.open

    def fake_open(path, *args, **kwargs):
        if path == "/proc/loadavg":
            loadavg = tmp_path / "loadavg"
            loadavg.write_text(next(samples))
            return real_open(loadavg, *args, **kwargs)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    assert BUSY_CORES(samples=3, interval=0) == 2


def test_busy_cores_without_proc_loadavg_is_zero(monkeypatch):
    import builtins

    real_open = builtins.open

    def no_proc(path, *args, **kwargs):
        if path == "/proc/loadavg":
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_proc)
    assert BUSY_CORES(samples=2, interval=0) == 0


def test_auto_num_workers():
    assert [auto_num_workers(n) for n in (1, 2, 3, 4, 16, 64)] == [0, 1, 2, 3, 8, 8]


def test_distributed_info_reads_torchrun_variables(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed_info() == DistributedInfo(world=1, rank=0, local_rank=0) and is_main_process()
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed_info() == (4, 3, 1) and not is_main_process()
