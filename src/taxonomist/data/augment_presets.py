"""Augmentation presets (`augment.preset`): named strengths of the training transforms, and the budget rule
that picks one for `auto`. `resolve_augment` is the one place where a config's strength fields get values.

A preset sets only the strength fields (`STRENGTH_FIELDS`); flips, 90° turns, the crop's aspect range and
`crop_pct` describe the dataset's geometry and stay as configured. A strength field the user set (anything
but None) wins over the preset, even when it equals the preset's value.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from taxonomist.config import AugmentConfig, load_config
from taxonomist.errors import ConfigError

#: the fields a preset supplies; None in an `AugmentConfig` means "from the preset"
STRENGTH_FIELDS = ("scale", "rotation", "color_jitter", "randaugment", "mixup", "cutmix")

#: light: no RandAugment, rotation or jitter, gentle crops; default: the values before presets existed
#: (the seed project's); heavy: timm's ImageNet-style recipe (RandAugment m9, MixUp 0.8 / CutMix 1.0)
PRESETS: dict[str, dict[str, Any]] = {
    "light": {"scale": (0.7, 1.0), "rotation": 0.0, "color_jitter": 0.0, "randaugment": "",
              "mixup": 0.0, "cutmix": 0.0},
    "default": {"scale": (0.35, 1.0), "rotation": 15.0, "color_jitter": 0.2, "randaugment": "rand-m7-mstd0.5",
                "mixup": 0.0, "cutmix": 0.0},
    "heavy": {"scale": (0.25, 1.0), "rotation": 30.0, "color_jitter": 0.3, "randaugment": "rand-m9-mstd0.5",
              "mixup": 0.8, "cutmix": 1.0},
}
PRESET_CHOICES = ("auto", *PRESETS)

#: `auto` picks `light` below this training budget (epochs × training images) and `default` from it on: at
#: short budgets strong RandAugment and deep random-resized crops cost more accuracy than they buy. The
#: measurement behind the value is in docs/benchmarks/plankton-ndsb.md (augmentation presets); docs/training.md
#: ("Augmentation presets") states the rule. `heavy` is never chosen automatically.
AUTO_LIGHT_BELOW = 100_000


def check_preset(preset: str) -> str:
    """Return `preset` when it names a preset, else raise a one-line ConfigError naming the value and the choices.

    >>> check_preset("light")
    'light'
    >>> check_preset("strong")
    Traceback (most recent call last):
    taxonomist.errors.ConfigError: augment.preset 'strong': expected one of auto, light, default, heavy
    """
    if preset not in PRESET_CHOICES:
        raise ConfigError(f"augment.preset {preset!r}: expected one of {', '.join(PRESET_CHOICES)}")
    return preset


def choose_preset(preset: str, epochs: int | None = None, train_images: int | None = None) -> tuple[str, str]:
    """The preset that `preset` stands for (`auto` decided by the budget epochs × train_images), and why.

    Without a budget (transforms built outside a training run) `auto` means `default`.

    >>> choose_preset("auto", 2, 17_000)
    ('light', 'preset auto: 2 epochs × 17,000 images = 34,000 < 100,000')
    >>> choose_preset("auto", 10, 17_000)[0], choose_preset("auto")[0], choose_preset("heavy", 2, 10)
    ('default', 'default', ('heavy', 'preset heavy'))
    """
    check_preset(preset)
    if preset != "auto":
        return preset, f"preset {preset}"
    if epochs is None or train_images is None:
        return "default", "preset auto: no training budget known"
    budget = int(epochs) * int(train_images)
    name, sign = ("light", "<") if budget < AUTO_LIGHT_BELOW else ("default", "≥")
    return name, (f"preset auto: {epochs} epoch{'s' if epochs != 1 else ''} × {train_images:,} images = "
                  f"{budget:,} {sign} {AUTO_LIGHT_BELOW:,}")


def resolve_augment(aug: AugmentConfig, epochs: int | None = None, train_images: int | None = None,
                    saved: AugmentConfig | None = None) -> AugmentConfig:
    """A copy of `aug` with every strength field set: the user's value where given, else the preset's.

    `preset` in the result is the preset used (`auto` becomes `light` or `default`), so the result saved as a
    run's config.yaml trains the same way again whatever the budget. `saved` (a resumed run's own resolved
    augmentation) wins over `auto`: a run resumed with more epochs keeps the augmentation it started with.
    Already resolved configs come back unchanged.

    >>> light = resolve_augment(AugmentConfig(), epochs=2, train_images=1_000)
    >>> light.preset, light.scale, light.randaugment, light.hflip
    ('light', (0.7, 1.0), '', 0.5)
    >>> mine = resolve_augment(AugmentConfig(preset="heavy", scale=(0.35, 1.0)))
    >>> mine.scale, mine.randaugment, mine.mixup
    ((0.35, 1.0), 'rand-m9-mstd0.5', 0.8)
    """
    name, _ = choose_preset(aug.preset, epochs, train_images)
    values = dict(PRESETS[name])
    if aug.preset == "auto" and saved is not None:
        name = saved.preset if saved.preset in PRESETS else "default"  # a config from before presets: its values
        values.update({key: getattr(saved, key) for key in STRENGTH_FIELDS if getattr(saved, key) is not None})
    values.update({key: getattr(aug, key) for key in STRENGTH_FIELDS if getattr(aug, key) is not None})
    return dataclasses.replace(aug, preset=name, **values)


def describe_augment(aug: AugmentConfig, epochs: int | None = None, train_images: int | None = None,
                     saved: AugmentConfig | None = None) -> str:
    """The log line of `resolve_augment(aug, …)`: the preset used, why, and the fields that differ from it.

    >>> describe_augment(AugmentConfig(randaugment=""), epochs=20, train_images=17_000)
    "augmentation: default (preset auto: 20 epochs × 17,000 images = 340,000 ≥ 100,000), with randaugment=''"
    """
    resolved = resolve_augment(aug, epochs, train_images, saved)
    if aug.preset == "auto" and saved is not None:
        why = "preset auto: kept from the run's config.yaml"
    else:
        why = choose_preset(aug.preset, epochs, train_images)[1]
    preset = PRESETS[resolved.preset]
    changed = [f"{key}={_show(getattr(resolved, key))}" for key in STRENGTH_FIELDS
               if getattr(resolved, key) != preset[key]]
    return f"augmentation: {resolved.preset} ({why})" + (f", with {', '.join(changed)}" if changed else "")


def saved_augment(run_dir: str | Path) -> AugmentConfig | None:
    """The augmentation a run directory's config.yaml recorded, or None when it has none (or cannot be read)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    try:
        return load_config(path).augment
    except ConfigError:
        return None


def _show(value: Any) -> str:
    return repr(tuple(value)) if isinstance(value, (list, tuple)) else repr(value)
