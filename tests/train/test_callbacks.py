"""The callback surface of `train()`: every epoch's row reaches a callback, a callback stops training, and a
failure runs the cleanup once."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest

from taxonomist.config import load_config
from taxonomist.train import loop
from taxonomist.train.callbacks import Callback, CallbackList
from taxonomist.utils.run_status import read_status


@pytest.fixture
def tiny_data(synth_dataset) -> Path:
    return synth_dataset(n_taxa=4, per_class=8, seed=3, val=0.25)


def tiny_config(data: Path, out: Path, *extra: str):
    return load_config(None, [
        f"data.root={data}", f"out={out}", "data.image_size=32", "data.num_workers=0",
        "model.backbone=test_efficientnet", "model.pretrained=none", "train.batch_size=8", "train.epochs=3",
        "train.device=cpu", "train.tensorboard=false", "augment.randaugment=", *extra])


class Recorder(Callback):
    def __init__(self, stop_after: int | None = None, fail_at_batch: tuple[int, int] | None = None):
        self.events, self.rows, self.batches = [], [], []
        self.stop_after, self.fail_at_batch = stop_after, fail_at_batch

    def on_train_start(self, run):
        self.events.append("start")

    def on_epoch_start(self, run, epoch):
        self.events.append(f"epoch {epoch}")

    def on_batch_end(self, run, batch):
        self.batches.append((batch.epoch, batch.step, batch.batches, batch.seen))
        assert batch.waited >= 0 and batch.loss_sum > 0
        if (batch.epoch, batch.step) == self.fail_at_batch:
            raise RuntimeError("out of memory (pretend)")

    def on_epoch_end(self, run, row):
        self.rows.append(dict(row))
        row["val_mhd"] = -1.0  # a copy: what a callback does to it changes nothing else
        return self.stop_after is not None and row["epoch"] >= self.stop_after

    def on_train_end(self, run):
        self.events.append("end")


def read_metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_a_callback_sees_every_epoch_and_batch(tiny_data, tmp_path):
    seen, other = Recorder(), Recorder()
    result = loop.train(tiny_config(tiny_data, tmp_path / "run"), progress=False, log=lambda *_: None,
                        callbacks=[seen, other])
    assert seen.events == ["start", "epoch 0", "epoch 1", "epoch 2", "end"]
    assert [r["epoch"] for r in seen.rows] == [1, 2, 3]
    rows = read_metrics(tmp_path / "run")
    assert [float(r["val_mhd"]) for r in rows] == pytest.approx([r["val_mhd"] for r in result.history], rel=1e-5)
    assert other.rows[0]["val_mhd"] == result.history[0]["val_mhd"] >= 0  # not the first callback's -1
    per_epoch = len(seen.batches) // 3
    assert per_epoch == seen.batches[0][2] >= 2
    assert [b[1] for b in seen.batches[:per_epoch]] == list(range(per_epoch))
    assert seen.batches[per_epoch - 1][3] == 8 * per_epoch  # images seen by the epoch's last batch


def test_a_callback_stops_training_after_an_epoch(tiny_data, tmp_path):
    lines: list[str] = []
    stop = Recorder(stop_after=2)
    result = loop.train(tiny_config(tiny_data, tmp_path / "run"), progress=False, log=lines.append,
                        callbacks=[stop])
    assert len(result.history) == 2 and len(read_metrics(tmp_path / "run")) == 2
    assert "training stopped by a callback after epoch 2/3" in lines
    status = read_status(tmp_path / "run")
    assert status["status"] == "trained" and status["epochs_trained"] == 2
    assert stop.events[-1] == "end"


def test_a_failure_in_training_runs_the_cleanup_once(tiny_data, tmp_path, monkeypatch):
    closed = []
    from taxonomist.data import loading
    monkeypatch.setattr(loading.TaxonLoader, "close", lambda self: closed.append(self), raising=True)
    failing = Recorder(fail_at_batch=(1, 0))
    ends = []
    monkeypatch.setattr(CallbackList, "on_train_end",
                        lambda self, run, _real=CallbackList.on_train_end: (ends.append(1), _real(self, run)))
    with pytest.raises(RuntimeError, match="out of memory"):
        loop.train(tiny_config(tiny_data, tmp_path / "run"), progress=False, log=lambda *_: None,
                   callbacks=[failing])
    assert len(closed) == 2 and len(set(map(id, closed))) == 2  # the train and val loaders, once each
    assert ends == [1] and failing.events == ["start", "epoch 0", "epoch 1", "end"]
    assert len(read_metrics(tmp_path / "run")) == 1  # epoch 1 is on disk: --resume continues from it
    assert read_status(tmp_path / "run")["status"] == "training"


def test_a_callback_needs_only_the_hooks_it_uses(tiny_data, tmp_path):
    class Last:
        def on_epoch_end(self, run, row):
            self.epoch = row["epoch"]

    last = Last()
    loop.train(tiny_config(tiny_data, tmp_path / "run", "train.epochs=1"), progress=False, log=lambda *_: None,
               callbacks=[last])
    assert last.epoch == 1
