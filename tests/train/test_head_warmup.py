"""LP-FT head warm-up: when it runs, that it fits the head alone on the frozen features (folded exactly back to
raw features), and that training runs it before the first fine-tuning step."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from taxonomist.config import Config, load_config
from taxonomist.data.dataset import load_dataset
from taxonomist.data.loading import TaxonDataset, build_loader, build_transforms
from taxonomist.errors import ConfigError
from taxonomist.losses import build_loss
from taxonomist.models import build_model
from taxonomist.taxonomy import distance_matrix
from taxonomist.train import head_warmup as hw

TINY = ["data.image_size=32", "data.num_workers=0", "model.backbone=test_efficientnet", "model.pretrained=none",
        "train.batch_size=8", "train.epochs=1", "train.device=cpu", "train.tensorboard=false",
        "augment.randaugment="]


@pytest.fixture(scope="module")
def tiny_data(synth_dataset) -> Path:
    return synth_dataset(n_taxa=5, per_class=16, seed=7)


@pytest.mark.parametrize("mode, source, finetune, head, expected", [
    ("auto", "lite0-offline", "full", "flat", True),     # the default: offline Lite0 weights
    ("auto", "timm", "last_n", "multirank", True),
    ("auto", "file:/w/backbone.safetensors", "lora", "flat", True),
    ("auto", "none", "full", "flat", False),              # random weights: nothing to protect
    ("auto", "factory", "full", "flat", False),           # a user's module: not known to be pretrained
    ("auto", "timm", "linear", "flat", False),            # a linear probe trains the head alone anyway
    ("on", "none", "full", "flat", True),
    ("on", "timm", "full", "two_stream", False),
    ("off", "timm", "full", "flat", False),
])
def test_when_the_head_is_warmed_up(mode, source, finetune, head, expected):
    cfg = load_config(None, [f"train.head_warmup={mode}", f"model.finetune={finetune}"])
    assert hw.head_warmup_reason(cfg, source, head)[0] is expected


def test_the_default_config_warms_up_the_default_backbone():
    cfg = Config()
    assert cfg.train.head_warmup == "auto" and cfg.model.backbone == "tf_efficientnet_lite0"
    assert hw.head_warmup_reason(cfg, "lite0-offline", cfg.model.head) == (True, "pretrained backbone (lite0-offline)")
    with pytest.raises(ConfigError, match="train.head_warmup 'sometimes': choose one of auto, on, off"):
        hw.check_head_warmup("sometimes")


def test_warm_up_fits_the_head_alone_and_folds_the_standardisation_exactly(tiny_data):
    torch.manual_seed(0)
    cfg = load_config(None, [f"data.root={tiny_data}", *TINY])
    dataset = load_dataset(tiny_data)
    tax = dataset.taxonomy
    model = build_model(cfg.model, tax, 32)
    pre = model.preprocessing
    tf = build_transforms(cfg, False, pre["mean"], pre["std"], pre["interpolation"])
    rows = dataset.annotations[dataset.annotations["split"] == "train"]
    index = {lab: i for i, lab in enumerate(tax.labels)}
    loader = build_loader(TaxonDataset(dataset, rows, tf, label_index=index), 8, train=False, num_workers=0)
    labels = list(tax.labels)
    criterion = build_loss(cfg.loss, tax, distance_matrix(tax, "lca", labels, labels), None)
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head_before = model.head.fc.weight.clone()

    done = hw.warm_up_head(model, loader, criterion, torch.device("cpu"), epochs=30, seed=0)

    assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in backbone_before.items())
    assert not torch.equal(head_before, model.head.fc.weight)
    assert done.images == len(rows) == 60 and done.epochs == 30
    assert done.train_top1 > 0.5       # five labels: well above chance on the images it was fitted on
    # the folded head on raw features gives the accuracy the warm-up reports
    model.eval()
    hits = 0
    with torch.no_grad():
        for batch in loader:
            hits += int((model(batch["image"])["logits"].argmax(1) == batch["target"]).sum())
    assert hits / len(rows) == pytest.approx(done.train_top1)
    assert "head warm-up (LP-FT): head fitted on the frozen backbone's features of 60 training images" in done.summary()


def test_training_warms_the_head_up_before_the_first_fine_tuning_step(tiny_data, tmp_path, monkeypatch):
    from taxonomist.train import loop
    from taxonomist.train.step import TrainStep

    events = []
    real_warm, real_step = hw.warm_up_head, TrainStep.__call__

    def warm(*args, **kwargs):
        events.append("warm-up")
        return real_warm(*args, **kwargs)

    def step(self, *args, **kwargs):
        events.append("step")
        return real_step(self, *args, **kwargs)
    monkeypatch.setattr(loop, "warm_up_head", warm)
    monkeypatch.setattr(TrainStep, "__call__", step)
    lines = []
    cfg = load_config(None, [f"data.root={tiny_data}", f"out={tmp_path / 'on'}", *TINY, "train.head_warmup=on"])
    loop.train(cfg, progress=False, log=lines.append)
    assert events[0] == "warm-up" and events.count("warm-up") == 1 and events[1:] and set(events[1:]) == {"step"}
    assert any(line.startswith("head warm-up (LP-FT)") for line in lines)
    warmed = loop.load_history(tmp_path / "on")

    events.clear()
    cfg = load_config(None, [f"data.root={tiny_data}", f"out={tmp_path / 'auto'}", *TINY])  # auto, random weights
    loop.train(cfg, progress=False, log=lines.append)
    assert "warm-up" not in events
    # fine-tuning from a warmed-up head runs at head_warmup_lr_scale (0.3) × train.lr; without it at train.lr
    assert max(r["lr"] for r in warmed) <= 0.3 * cfg.train.lr + 1e-12
    assert max(r["lr"] for r in loop.load_history(tmp_path / "auto")) > 0.3 * cfg.train.lr


@pytest.mark.parametrize("value, warmed_up, expected", [("auto", True, True), ("auto", False, False),
                                                        ("on", False, True), ("off", True, False)])
def test_freeze_bn_stats_follows_the_warm_up(value, warmed_up, expected):
    cfg = load_config(None, [f"train.freeze_bn_stats={value}"])
    assert hw.freeze_bn_stats(cfg, warmed_up) is expected
    with pytest.raises(ConfigError, match="train.freeze_bn_stats 'yes'"):
        hw.freeze_bn_stats(load_config(None, ["train.freeze_bn_stats=yes"]), True)


def test_a_warmed_up_run_keeps_the_loaded_batchnorm_statistics(tiny_data, tmp_path):
    """With the warm-up (and freeze_bn_stats auto), every BatchNorm normalises with the statistics the head was
    fitted on: running statistics unchanged by training, while the weights train."""
    from torch.nn.modules.batchnorm import _BatchNorm

    from taxonomist.train import train
    from taxonomist.train.checkpoint import load_checkpoint

    cfg = load_config(None, [f"data.root={tiny_data}", f"out={tmp_path / 'run'}", *TINY, "train.head_warmup=on",
                             "train.seed=3"])
    torch.manual_seed(3)
    initial = build_model(cfg.model, load_dataset(tiny_data).taxonomy, 32)
    train(cfg, progress=False, log=lambda _: None)
    trained, _, _ = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.safetensors", device="cpu")
    bn = [(n, m) for n, m in trained.backbone.named_modules() if isinstance(m, _BatchNorm)]
    assert bn
    start = dict(initial.backbone.named_modules())
    assert all(torch.equal(m.running_mean, start[n].running_mean) for n, m in bn)
    assert any(not torch.equal(m.weight, start[n].weight) for n, m in bn)   # the affine parameters trained
    trained.freeze_norm_stats = True
    trained.train()
    assert all(not m.training for _, m in bn) and trained.head.training



def test_the_warmed_up_head_stays_the_best_checkpoint_unless_an_epoch_beats_it(tiny_data, tmp_path):
    """A fine-tuning that only makes things worse (a learning rate of 3, gradients unclipped) must not cost the
    user the head it started from: best.safetensors is then the warmed-up head, epoch 0."""
    import json

    from taxonomist.train import train

    cfg = load_config(None, [f"data.root={tiny_data}", f"out={tmp_path / 'run'}", *TINY, "train.head_warmup=on",
                             "train.epochs=2", "train.lr=3", "train.head_warmup_lr_scale=1", "train.grad_clip=0",
                             "train.warmup_epochs=0"])
    lines = []
    result = train(cfg, progress=False, log=lines.append)
    best = json.loads((tmp_path / "run" / "checkpoints" / "best.json").read_text())
    assert result.warmup_metrics is not None and any(line.startswith("warmed-up head on val") for line in lines)
    assert min(r["val_mhd"] for r in result.history) > result.warmup_metrics["val_mhd"]  # every epoch did worse
    assert result.best_epoch == 0 and best["epoch"] == 0
    assert result.best_metric == pytest.approx(result.warmup_metrics["val_mhd"])
    assert [int(r["epoch"]) for r in result.history] == [1, 2]   # metrics.csv keeps one row per epoch
    status = json.loads((tmp_path / "run" / "run.json").read_text())
    assert status["warm_up"]["val_mhd"] == pytest.approx(result.warmup_metrics["val_mhd"])
