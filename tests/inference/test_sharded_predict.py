"""Chunked, resumable and sharded prediction: chunks cover every row once, part files are kept only when their
key matches, a resumed run equals an uninterrupted one, and two torchrun processes on gloo write the file one
process writes."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from taxonomist.errors import ConfigError
from taxonomist.inference import predict
from taxonomist.inference.sharding import DEFAULT_CHUNK_SIZE, ChunkResult, PartStore, Shard, parts_folder

#: the module (`taxonomist.inference.predict` as an attribute is the function of the same name)
predict_module = importlib.import_module("taxonomist.inference.predict")
_PREDICT_CHUNK = predict_module._predict_chunk
FAST = dict(device="cpu", num_workers=0, progress=False)
#: the options of the sharded runs: OOD flags and a fallback decision, so every output column is exercised
OPTIONS = dict(decision="min-risk", candidates="all", ood="energy", batch_size=8, chunk_size=8)
CLI_OPTIONS = ["--decision", "min-risk", "--candidates", "all", "--ood", "energy", "--batch-size", "8",
               "--chunk-size", "8", "--device", "cpu", "--workers", "0"]


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One intra-op thread in this process and in torchrun's, so that both compute bit-identical numbers."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


def _result(positions, skipped=()) -> ChunkResult:
    n = len(positions)
    return ChunkResult(np.array(positions, dtype=np.int64), np.arange(n, dtype=np.int64), np.full(n, 0.5),
                       np.full(n, 1.25), np.zeros(0), np.zeros(0, dtype=bool),
                       np.array([p for p, _ in skipped], dtype=np.int64), np.array([r for _, r in skipped], dtype=str))


def test_chunks_are_dealt_to_ranks_round_robin_and_cover_every_row_once(monkeypatch):
    shards = [Shard(3, r, r) for r in range(3)]
    assert shards[1].chunks(10, 3) == [(1, 3, 6)]
    assert shards[0].chunks(10, 3) == [(0, 0, 3), (3, 9, 10)]
    assert sorted(c for s in shards for c in s.chunks(10, 3)) == [(0, 0, 3), (1, 3, 6), (2, 6, 9), (3, 9, 10)]
    assert Shard().chunks(0, 5) == []
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert Shard.from_env() == Shard(4, 2, 0)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ConfigError, match="RANK=4 is not a process of WORLD_SIZE=4"):
        Shard.from_env()


def test_a_part_is_kept_only_with_its_key(tmp_path):
    store = PartStore(tmp_path / "p.csv")
    assert store.folder == tmp_path / "p.csv.parts" == parts_folder(tmp_path / "p.csv")
    written = _result([8, 9, 11], skipped=[(10, "cannot identify image file")])
    store.write(1, "key-a", written)
    assert store.path(1).name == "chunk-000001.npz" and not list(store.folder.glob(".*.tmp"))
    got = store.read(1, "key-a")
    assert got.positions.tolist() == [8, 9, 11] and got.skipped_reasons.tolist() == ["cannot identify image file"]
    assert np.array_equal(got.confidence, written.confidence)
    assert store.read(1, "key-b") is None and store.read(2, "key-a") is None
    store.path(1).write_bytes(store.path(1).read_bytes()[:40])  # a damaged part is predicted again
    assert store.read(1, "key-a") is None
    merged = ChunkResult.concat([_result([0, 1]), _result([2], skipped=[(3, "x")])])
    assert merged.positions.tolist() == [0, 1, 2] and merged.skipped_positions.tolist() == [3]
    store.remove()
    assert not store.folder.exists()


def test_chunked_prediction_equals_one_pass(tiny_run, tiny_data, tmp_path):
    one = predict(tiny_run, tiny_data, tmp_path / "one.csv", split="test", **{**OPTIONS, "chunk_size": 1000}, **FAST)
    many = predict(tiny_run, tiny_data, tmp_path / "many.csv", split="test", **{**OPTIONS, "chunk_size": 3}, **FAST)
    a, b = pd.read_csv(one.out, keep_default_na=False), pd.read_csv(many.out, keep_default_na=False)
    assert len(a) == one.n_images >= 10 and many.chunks == -(-many.n_images // 3) >= 4 and one.chunks == 1
    # other batches may move a float in its last bits; the answers and flags do not move
    assert a["path"].tolist() == b["path"].tolist() and a["prediction"].tolist() == b["prediction"].tolist()
    assert a["unknown"].tolist() == b["unknown"].tolist()
    assert np.abs(a["confidence"] - b["confidence"]).max() <= 2e-6
    assert not parts_folder(one.out).exists() and not parts_folder(many.out).exists()
    k1 = predict(tiny_run, tiny_data, tmp_path / "k1.csv", split="test", fmt="kaggle", chunk_size=4, **FAST)
    k2 = predict(tiny_run, tiny_data, tmp_path / "k2.csv", split="test", fmt="kaggle", **FAST)
    assert k1.out.read_text() == k2.out.read_text()
    with pytest.raises(ConfigError, match="chunk size must be a positive integer, got 0"):
        predict(tiny_run, tiny_data, tmp_path / "x.csv", chunk_size=0, **FAST)



class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs in the process (a BaseException, so no `except Exception` stops it)."""


def _interrupt_after(monkeypatch, n_chunks: int) -> list:
    """Make `predict` die (as a kill would) when it starts chunk number `n_chunks`; returns the chunk offsets run."""
    real, started = _PREDICT_CHUNK, []

    def chunk(loaded, images, offset, *args):
        if len(started) == n_chunks:
            raise Killed
        started.append(offset)
        return real(loaded, images, offset, *args)

    monkeypatch.setattr(predict_module, "_predict_chunk", chunk)
    return started


def test_resume_predicts_only_the_missing_chunks(tiny_run, tiny_data, tmp_path, monkeypatch):
    images, out = tiny_data / "images", tmp_path / "p.csv"
    reference = predict(tiny_run, images, tmp_path / "reference.csv", **OPTIONS, **FAST)
    assert reference.chunks == 8  # 60 images in chunks of 8

    _interrupt_after(monkeypatch, 3)
    with pytest.raises(Killed):
        predict(tiny_run, images, out, **OPTIONS, **FAST)
    assert not out.exists() and sorted(p.name for p in parts_folder(out).iterdir()) == \
        ["chunk-000000.npz", "chunk-000001.npz", "chunk-000002.npz"]
    PartStore(out).path(1).write_bytes(b"torn")  # damaged: predicted again

    # other options: no part matches, everything is predicted again (and the run dies again)
    started = _interrupt_after(monkeypatch, 1)
    with pytest.raises(Killed):
        predict(tiny_run, images, out, resume=True, **{**OPTIONS, "decision": "argmax"}, **FAST)
    assert started == [0]

    started = _interrupt_after(monkeypatch, 99)
    summary = predict(tiny_run, images, out, resume=True, **OPTIONS, **FAST)
    assert started == [0, 8, 24, 32, 40, 48, 56]  # chunk 0 (of the argmax run) is stale, 1 damaged, 2 kept
    assert summary.chunks_resumed == 1 and "resumed: 1 of 8 chunks were already predicted" in summary.summary()
    assert out.read_text() == reference.out.read_text()
    assert not parts_folder(out).exists()

    started = _interrupt_after(monkeypatch, 99)  # without --resume, old parts are never trusted
    PartStore(out).write(0, "whatever", _result([0]))
    predict(tiny_run, images, out, **OPTIONS, **FAST)
    assert len(started) == 8 and out.read_text() == reference.out.read_text()


def _torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "taxonomist.cli.main", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_two_processes_on_gloo_write_what_one_process_writes(tiny_run, tiny_data, tmp_path, monkeypatch):
    """One torchrun job (each costs seconds of imports): a run killed after two chunks, resumed by two processes.
    Rank 0 keeps chunk 0 and predicts 2, 4, 6; rank 1 keeps chunk 1 and predicts 3, 5, 7 (8+8+8+4 images)."""
    images, out = tiny_data / "images", tmp_path / "sharded.csv"
    # bytes agree only for one thread count (the reduction order moves logits in the last digits, and a
    # validation image sits exactly on the stored OOD threshold): one thread, as each torchrun process has
    import torch
    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    try:
        single = predict(tiny_run, images, tmp_path / "single.csv", **OPTIONS, **FAST)
        _interrupt_after(monkeypatch, 2)
        with pytest.raises(Killed):
            predict(tiny_run, images, out, **OPTIONS, **FAST)
    finally:
        torch.set_num_threads(threads)
    assert len(list(parts_folder(out).glob("chunk-*.npz"))) == 2
    proc = _torchrun(["predict", str(tiny_run), "--images", str(images), "--out", str(out), "--resume", *CLI_OPTIONS])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.read_text() == single.out.read_text()  # same rows, order and bytes as one process
    assert "predicted 60 of 60 images (min-risk, 1 checkpoint, 2 processes)" in proc.stdout
    assert "resumed: 2 of 8 chunks were already predicted" in proc.stdout
    assert "rank 1 of 2: predicted 28 images of its chunks" in proc.stdout
    assert not parts_folder(out).exists()


def test_cli_chunk_size_default_matches_the_library():
    from taxonomist.cli.main import build_parser

    args = build_parser().parse_args(["predict", "RUN", "--images", "DIR", "--out", "p.csv"])
    assert args.chunk_size == DEFAULT_CHUNK_SIZE and args.resume is False
