"""kill -9 at random moments: training (then `train --resume`, until it finishes) and `predict` (then
`predict --resume`). After every kill the run directory holds only complete files (each checkpoint loads,
metrics.csv parses), the prediction file is absent or complete, and the resumed work ends with the same numbers
as an uninterrupted run.

A kill during `data download` is covered by tests/data/test_download.py::test_kill_and_resume (a slow server,
SIGKILL part-way, the re-run fetches only what is missing and clears the temporaries); not repeated here.
"""
from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from taxonomist.train.checkpoint import load_checkpoint, read_metadata

from .conftest import VENV_BIN, tiny_config, tiny_overrides

EPOCHS = 3
N_IMAGES, CHUNK = 400, 40
SEED = 20261126     # the kill moments are random, but the same on every run of the suite


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _train_argv(data: Path, out: Path, *extra: str) -> list[str]:
    argv = [str(VENV_BIN / "taxonomist"), "train", "--no-eval", "--no-calibrate", *extra]
    for item in tiny_overrides(data, out, f"train.epochs={EPOCHS}", "train.threads=1"):
        argv += ["--set", item]
    return argv


def _metrics(run: Path) -> list[dict]:
    if not (run / "metrics.csv").exists():
        return []
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _assert_run_is_whole(run: Path) -> None:
    """Whatever a kill left: every checkpoint with its JSON loads, metrics.csv parses row by row."""
    ckpts = sorted((run / "checkpoints").glob("*.safetensors")) if (run / "checkpoints").exists() else []
    for ckpt in ckpts:
        load_checkpoint(ckpt)
        assert read_metadata(ckpt)["epoch"] >= 1
    for row in _metrics(run):
        assert float(row["val_loss"]) == float(row["val_loss"])     # a number, not a cut-off cell


def _kill_at_random(argv: list[str], run: Path, rng: random.Random, window: float) -> bool:
    """Start `argv`, wait until it has finished one more epoch, then SIGKILL it at a random moment of the
    following `window` seconds (a step of the next epoch, validation, or a checkpoint being written).
    Returns False when the run ended before the kill."""
    done = len(_metrics(run))
    proc = subprocess.Popen(argv, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while len(_metrics(run)) <= done and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(rng.uniform(0, window))
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def test_training_killed_at_a_random_step_resumes_to_the_same_metrics(tiny_data, tmp_path):
    """tests/train/test_loop.py kills right after epoch 1; here the kill lands at a random moment of epoch 2
    (seeded), and the run directory must still be whole before `--resume` finishes it."""
    from taxonomist.train import train

    full = tmp_path / "full"
    # one thread, as in the killed subprocesses: another thread count changes the float reduction order
    train(tiny_config(tiny_data, full, f"train.epochs={EPOCHS}", "train.threads=1"), progress=False,
          log=lambda *_: None)
    # an epoch's training + validation time, as this machine measured it (metrics.csv `seconds`)
    epoch_seconds = min(float(row["seconds"]) for row in _metrics(full))

    killed = tmp_path / "killed"
    rng = random.Random(SEED)
    assert _kill_at_random(_train_argv(tiny_data, killed), killed, rng, epoch_seconds), "finished before the kill"
    _assert_run_is_whole(killed)
    assert len(_metrics(killed)) < EPOCHS
    proc = subprocess.run(_train_argv(tiny_data, killed, "--resume"), env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    _assert_run_is_whole(killed)
    a, b = _metrics(full), _metrics(killed)
    assert len(a) == len(b) == EPOCHS
    for col in ("train_loss", "val_loss", "val_top1", "val_mhd", "val_macro_f1"):
        assert [float(r[col]) for r in a] == pytest.approx([float(r[col]) for r in b], rel=1e-5, abs=1e-6), col


def test_a_run_killed_before_its_first_resume_state_can_start_again(tiny_data, tiny_run, tmp_path):
    """A kill between the first last.safetensors and last.state.pt left a run that neither --resume (nothing to
    resume) nor a fresh start ("already holds a run") accepted; a fresh start now takes it over."""
    import shutil

    from taxonomist.errors import ModelError
    from taxonomist.train import train

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "checkpoints" / "last.state.pt").unlink()
    with pytest.raises(ModelError, match="nothing to resume"):
        train(tiny_config(tiny_data, run), progress=False, resume=True, log=lambda *_: None)
    train(tiny_config(tiny_data, run), progress=False, log=lambda *_: None)
    assert (run / "checkpoints" / "last.state.pt").exists() and len(_metrics(run)) == 1


@pytest.fixture(scope="module")
def many_images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("many_images")
    rng = np.random.default_rng(1)
    for k in range(N_IMAGES):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(folder / f"{k:04d}.png")
    return folder


def _predict_argv(run: Path, images: Path, out: Path, *extra: str) -> list[str]:
    return [str(VENV_BIN / "taxonomist"), "predict", str(run), "--images", str(images), "--out", str(out),
            "--workers", "0", "--device", "cpu", "--batch-size", "16", "--chunk-size", str(CHUNK), *extra]


def test_predict_killed_leaves_no_partial_csv_and_resumes(tiny_run, many_images, tmp_path):
    """SIGKILL once a random number of chunks (1 to all but two) is on disk, at a random moment within the next
    one: no CSV under the final name; `--resume` keeps the finished chunks and writes the same table as an
    uninterrupted run. (Waiting a random time instead let a quiet machine finish every chunk first.)"""
    from taxonomist.inference import predict
    from taxonomist.inference.sharding import parts_folder

    whole = tmp_path / "whole.csv"
    predict(tiny_run, many_images, whole, batch_size=16, device="cpu", num_workers=0, progress=False,
            chunk_size=CHUNK)

    out = tmp_path / "out.csv"
    rng = random.Random(SEED)
    proc = subprocess.Popen(_predict_argv(tiny_run, many_images, out), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline, target = time.time() + 300, rng.randint(1, N_IMAGES // CHUNK - 2)
    while (len(list(parts_folder(out).glob("chunk-*"))) < target and proc.poll() is None
           and time.time() < deadline):
        time.sleep(0.002)
    time.sleep(rng.uniform(0, 0.01))
    assert proc.poll() is None, "predict finished before the kill"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    finished = len(list(parts_folder(out).glob("chunk-*")))
    assert 1 <= finished < N_IMAGES // CHUNK

    proc = subprocess.run(_predict_argv(tiny_run, many_images, out, "--resume"), env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"resumed: {finished} of {N_IMAGES // CHUNK} chunks" in proc.stdout + proc.stderr
    pd.testing.assert_frame_equal(pd.read_csv(whole), pd.read_csv(out))
    assert not parts_folder(out).exists()
