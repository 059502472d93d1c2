"""Augmentation presets: each preset's values, explicit keys over presets, the `auto` budget rule, the run's
config.yaml and --resume, the transforms built from them, MixUp/CutMix with every loss, one-line errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from taxonomist.config import AugmentConfig, Config, load_config
from taxonomist.data import augment_presets
from taxonomist.data.augment_presets import (AUTO_LIGHT_BELOW, PRESETS, STRENGTH_FIELDS, describe_augment,
                                             resolve_augment)
from taxonomist.data.transforms import TimmRandAugment, build_transforms
from taxonomist.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
GEOMETRY = {"ratio": (0.75, 1.333), "hflip": 0.5, "vflip": 0.5, "rotate90": True, "crop_pct": 0.875}


@pytest.mark.parametrize("name, values", [
    ("light", {"scale": (0.7, 1.0), "rotation": 0.0, "color_jitter": 0.0, "randaugment": "", "mixup": 0.0,
               "cutmix": 0.0}),
    ("default", {"scale": (0.35, 1.0), "rotation": 15.0, "color_jitter": 0.2, "randaugment": "rand-m7-mstd0.5",
                 "mixup": 0.0, "cutmix": 0.0}),
    ("heavy", {"scale": (0.25, 1.0), "rotation": 30.0, "color_jitter": 0.3, "randaugment": "rand-m9-mstd0.5",
               "mixup": 0.8, "cutmix": 1.0}),
])
def test_each_preset_sets_its_strength_and_leaves_the_geometry(name, values):
    resolved = resolve_augment(load_config(overrides=[f"augment.preset={name}"]).augment, epochs=2, train_images=10)
    assert {key: getattr(resolved, key) for key in STRENGTH_FIELDS} == values
    assert {key: getattr(resolved, key) for key in GEOMETRY} == GEOMETRY
    assert resolved.preset == name
    # geometry the user set stays whatever the preset
    fungi = resolve_augment(AugmentConfig(preset=name, vflip=0.0, rotate90=False, ratio=(0.5, 2.0), crop_pct=1.0))
    assert (fungi.vflip, fungi.rotate90, fungi.ratio, fungi.crop_pct) == (0.0, False, (0.5, 2.0), 1.0)
    assert resolve_augment(resolved) == resolved  # resolving twice changes nothing


def test_unset_config_resolves_to_the_values_before_presets_when_no_budget_is_known():
    """What users had before presets (and still get from `build_transforms` outside a training run)."""
    cfg = Config()
    assert cfg.augment.preset == "auto" and all(getattr(cfg.augment, key) is None for key in STRENGTH_FIELDS)
    old = resolve_augment(cfg.augment)
    assert (old.preset, old.scale, old.rotation, old.color_jitter, old.randaugment, old.mixup, old.cutmix) == \
        ("default", (0.35, 1.0), 15.0, 0.2, "rand-m7-mstd0.5", 0.0, 0.0)


@pytest.mark.parametrize("epochs, images, expected", [
    (1, AUTO_LIGHT_BELOW - 1, "light"), (1, AUTO_LIGHT_BELOW, "default"),
    (2, AUTO_LIGHT_BELOW // 2 - 1, "light"), (2, AUTO_LIGHT_BELOW // 2, "default"),
    (10, 17_000, "default"), (2, 17_000, "light"), (None, 17_000, "default"), (2, None, "default"),
])
def test_auto_picks_light_below_the_budget_and_default_from_it(epochs, images, expected):
    assert resolve_augment(AugmentConfig(), epochs=epochs, train_images=images).preset == expected
    # heavy is never chosen by auto, and a named preset ignores the budget
    assert resolve_augment(AugmentConfig(preset="heavy"), epochs=epochs, train_images=images).preset == "heavy"
    assert resolve_augment(AugmentConfig(preset="light"), epochs=1000, train_images=10**6).preset == "light"


def test_the_threshold_is_one_constant_that_help_and_docs_state():
    from taxonomist.cli.train import EXAMPLE

    assert AUTO_LIGHT_BELOW == 100_000
    training = (REPO / "docs" / "training.md").read_text(encoding="utf-8")
    section = training.split("## Augmentation presets", 1)[1].split("\n## ", 1)[0]
    for text in (EXAMPLE, section):
        assert f"{AUTO_LIGHT_BELOW:,}" in text and "augment.preset" in text
    for name, values in PRESETS.items():  # the docs' table row of each preset holds its values
        row = next(line for line in section.splitlines() if line.startswith(f"| `{name}` |"))
        assert f"{values['scale'][0]}" in row and (values["randaugment"] or "off") in row, name
    assert section.rstrip().endswith("Measured on PlanktonSet: see "
                                     "[docs/benchmarks/plankton-ndsb.md](benchmarks/plankton-ndsb.md).")


def test_explicit_keys_win_over_the_preset_even_when_equal_to_its_value(tmp_path):
    # --set: a value equal to default's RandAugment stays when auto picks light; empty text turns it off
    cfg = load_config(overrides=["augment.randaugment=rand-m7-mstd0.5", "augment.scale=0.35,1.0"])
    light = resolve_augment(cfg.augment, epochs=1, train_images=10)
    assert (light.preset, light.randaugment, light.scale, light.rotation) == ("light", "rand-m7-mstd0.5",
                                                                               (0.35, 1.0), 0.0)
    heavy = resolve_augment(load_config(overrides=["augment.preset=heavy", "augment.randaugment=",
                                                   "augment.mixup=0"]).augment)
    assert (heavy.randaugment, heavy.mixup, heavy.cutmix, heavy.scale) == ("", 0.0, 1.0, (0.25, 1.0))
    # `null` (or an empty number) hands a key back to the preset
    again = load_config(overrides=["augment.randaugment=rand-m9", "augment.randaugment=null", "augment.rotation="])
    assert again.augment.randaugment is None and again.augment.rotation is None
    # YAML: '' is off, null and an empty value are the preset's
    path = tmp_path / "c.yaml"
    path.write_text("augment:\n  preset: heavy\n  randaugment: ''\n  rotation:\n  scale: null\n", encoding="utf-8")
    aug = load_config(path).augment
    assert (aug.preset, aug.randaugment, aug.rotation, aug.scale) == ("heavy", "", None, None)
    assert resolve_augment(aug).randaugment == "" and resolve_augment(aug).rotation == 30.0
    # an unset config and a resolved one both survive the YAML round trip
    resolved = Config()
    resolved.augment = resolve_augment(resolved.augment, epochs=1, train_images=10)
    for config in (Config(), resolved):
        assert load_config(None, base=yaml.safe_load(config.to_yaml())) == config


def test_the_log_line_names_the_preset_the_reason_and_the_keys_that_differ():
    assert describe_augment(AugmentConfig(), epochs=2, train_images=17_000) == \
        "augmentation: light (preset auto: 2 epochs × 17,000 images = 34,000 < 100,000)"
    assert describe_augment(AugmentConfig(scale=(0.5, 1.0), rotation=0.0), epochs=1, train_images=200_000) == \
        "augmentation: default (preset auto: 1 epoch × 200,000 images = 200,000 ≥ 100,000), with scale=(0.5, 1.0), " \
        "rotation=0.0"
    assert describe_augment(AugmentConfig(preset="heavy")) == "augmentation: heavy (preset heavy)"
    assert describe_augment(AugmentConfig()) == "augmentation: default (preset auto: no training budget known)"
    saved = resolve_augment(AugmentConfig(), epochs=1, train_images=10)
    assert describe_augment(AugmentConfig(), epochs=50, train_images=10**6, saved=saved) == \
        "augmentation: light (preset auto: kept from the run's config.yaml)"


def test_unknown_preset_is_a_one_line_error_naming_value_and_choices(tmp_path):
    from taxonomist.train.loop import train

    expected = "augment.preset 'strong': expected one of auto, light, default, heavy"
    with pytest.raises(ConfigError) as e:
        resolve_augment(AugmentConfig(preset="strong"), epochs=1, train_images=10)
    assert str(e.value) == expected
    with pytest.raises(ConfigError, match="augment.preset 'strong'"):
        build_transforms(load_config(overrides=["augment.preset=strong"]), train=True)
    # train refuses it before reading any data or writing the run directory
    cfg = load_config(overrides=["augment.preset=strong", f"data.root={tmp_path / 'none'}", f"out={tmp_path / 'r'}"])
    with pytest.raises(ConfigError) as e:
        train(cfg, progress=False, log=lambda *_: None)
    assert str(e.value) == expected and "\n" not in str(e.value) and not (tmp_path / "r").exists()


def _train_steps(preset: str) -> list:
    cfg = load_config(overrides=[f"augment.preset={preset}", "data.image_size=32"])
    return build_transforms(cfg, train=True).transforms


def test_light_transform_has_no_randaugment_and_heavy_has_it():
    from torchvision.transforms import v2

    light, heavy = _train_steps("light"), _train_steps("heavy")
    assert not any(isinstance(s, (TimmRandAugment, v2.RandomRotation, v2.ColorJitter)) for s in light)
    assert light[0].scale == (0.7, 1.0)
    rand = [s for s in heavy if isinstance(s, TimmRandAugment)]
    assert len(rand) == 1 and rand[0].spec == "rand-m9-mstd0.5" and rand[0].m == 9.0
    assert heavy[0].scale == (0.25, 1.0)
    assert next(s for s in heavy if isinstance(s, v2.RandomRotation)).degrees == [-30.0, 30.0]
    # an explicit key beats the preset in the built transform too
    cfg = load_config(overrides=["augment.preset=heavy", "augment.randaugment=", "data.image_size=32"])
    assert not any(isinstance(s, TimmRandAugment) for s in build_transforms(cfg, train=True).transforms)


@pytest.mark.parametrize("loss", ["ce", "focal", "soft_labels"])
def test_heavy_mixup_and_cutmix_work_with_every_loss(loss):
    """heavy's MixUp 0.8 / CutMix 1.0 give (B, L) soft targets: every loss (with the distance term, class weights,
    rank heads and two streams) returns a finite loss and gradients for them."""
    from timm.data import Mixup

    from taxonomist.config import LossConfig
    from taxonomist.losses import build_loss
    from taxonomist.taxonomy import Taxonomy, lca_distance

    torch.manual_seed(0)
    tax = Taxonomy.from_parents({"R": None, "G1": "R", "G2": "R", "A": "G1", "B": "G1", "C": "G2"},
                                labels=["A", "B", "C", "G2"])
    heavy = resolve_augment(AugmentConfig(preset="heavy"))
    mix = Mixup(mixup_alpha=heavy.mixup, cutmix_alpha=heavy.cutmix, label_smoothing=0.0, num_classes=4)
    criterion = build_loss(LossConfig(name=loss, distance_weight=0.5, class_weights="inverse"), tax,
                           lca_distance(tax), np.array([3, 2, 2, 1]))
    for _ in range(4):  # MixUp and CutMix batches both
        image, target = mix(torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 3]))
        assert target.shape == (4, 4) and torch.allclose(target.sum(1), torch.ones(4))
        pooled = image.mean(dim=(2, 3))
        weights = torch.randn(3, 4, requires_grad=True)
        outputs = {"logits": pooled @ weights,
                   "rank_logits": {"depth1": pooled[:, :2] @ weights[:2, :2], "depth2": pooled @ weights[:, :3]},
                   "stream_logits": {"roi": pooled @ weights, "context": pooled @ weights * 0.5}}
        total, parts = criterion(outputs, target)
        total.backward()
        assert np.isfinite(parts["total"]) and torch.isfinite(weights.grad).all() and weights.grad.abs().sum() > 0


def _tiny(data: Path, out: Path, *extra: str) -> Config:
    return load_config(None, [
        f"data.root={data}", f"out={out}", "data.image_size=32", "data.num_workers=0",
        "model.backbone=test_efficientnet", "model.pretrained=none", "train.batch_size=8",
        "train.device=cpu", "train.tensorboard=false", *extra])


def test_run_config_records_the_resolution_and_resume_keeps_it(synth_dataset, tmp_path, monkeypatch):
    from taxonomist.data.dataset import load_dataset
    from taxonomist.data.split import split_rows
    from taxonomist.train import train

    torch.set_num_threads(1)
    data = synth_dataset(n_taxa=3, per_class=8)
    run = tmp_path / "run"
    cfg = _tiny(data, run, "train.epochs=1", "augment.rotation=5")
    n = len(split_rows(load_dataset(data), cfg)[0])
    lines: list[str] = []
    train(cfg, progress=False, log=lines.append)
    assert f"augmentation: light (preset auto: 1 epoch × {n} images = {n} < 100,000), with rotation=5.0" in lines
    assert cfg.augment.preset == "auto" and cfg.augment.scale is None   # the caller's config is not changed
    saved = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))["augment"]
    assert saved == {"preset": "light", "scale": [0.7, 1.0], "ratio": [0.75, 1.333], "hflip": 0.5, "vflip": 0.5,
                     "rotate90": True, "rotation": 5.0, "color_jitter": 0.0, "randaugment": "", "mixup": 0.0,
                     "cutmix": 0.0, "crop_pct": 0.875}
    # re-running the saved config trains the same way whatever its budget
    rerun = load_config(run / "config.yaml")
    assert resolve_augment(rerun.augment, epochs=100, train_images=10**6) == resolve_augment(
        cfg.augment, epochs=1, train_images=n)

    # --resume with more epochs under a threshold that would now pick `default`: the run keeps `light`
    monkeypatch.setattr(augment_presets, "AUTO_LIGHT_BELOW", 1)
    assert resolve_augment(AugmentConfig(), epochs=2, train_images=n).preset == "default"
    lines.clear()
    train(_tiny(data, run, "train.epochs=2", "augment.rotation=5"), progress=False, resume=True, log=lines.append)
    assert "augmentation: light (preset auto: kept from the run's config.yaml), with rotation=5.0" in lines
    assert yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))["augment"] == saved
    assert len((run / "metrics.csv").read_text().splitlines()) == 3   # header + 2 epochs: it did train on
    # a preset named at the resume wins over the recorded one
    lines.clear()
    train(_tiny(data, run, "train.epochs=3", "augment.preset=heavy"), progress=False, resume=True, log=lines.append)
    assert "augmentation: heavy (preset heavy)" in lines
    assert yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))["augment"]["mixup"] == 0.8


def test_a_sweep_can_search_the_preset_and_a_strength_left_to_it():
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    from taxonomist.sweep.space import parse_space

    params = {p.key: p.distribution for p in parse_space({
        "augment.preset": {"choice": ["light", "default", "heavy"]}, "augment.mixup": {"uniform": [0, 0.8]},
        "augment.randaugment": {"choice": ["", "rand-m9-mstd0.5"]}})}
    assert params == {"augment.preset": CategoricalDistribution(["light", "default", "heavy"]),
                      "augment.mixup": FloatDistribution(0.0, 0.8),
                      "augment.randaugment": CategoricalDistribution(["", "rand-m9-mstd0.5"])}
    with pytest.raises(ConfigError, match="augment.rotation"):
        parse_space({"augment.rotation": {"uniform": [0, 200]}})


def test_kfold_decides_auto_once_for_every_fold(tmp_path, monkeypatch):
    """Folds differ a little in size: near the threshold each could pick another preset, so k-fold resolves
    once (the first fold's budget) and every fold's train() gets the same resolved values."""
    from taxonomist.data.split import split_dataset
    from taxonomist.data.synth import synthesize
    from taxonomist.train import kfold

    data = tmp_path / "data"
    synthesize(data, n_taxa=3, per_class=6, image_size=32, seed=5)
    split_dataset(data, folds=3, test=0.0, seed=0)
    seen: list = []
    lines: list[str] = []

    class Stop(Exception):
        pass

    def fake_train(cfg, **_):  # the first fold's config is enough: the folds share the copy made before the loop
        seen.append(cfg.augment)
        raise Stop

    monkeypatch.setattr(kfold, "train", fake_train)
    cfg = _tiny(data, tmp_path / "cv", "train.epochs=2")
    with pytest.raises(Stop):
        kfold.train_kfold(cfg, progress=False, log=lines.append)
    assert lines[0].startswith("augmentation: light (preset auto: 2 epochs × ")
    assert seen[0].preset == "light" and seen[0].randaugment == "" and seen[0].scale == (0.7, 1.0)
    assert cfg.augment.preset == "auto"  # the caller's config is not changed
