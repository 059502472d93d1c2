"""Training loop: learning, run directory, checkpoints, resume after kill -9, K-fold, DDP on gloo."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from taxonomist.config import load_config
from taxonomist.data.split import split_dataset
from taxonomist.data.synth import synthesize
from taxonomist.errors import ConfigError, DataError
from taxonomist.train import train
from taxonomist.train.checkpoint import load_checkpoint, read_metadata

VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "synth"
    synthesize(root, n_taxa=6, per_class=12, image_size=32, seed=3)
    split_dataset(root, val=0.25, test=0.0, seed=0)
    return root


def tiny_config(data: Path, out: Path, *extra: str):
    return load_config(None, [
        f"data.root={data}", f"out={out}", "data.image_size=32", "data.num_workers=0",
        "model.backbone=test_efficientnet", "model.pretrained=none", "train.batch_size=8", "train.epochs=3",
        "train.lr=3e-3", "train.device=cpu", "train.tensorboard=false", "augment.randaugment=", *extra])


def read_metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_train_writes_run_directory_and_learns(tiny_data, tmp_path):
    torch.set_num_threads(1)
    cfg = tiny_config(tiny_data, tmp_path / "run", "train.epochs=6", "augment.scale=0.8,1.0", "augment.rotation=0")
    result = train(cfg, progress=False, log=lambda *_: None)
    run = tmp_path / "run"
    for name in ("config.yaml", "taxonomy.csv", "metrics.csv", "checkpoints/best.safetensors",
                 "checkpoints/best.json", "checkpoints/last.safetensors", "checkpoints/last.json"):
        assert (run / name).is_file(), name
    rows = read_metrics(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert set(rows[0]) >= {"train_loss", "val_loss", "val_top1", "val_mhd", "val_macro_f1", "train_macro_f1", "lr",
                            "img_s"}
    losses = [float(r["train_loss"]) for r in rows]
    assert losses[-1] < losses[0]  # it learns
    assert 1 <= result.best_epoch <= 6
    best = min(float(r["val_mhd"]) for r in rows)
    assert result.best_metric == pytest.approx(best, rel=1e-5)

    meta = read_metadata(run / "checkpoints" / "best.safetensors")
    assert meta["epoch"] == result.best_epoch
    assert meta["backbone"] == "test_efficientnet" and meta["image_size"] == 32
    assert len(meta["labels"]) == 6 and meta["taxonomy_hash"]
    model, _, taxonomy = load_checkpoint(run)
    assert list(taxonomy.labels) == meta["labels"]
    x = torch.zeros(2, 3, 32, 32)
    with torch.no_grad():
        assert model(x)["logits"].shape == (2, 6)


def test_refuses_to_overwrite_a_run_and_needs_data_root(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path / "run", "train.epochs=1")
    train(cfg, progress=False, log=lambda *_: None)
    with pytest.raises(ConfigError, match="--resume"):
        train(cfg, progress=False, log=lambda *_: None)
    with pytest.raises(ConfigError, match="data.root"):
        train(load_config(None, [f"out={tmp_path / 'x'}"]), progress=False)


@pytest.mark.parametrize("head,extra", [("multirank", []), ("two_stream", [])])
def test_other_heads_train(tiny_data, tmp_path, head, extra):
    torch.set_num_threads(1)
    cfg = tiny_config(tiny_data, tmp_path / "run", f"model.head={head}", "train.epochs=1", *extra)
    train(cfg, progress=False, log=lambda *_: None)
    meta = read_metadata(tmp_path / "run" / "checkpoints" / "best.safetensors")
    assert meta["head"] == head
    model, _, _ = load_checkpoint(tmp_path / "run")
    x = torch.zeros(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x, x) if head == "two_stream" else model(x)
    assert out["logits"].shape == (2, 6)
    if head == "multirank":
        assert out["rank_logits"]


def test_mixup_and_distance_loss_run(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path / "run", "train.epochs=1", "augment.mixup=0.2", "augment.cutmix=1.0",
                      "loss.distance_weight=0.5", "train.ema=true", "train.accumulate=2")
    result = train(cfg, progress=False, log=lambda *_: None)
    assert np.isfinite(result.history[0]["train_loss"])


def _cli_train(data: Path, out: Path, *extra: str) -> list[str]:
    return [str(VENV_BIN / "taxonomist"), "train", "--no-eval",
            "--set", f"data.root={data}", "--set", f"out={out}", "--set", "data.image_size=32",
            "--set", "data.num_workers=0", "--set", "model.backbone=test_efficientnet",
            "--set", "model.pretrained=none", "--set", "train.batch_size=8", "--set", "train.epochs=4",
            "--set", "train.device=cpu", "--set", "train.tensorboard=false", *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def test_resume_after_kill_matches_uninterrupted_run(tiny_data, tmp_path):
    """kill -9 after the first epoch, then --resume: the final metrics equal an uninterrupted run."""
    full = tmp_path / "full"
    subprocess.run(_cli_train(tiny_data, full), check=True, env=_env(), capture_output=True, timeout=300)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli_train(tiny_data, killed), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline:
        if (killed / "metrics.csv").exists() and len(read_metrics(killed)) >= 1 and \
                (killed / "checkpoints" / "last.state.pt").exists():
            break
        if proc.poll() is not None:
            pytest.fail("training finished before it could be killed")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(read_metrics(killed))
    assert done < 4, "the run must be killed before its end"
    resumed = subprocess.run(_cli_train(tiny_data, killed) + ["--resume"], env=_env(), capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    a, b = read_metrics(full), read_metrics(killed)
    assert len(a) == len(b) == 4
    for col in ("train_loss", "val_loss", "val_top1", "val_mhd", "val_macro_f1"):
        assert [float(r[col]) for r in a] == pytest.approx([float(r[col]) for r in b], rel=1e-5, abs=1e-6), col


def test_kfold_writes_out_of_fold_predictions(tmp_path):
    from taxonomist.train.kfold import train_kfold
    data = tmp_path / "data"
    synthesize(data, n_taxa=4, per_class=8, image_size=32, seed=5)
    split_dataset(data, folds=2, test=0.0, seed=0)
    cfg = tiny_config(data, tmp_path / "cv", "train.epochs=1")
    result = train_kfold(cfg, progress=False, log=lambda *_: None)
    assert len(result.folds) == 2
    with open(tmp_path / "cv" / "oof_predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 32  # every labelled row predicted once, by the model that did not train on it
    assert {r["fold"] for r in rows} == {"0", "1"}
    assert np.load(tmp_path / "cv" / "oof_logits.npy").shape == (32, 4)
    assert 0.0 <= result.oof_top1 <= 1.0


def test_fold_without_fold_column_is_an_error(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path / "run", "data.fold=1")
    with pytest.raises(DataError, match="fold"):
        train(cfg, progress=False)


@pytest.mark.skipif(sys.platform != "linux", reason="gloo DDP test runs on Linux")
def test_ddp_two_cpu_processes(tiny_data, tmp_path):
    """torchrun with 2 processes on gloo: rank 0 writes the run directory, both ranks finish."""
    out = tmp_path / "ddp"
    cmd = [str(VENV_BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "taxonomist.cli.main"]
    cmd += _cli_train(tiny_data, out, "--set", "train.epochs=2")[1:]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = read_metrics(out)
    assert len(rows) == 2
    assert (out / "checkpoints" / "best.safetensors").is_file()
