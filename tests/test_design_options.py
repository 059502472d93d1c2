"""The options DESIGN.md promises users of the seed projects, each shown to have its effect end to end.

Already covered elsewhere (not repeated here): the ε/γ/α arithmetic of the loss terms
(tests/losses/test_loss_terms.py), param groups of head lr / layer decay (tests/models/test_finetune.py),
`module:` factories (tests/models/test_backbones.py), back-off thresholds in `predict`
(tests/inference/test_predict.py), `ece_uncalibrated`, OOD at a threshold and `--critical`
(tests/evaluate/test_run.py), `data split --classes` and named `--ood-taxa` (tests/data/test_split.py).
"""
from __future__ import annotations

import csv
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torchvision.transforms import v2

from taxonomist.cli.main import main
from taxonomist.config import Config, load_config
from taxonomist.data.augment_presets import resolve_augment
from taxonomist.data.split import split_dataset
from taxonomist.data.synth import synthesize
from taxonomist.data.transforms import RandomRotate90, TimmRandAugment, build_transforms
from taxonomist.losses import build_loss, cross_entropy, focal_loss
from taxonomist.taxonomy import read_taxonomy
from taxonomist.train import train
from taxonomist.train.checkpoint import read_metadata


class TinyBlocks(nn.Module):
    """A backbone timm does not have, reached as `module:test_design_options:tiny_backbone`."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU()),
                                    nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU()))
        self.num_features = 16

    def forward(self, x):
        return self.blocks(x).mean(dim=(2, 3))


def tiny_backbone():
    return TinyBlocks()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("design") / "synth"
    synthesize(root, n_taxa=6, per_class=8, image_size=32, seed=5, context=False)
    split_dataset(root, val=0.25, test=0.25, seed=0)
    return root


def tiny(data: Path, out: Path, *extra: str) -> Config:
    return load_config(None, [
        f"data.root={data}", f"out={out}", "data.image_size=32", "data.num_workers=0",
        "model.backbone=test_efficientnet", "model.pretrained=none", "train.batch_size=8", "train.epochs=3",
        "train.lr=3e-3", "train.device=cpu", "train.tensorboard=false", "augment.randaugment=", *extra])


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------- augmentation
def test_augmentation_defaults_are_the_seed_projects():
    cfg = Config()
    steps = build_transforms(cfg, train=True).transforms
    kinds = [type(s) for s in steps]
    assert kinds[:6] == [v2.RandomResizedCrop, v2.RandomHorizontalFlip, v2.RandomVerticalFlip, RandomRotate90,
                         v2.RandomRotation, v2.ColorJitter]
    assert TimmRandAugment in kinds
    assert steps[1].p == 0.5 and steps[2].p == 0.5 and steps[4].degrees == [-15.0, 15.0]
    assert steps[5].brightness == steps[5].contrast == steps[5].saturation == (0.8, 1.2)   # jitter 0.2
    aug = resolve_augment(cfg.augment)                     # auto, no training budget: the default preset
    assert aug.mixup == 0 and aug.cutmix == 0                                              # off by default
    eval_steps = build_transforms(cfg, train=False).transforms
    assert [type(s) for s in eval_steps[:2]] == [v2.Resize, v2.CenterCrop]
    assert not any("Random" in type(s).__name__ or isinstance(s, TimmRandAugment) for s in eval_steps)
    # the effect: two draws of the train transform differ, the eval transform is a function of the image
    image = torch.randint(0, 256, (3, 40, 56), dtype=torch.uint8)
    torch.manual_seed(0)
    train_t = build_transforms(cfg, train=True)
    assert not torch.equal(train_t(image), train_t(image))
    eval_t = build_transforms(cfg, train=False)
    assert torch.equal(eval_t(image), eval_t(image)) and eval_t(image).shape == (3, 224, 224)


# ------------------------------------------------------------------------------------------- loss defaults
def test_default_loss_is_smoothed_ce_and_focal_defaults_are_gamma2_alpha_half(data):
    tax = read_taxonomy(data / "taxonomy.csv")
    n = len(tax.labels)
    D = np.ones((n, n)) - np.eye(n)
    logits = torch.randn(5, n, generator=torch.Generator().manual_seed(0)) * 3
    target = torch.tensor([0, 1, 2, 3, 4])
    cfg = Config()
    loss = cfg.loss
    assert (loss.name, loss.label_smoothing, loss.focal_gamma, loss.focal_alpha) == ("ce", 0.1, 2.0, 0.5)
    ce, _ = build_loss(cfg.loss, tax, D)({"logits": logits}, target)
    torch.testing.assert_close(ce, cross_entropy(logits, target, label_smoothing=0.1).mean())
    # smoothing 0.1 has an effect: a perfectly sure right answer still costs something
    sure = torch.full((1, n), -30.0)
    sure[0, 0] = 30.0
    assert build_loss(cfg.loss, tax, D)({"logits": sure}, torch.tensor([0]))[0] > 1.0
    cfg.loss.label_smoothing = 0.0
    assert build_loss(cfg.loss, tax, D)({"logits": sure}, torch.tensor([0]))[0] < 1e-6
    focal_cfg = load_config(None, ["loss.name=focal"]).loss
    focal, _ = build_loss(focal_cfg, tax, D)({"logits": logits}, target)
    torch.testing.assert_close(focal, focal_loss(logits, target, gamma=2.0, alpha=0.5, label_smoothing=0.1).mean())
    assert focal < 0.5 * ce   # (1-p)^2 and α = 0.5 both shrink the loss


# ------------------------------------------------------------------------------------------- training options
@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """Two short runs: val_loss + save_every=1 + a 10× head lr; val_macro_f1 on a `module:` backbone."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("design_runs")
    quiet = dict(progress=False, log=lambda *_: None)
    a = train(tiny(data, out / "a", "train.monitor=val_loss", "train.save_every=1", "train.head_lr=0.03",
                   "train.scheduler=constant", "train.warmup_epochs=0"), **quiet)
    b = train(tiny(data, out / "b", "train.monitor=val_macro_f1",
                   f"model.backbone=module:{__name__}:tiny_backbone"), **quiet)
    return a, b


def test_monitor_picks_the_best_epoch_of_its_own_column(runs):
    for result, column, pick in ((runs[0], "val_loss", np.argmin), (runs[1], "val_macro_f1", np.argmax)):
        rows = read_rows(result.run_dir / "metrics.csv")
        values = np.array([float(r[column]) for r in rows])
        assert result.monitor == column
        assert result.best_epoch == int(pick(values)) + 1            # the first epoch at the optimum
        meta = read_metadata(result.run_dir / "checkpoints" / "best.safetensors")
        assert meta["epoch"] == result.best_epoch and meta["monitor"] == column
        assert meta["metrics"][column] == pytest.approx(values[result.best_epoch - 1], rel=1e-5)  # CSV: 6 digits


def test_save_every_1_leaves_one_checkpoint_per_epoch(runs):
    a, b = runs
    names = sorted(p.name for p in (a.run_dir / "checkpoints").glob("epoch_*.safetensors"))
    assert names == ["epoch_1.safetensors", "epoch_2.safetensors", "epoch_3.safetensors"]
    assert [read_metadata(a.run_dir / "checkpoints" / n)["epoch"] for n in names] == [1, 2, 3]
    assert not list((b.run_dir / "checkpoints").glob("epoch_*"))   # 0 (default): best and last only


def test_head_lr_reaches_the_optimizer(runs):
    # constant schedule, no warmup: the logged lr (the largest group's) is the head's, 10× train.lr
    assert [float(r["lr"]) for r in read_rows(runs[0].run_dir / "metrics.csv")] == pytest.approx([0.03] * 3)


def test_module_backbone_trains_and_is_recorded(runs):
    meta = read_metadata(runs[1].run_dir / "checkpoints" / "last.safetensors")
    assert meta["backbone"] == f"module:{__name__}:tiny_backbone"
    losses = [float(r["train_loss"]) for r in read_rows(runs[1].run_dir / "metrics.csv")]
    assert all(np.isfinite(losses))


def test_predict_thresholds_back_off_from_the_cli(runs, data, tmp_path, capsys):
    ckpt = str(runs[0].run_dir / "checkpoints" / "best.safetensors")
    fast = ["--images", str(data), "--split", "test", "--device", "cpu", "--workers", "0"]
    assert main(["predict", ckpt, *fast, "--out", str(tmp_path / "plain.csv"), "--decision", "backoff",
                 "--thresholds", "0.0"]) == 0
    assert main(["predict", ckpt, *fast, "--out", str(tmp_path / "strict.csv"), "--decision", "backoff",
                 "--thresholds", "1.0"]) == 0
    plain = pd.read_csv(tmp_path / "plain.csv", keep_default_na=False)
    strict = pd.read_csv(tmp_path / "strict.csv", keep_default_na=False)
    labels = set(read_taxonomy(data / "taxonomy.csv").labels)
    assert set(plain["prediction"]) <= labels                  # threshold 0: never backs off
    assert not set(strict["prediction"]) & labels              # threshold 1: always backs off to an ancestor


# ------------------------------------------------------------------------------------------- no taxonomy.csv
def test_without_taxonomy_csv_one_warning_line_and_mhd_is_twice_the_error(data, tmp_path, capsys):
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(data / "annotations.csv", flat / "annotations.csv")
    (flat / "images").symlink_to(data / "images")
    sets = [f"data.root={flat}", f"out={tmp_path / 'run'}", "data.image_size=32", "data.num_workers=0",
            "model.backbone=test_efficientnet", "model.pretrained=none", "train.batch_size=8", "train.epochs=1",
            "train.device=cpu", "train.tensorboard=false", "augment.randaugment="]
    torch.set_num_threads(1)
    # the whole `taxonomist train` (train, calibrate, evaluate, report) as a user runs it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["train", *[a for kv in sets for a in ("--set", kv)]]) == 0
    out = capsys.readouterr()
    # the loop logs its warnings with the progress lines; a Python warning would reach stderr
    lines = [ln for ln in (out.out + out.err).splitlines() if "warning" in ln.lower()]
    lines += [f"warning: {w.message}" for w in caught if issubclass(w.category, UserWarning)]
    assert len(lines) == 1, lines
    assert "flat taxonomy" in lines[0] and "2 × the error rate" in lines[0]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["mhd"] == pytest.approx(2 * (1 - metrics["top1"]))
    assert metrics["top1"] < 1.0   # one epoch: some errors, so the identity is not 0 = 0


# ------------------------------------------------------------------------------------------- metrics.json keys
def test_multirank_run_reports_consistency_and_uncalibrated_ece(data, tmp_path):
    torch.set_num_threads(1)
    result = train(tiny(data, tmp_path / "mr", "model.head=multirank", "train.epochs=2"), progress=False,
                   log=lambda *_: None)
    from taxonomist.evaluate.run import evaluate_run
    ev = evaluate_run(result.run_dir, device="cpu", batch_size=16, num_workers=0, progress=False)
    metrics = json.loads((ev.out_dir / "metrics.json").read_text())
    assert 0.0 <= metrics["consistency"] <= 1.0
    assert 0.0 <= metrics["ece_uncalibrated"] <= 1.0 and "ece" in metrics
    assert metrics["n"] == int((pd.read_csv(data / "annotations.csv")["split"] == "test").sum())
