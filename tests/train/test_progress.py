"""What `taxonomist train` says while it runs (issue 23): the plan line first, then on a terminal the progress bar,
and in a log (a pipe, a file) progress lines within each epoch and one line per epoch, each as soon as it is said."""
from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from taxonomist.data.split import split_dataset
from taxonomist.data.synth import synthesize
from taxonomist.train.progress import ProgressLines, format_plan, median_image_side

VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "synth"
    synthesize(root, n_taxa=4, per_class=10, image_size=32, seed=1, context=False)
    split_dataset(root, val=0.25, test=0.0, seed=0)
    return root


def _train_command(data: Path, out: Path, *extra: str) -> list[str]:
    return [str(VENV_BIN / "taxonomist"), "train", "--no-eval", "--no-calibrate",
            "--set", f"data.root={data}", "--set", f"out={out}", "--set", "data.image_size=32",
            "--set", "data.num_workers=0", "--set", "model.backbone=test_efficientnet",
            "--set", "model.pretrained=none", "--set", "train.batch_size=4", "--set", "train.epochs=2",
            "--set", "train.device=cpu", "--set", "train.threads=1", "--set", "train.tensorboard=false", *extra]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "COLUMNS": "120"}


def test_plan_line_names_data_model_device_threads_epochs_size_and_out():
    line = format_plan(root="data/synth", n_train=672, n_val=144, n_labels=24, backbone="tf_efficientnet_lite0",
                       head="flat", pretrained="auto", epochs=5, image_size=224, batch_size=32, device="cpu",
                       threads=2, workers=1, out="runs/first", image_side=96)
    assert line == ("training tf_efficientnet_lite0 (flat head, pretrained auto) on data/synth: 672 train + 144 val "
                    "images, 24 labels; 5 epochs at 224 px (the images are ~96 px: upsampled 2.3x), batch 32; cpu, "
                    "2 torch threads + 1 loader worker; run directory runs/first")
    fitting = format_plan(root="d", n_train=1, n_val=1, n_labels=2, backbone="b", head="multirank", pretrained="none",
                          epochs=1, image_size=96, batch_size=8, device="cuda", threads=1, workers=4, out="o",
                          processes=2, image_side=96)
    assert "1 epoch at 96 px, batch 8; cuda, 1 torch thread + 4 loader workers, × 2 processes;" in fitting


def test_median_image_side_reads_headers_and_skips_unreadable(tiny_data, tmp_path):
    paths = ["images/missing.jpg"] + [p.relative_to(tiny_data).as_posix()
                                      for p in sorted((tiny_data / "images").rglob("*.jpg"))]
    assert median_image_side(tiny_data, paths) == 32
    assert median_image_side(tmp_path, ["nothing.jpg"]) is None


def test_progress_lines_every_n_seconds_and_never_after_the_last_batch():
    now = [0.0]
    lines: list[str] = []
    ticker = ProgressLines(lines.append, "epoch 2/5", total=100, every_s=30, clock=lambda: now[0])
    for done in range(1, 101):
        now[0] = done * 1.0  # one batch a second: a line at 30 s and 60 s and 90 s
        ticker.update(done, seen=32 * done, loss_sum=2.0 * 32 * done)
    assert [line.split("  ")[1] for line in lines] == ["batch 30/100 (30 %)", "batch 60/100 (60 %)",
                                                       "batch 90/100 (90 %)"]
    assert lines[0] == "epoch 2/5  batch 30/100 (30 %)  loss 2.000  32 img/s  1 min 10 s left in the epoch"


def test_in_a_pipe_the_plan_comes_first_then_progress_and_epoch_lines_as_they_happen(tiny_data, tmp_path):
    proc = subprocess.Popen(_train_command(tiny_data, tmp_path / "run", "--set", "train.log_seconds=0"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env(), text=True)
    first = proc.stdout.readline()
    running_after_first_line = proc.poll() is None  # flushed: the line came while training still ran
    rest = proc.stdout.read()
    assert proc.wait(timeout=300) == 0, first + rest
    assert running_after_first_line
    assert first.startswith(f"training test_efficientnet (flat head, pretrained none) on {tiny_data}: 28 train + "
                            "12 val images, 4 labels; 2 epochs at 32 px, batch 4; cpu, 1 torch thread + 0 loader "
                            f"workers; run directory {tmp_path / 'run'}")
    lines = rest.splitlines()
    progress = [line for line in lines if "  batch " in line]
    assert [line.split("  ")[:2] for line in progress[:2]] == [["epoch 1/2", "batch 1/7 (14 %)"],
                                                              ["epoch 1/2", "batch 2/7 (29 %)"]]
    assert len(progress) == 2 * 6  # every batch but the last of each epoch, whose epoch line follows
    epochs = [line for line in lines if line.startswith("epoch ") and "train loss" in line]
    assert len(epochs) == 2
    assert "\r" not in rest and "batch/s" not in rest and "s/batch" not in rest  # no progress bar in a log


def test_on_a_terminal_the_bar_shows_progress_and_the_log_stays_clean(tiny_data, tmp_path):
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a terminal has a size
    proc = subprocess.Popen(_train_command(tiny_data, tmp_path / "run", "--set", "train.log_seconds=0"),
                            stdin=follower, stdout=follower, stderr=follower, env=_env(), close_fds=True)
    os.close(follower)
    chunks, deadline = [], time.monotonic() + 300
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 1.0)
        if ready:
            try:
                data = os.read(leader, 65536)
            except OSError:  # the terminal closed: the process ended
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(leader)
    assert proc.wait(timeout=60) == 0
    text = b"".join(chunks).decode("utf-8", "replace")
    assert text.lstrip().startswith("training test_efficientnet (flat head, pretrained none)")
    assert "batch/s" in text or "s/batch" in text  # tqdm's bar, on the terminal
    assert "(14 %)" not in text  # no progress lines on a terminal: the bar says it
    assert text.count("train loss") == 2
