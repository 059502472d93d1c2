"""The one typed configuration: dataclasses read from YAML, overridden with `--set a.b=value`.

Every run directory holds the resolved config as `config.yaml`; loading it back gives the same object.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from taxonomist.errors import ConfigError
from taxonomist.taxonomy.core import suggest
from taxonomist.utils.safe_parse import parse_yaml, read_yaml, shorten


@dataclass
class DataConfig:
    root: str = ""                      #: dataset directory (annotations.csv, taxonomy.csv, images/)
    image_size: int = 224               #: network input side in pixels
    taxonomy: str = ""                  #: taxonomy file or `fathomnet2025`; default: ROOT/taxonomy.csv
    val_fraction: float = 0.15          #: held-out share when annotations.csv has no split column
    fold: int = -1                      #: with a `fold` column: train on the other folds, validate on this one
    input: str = "roi"                  #: `roi` (path) or `context` (context_path) for single-stream models
    num_workers: int = -1               #: DataLoader workers; -1 = chosen for the machine
    cache: str = ""                     #: folder for the pre-resized uint8 cache; empty = no cache
    strict: bool = False                #: fail on a corrupt image instead of skipping and listing it
    resize: str = "stretch"             #: how a non-square image reaches a square input: `stretch` or `pad`
    grayscale: bool = False             #: convert to grey and repeat over 3 channels (plankton, sonar)


@dataclass
class AugmentConfig:
    #: named strength: `auto` | `light` | `default` | `heavy` (data/augment_presets.py). It fills the strength
    #: fields left unset (scale, rotation, color_jitter, randaugment, mixup, cutmix); a field set here wins.
    #: `auto` = `light` when epochs × training images < 100,000, else `default` (docs/training.md)
    preset: str = "auto"
    scale: tuple[float, float] | None = None    #: random-resized-crop area range; unset = preset (default (0.35, 1))
    ratio: tuple[float, float] = (0.75, 1.333)  #: random-resized-crop aspect range
    hflip: float = 0.5
    vflip: float = 0.5                   #: organisms in ROIs and plankton have no "up"
    rotate90: bool = True                #: random multiples of 90°
    rotation: float | None = None        #: extra random rotation, degrees; unset = preset (default 15)
    color_jitter: float | None = None    #: unset = preset (default 0.2)
    randaugment: str | None = None       #: timm RandAugment spec; empty = off; unset = preset (default rand-m7-mstd0.5)
    mixup: float | None = None           #: MixUp alpha; 0 = off; unset = preset (default 0)
    cutmix: float | None = None          #: CutMix alpha; 0 = off; unset = preset (default 0)
    crop_pct: float = 0.875              #: eval: resize to image_size / crop_pct, then centre-crop


@dataclass
class LoraConfig:
    r: int = 0                           #: LoRA rank; 0 = no adapters
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["qkv", "proj", "fc1", "fc2", "conv_pw", "conv_pwl"])


@dataclass
class ModelConfig:
    backbone: str = "tf_efficientnet_lite0"  #: a timm name, or `module:PACKAGE.PATH:FACTORY`
    pretrained: str = "auto"             #: `auto` | `none` | PATH to a state dict
    head: str = "flat"                   #: `flat` | `multirank` | `two_stream`
    finetune: str = "full"               #: `full` | `linear` (probe) | `last_n` (last N blocks) | `lora`
    last_n_blocks: int = 2
    drop_rate: float = 0.2
    shared_backbone: bool = True         #: two_stream: one backbone for ROI and context, or two
    fusion_temperature: float = 1.0      #: two_stream: stream weight ∝ exp(-entropy / T)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class LossConfig:
    name: str = "ce"                     #: `ce` | `focal` | `soft_labels`
    label_smoothing: float = 0.1
    focal_gamma: float = 2.0
    focal_alpha: float = 0.5
    distance_weight: float = 0.0         #: weight of the expected taxonomic distance term
    soft_label_temperature: float = 1.0  #: `soft_labels`: target ∝ exp(-D(y, j) / T)
    class_weights: str = "none"          #: `none` | `inverse` | `effective`
    effective_beta: float = 0.999
    rank_weights: dict[str, float] = field(default_factory=dict)  #: multirank: weight per rank (default 1)
    consistency_weight: float = 0.1      #: multirank: agreement between rank heads


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    head_lr: float = 0.0                 #: 0 = same as lr
    layer_decay: float = 0.0             #: 0 = off; e.g. 0.75 for layer-wise lr decay
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    #: LP-FT: fit the head on the frozen backbone's features before fine-tuning; `auto` = for pretrained
    #: backbones that training changes (docs/training.md), `on`, `off`
    head_warmup: str = "auto"
    head_warmup_epochs: int = 10         #: epochs of head training over the cached features
    head_warmup_lr_scale: float = 0.3    #: after a head warm-up, every learning rate × this (gentler fine-tuning)
    #: BatchNorm running statistics during training: `auto` = kept as loaded when the head is warmed up (the
    #: warmed head was fitted on those features), `on` = always kept, `off` = updated from the training batches
    freeze_bn_stats: str = "auto"
    scheduler: str = "cosine"            #: `cosine` | `plateau` | `constant`
    grad_clip: float = 1.0               #: 0 = off
    accumulate: int = 1                  #: gradient accumulation steps
    amp: bool = True                     #: bf16 autocast on CUDA (ignored on CPU)
    compile: bool = False                #: torch.compile the model
    channels_last: bool = True
    ema: bool = False
    ema_decay: float = 0.999
    patience: int = 0                    #: early stopping after N epochs without improvement; 0 = off
    monitor: str = "val_mhd"             #: `val_mhd` | `val_loss` | `val_macro_f1`
    save_every: int = 0                  #: also keep epoch_N checkpoints every N epochs; 0 = best and last only
    device: str = "auto"                 #: `auto` (cuda → mps → cpu) | `cpu` | `cuda` | `mps`
    threads: int = 0                     #: CPU intra-op threads; 0 = cores not used by loader workers
    seed: int = 0
    max_steps: int = 0                   #: stop after N optimizer steps (smoke tests); 0 = no limit
    log_every: int = 10                  #: batches between updates of the progress bar's loss and img/s
    #: without a terminal (a log file, a pipe, a batch job): a progress line within an epoch every N seconds
    #: (0 = after every batch); the epoch lines come either way
    log_seconds: float = 30.0
    tensorboard: bool = True
    wandb: str = ""                      #: wandb project name; empty = off


@dataclass
class DecideConfig:
    metric: str = "auto"                 #: distance metric: `auto` | `fathomnet2025` | `lca`
    decision: str = "argmax"             #: `argmax` | `min-risk` | `backoff` | `selective`
    candidates: str = ""                 #: empty = training labels; `all`; `fathomnet2025`; or a file
    thresholds: dict[str, float] = field(default_factory=lambda: {
        "species": 0.55, "genus": 0.60, "family": 0.65, "order": 0.70,
        "class": 0.75, "phylum": 0.80, "kingdom": 0.85})
    #: OOD scores that need the model (`odin`, `mc-dropout`), fitted on the val rows when `train` calibrates,
    #: so that `predict --ood odin` has a threshold; empty = only the scores fitted from features and logits
    model_ood: list[str] = field(default_factory=list)
    #: what the temperature is fitted for on the val rows: `nll` (the labels' log loss, the usual temperature
    #: scaling), `node-nll` (the log loss of every node on the true lineage), `risk` (the mean distance of the
    #: min-risk answers over `candidates`), or `none` (T = 1)
    temperature: str = "nll"


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decide: DecideConfig = field(default_factory=DecideConfig)
    out: str = "runs/run"                #: run directory

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric key: `low`‥`high` (None = unbounded), each end closed unless `*_open`.

    >>> str(Range(0, 1, high_open=True)), 1.5 in Range(0, 1, high_open=True), str(Range(0, low_open=True))
    ('[0, 1)', False, '> 0')
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    note: str = ""                       #: what the special values mean, e.g. "0 = off"

    def __contains__(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or not (value > self.high or (self.high_open and value == self.high))

    def __str__(self) -> str:
        if self.high is None:
            text = f"{'>' if self.low_open else '>='} {self.low:g}"
        else:
            text = f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        return f"{text} ({self.note})" if self.note else text


_PROBABILITY = Range(0, 1)
_FRACTION = Range(0, 1, high_open=True)   # a share, a smoothing or a decay that must leave something
_NONNEGATIVE = Range(0)
_POSITIVE = Range(0, low_open=True)
_COUNT = Range(1)

#: The valid range of every numeric config key (each element of a pair, each value of a mapping). A value
#: outside it is a one-line ConfigError naming the key, the value and the range, whether it comes from a YAML
#: file, `--set` or a sweep. tests/test_config.py checks that every int/float key is listed here.
RANGES: dict[str, Range] = {
    "data.image_size": Range(8, 4096),
    "data.val_fraction": _FRACTION,
    "data.fold": Range(-1, note="-1 = no fold column"),
    "data.num_workers": Range(-1, 1024, note="-1 = chosen for the machine"),
    "augment.scale": Range(0, 1, low_open=True),
    "augment.ratio": _POSITIVE,
    "augment.hflip": _PROBABILITY,
    "augment.vflip": _PROBABILITY,
    "augment.rotation": Range(0, 180),
    "augment.color_jitter": _NONNEGATIVE,
    "augment.mixup": Range(0, note="0 = off"),
    "augment.cutmix": Range(0, note="0 = off"),
    "augment.crop_pct": Range(0, 1, low_open=True),
    "model.last_n_blocks": _COUNT,
    "model.drop_rate": _FRACTION,
    "model.fusion_temperature": _POSITIVE,
    "model.lora.r": Range(0, 4096, note="0 = no adapters"),
    "model.lora.alpha": _COUNT,
    "model.lora.dropout": _FRACTION,
    "loss.label_smoothing": _FRACTION,
    "loss.focal_gamma": _NONNEGATIVE,
    "loss.focal_alpha": _PROBABILITY,
    "loss.distance_weight": _NONNEGATIVE,
    "loss.soft_label_temperature": _POSITIVE,
    "loss.effective_beta": _FRACTION,
    "loss.rank_weights": _NONNEGATIVE,
    "loss.consistency_weight": _NONNEGATIVE,
    "train.epochs": Range(0, 1_000_000, note="0 = evaluate as is, no training"),
    "train.batch_size": Range(1, 1 << 20),
    "train.lr": _POSITIVE,
    "train.head_lr": Range(0, note="0 = same as lr"),
    "train.layer_decay": Range(0, 1, note="0 = off"),
    "train.weight_decay": _NONNEGATIVE,
    "train.warmup_epochs": _NONNEGATIVE,
    "train.head_warmup_epochs": Range(1, 1000),
    "train.head_warmup_lr_scale": Range(0, 1, low_open=True),
    "train.grad_clip": Range(0, note="0 = off"),
    "train.accumulate": Range(1, 1 << 20),
    "train.ema_decay": _FRACTION,
    "train.patience": Range(0, note="0 = off"),
    "train.save_every": Range(0, note="0 = best and last only"),
    "train.threads": Range(0, 1024, note="0 = chosen for the machine"),
    "train.seed": Range(0, 2**32 - 1),
    "train.max_steps": Range(0, note="0 = no limit"),
    "train.log_every": _COUNT,
    "train.log_seconds": Range(0, note="0 = after every batch"),
    "decide.thresholds": _PROBABILITY,
}


def check_range(key: str, value: Any) -> None:
    """Raise a ConfigError when the numeric value of `key` (a number, pair or mapping) is outside `RANGES`.

    >>> check_range("data.val_fraction", 1.5)
    Traceback (most recent call last):
    taxonomist.errors.ConfigError: config key data.val_fraction: 1.5 is out of range; valid: [0, 1)
    """
    valid = RANGES.get(key)
    if valid is None:
        return
    if isinstance(value, dict):
        for name, v in value.items():
            _check_one(f"{key}.{name}", v, valid)
        return
    if isinstance(value, (tuple, list)):
        for v in value:
            _check_one(key, v, valid)
        if len(value) == 2 and value[0] > value[1]:
            raise ConfigError(f"config key {key}: {shorten(tuple(value))} is out of order; valid: min <= max, "
                              f"each {valid}")
        return
    _check_one(key, value, valid)


def _check_one(key: str, value: Any, valid: Range) -> None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value not in valid:
        raise ConfigError(f"config key {key}: {shorten(value)} is out of range; valid: {valid}")


def value_type(hint: Any) -> Any:
    """The type a set value of a field has: `float | None` (unset = a default chosen later) → float.

    >>> value_type(float | None), value_type(tuple[float, float] | None), value_type(int)
    (<class 'float'>, tuple[float, float], <class 'int'>)
    """
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, getattr(types, "UnionType", typing.Union)) and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return inner[0] if len(inner) == 1 else hint
    return hint


def _plain(value):
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _split_items(value: str) -> list[Any]:
    """`"0.2,1.0"` → ["0.2", "1.0"]; `"[0.2, 1.0]"` (YAML flow syntax) → [0.2, 1.0]."""
    text = value.strip()
    if text[:1] in "[(":
        parsed = parse_yaml("[" + text[1:-1] + "]") if text[-1:] in ")]" else None
        if not isinstance(parsed, list):
            raise ValueError
        return parsed
    return [v.strip() for v in text.split(",") if v.strip()]


def _split_mapping(value: str) -> dict[Any, Any]:
    """`"species=0.5,genus=0.6"` or `"{species: 0.5}"` → a dict."""
    text = value.strip()
    if text.startswith("{"):
        parsed = parse_yaml(text)
        if not isinstance(parsed, dict):
            raise ValueError
        return parsed
    pairs = [kv.split("=", 1) for kv in text.split(",") if kv.strip()]
    if any(len(kv) != 2 for kv in pairs):
        raise ValueError
    return {k.strip(): v.strip() for k, v in pairs}


def coerce_value(value: Any, hint: Any, key: str) -> Any:
    """Convert a YAML value or a raw `--set` string to the field's type, with an error naming the key.

    `--set` values arrive as the exact text the user typed, so a `str` field keeps "0.10" or "on"
    verbatim instead of YAML's 0.1 and True.
    """
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    try:
        if origin in (typing.Union, getattr(types, "UnionType", typing.Union)):
            # unset: YAML null, or the text null/none/~/empty; an optional *string* keeps "" and "none"
            # (`--set augment.randaugment=` turns RandAugment off, `=null` leaves it to the preset)
            unset = ("null", "~") if str in args else ("", "null", "none", "~")
            if type(None) in args and (value is None or (isinstance(value, str) and value.strip().lower() in unset)):
                return None
            for inner in (a for a in args if a is not type(None)):  # the first type that reads the value
                try:
                    return coerce_value(value, inner, key)
                except ConfigError:
                    continue
            raise ValueError
        if hint is bool:
            if isinstance(value, str):
                low = value.strip().lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            if isinstance(value, (bool, int)) and value in (0, 1):
                return bool(value)
            raise ValueError
        if hint is int:
            if isinstance(value, bool):  # True is an int in Python, never a count
                raise ValueError
            if isinstance(value, str):
                text = value.strip()
                try:
                    return int(text)
                except ValueError:
                    value = float(text)  # "1e3", "3.0"
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError
            number = float(value.strip() if isinstance(value, str) else value)
            if not math.isfinite(number):  # `.nan` or `inf` in a YAML file: no rate, weight or threshold is that
                raise ValueError
            return number
        if hint is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return "" if value is None else str(value)
        if origin is tuple:
            items = _split_items(value) if isinstance(value, str) else list(value)
            if len(items) != len(args):
                raise ValueError
            return tuple(coerce_value(v, a, key) for v, a in zip(items, args))
        if origin is list:
            (arg,) = args
            items = _split_items(value) if isinstance(value, str) else list(value or [])
            return [coerce_value(v, arg, key) for v in items]
        if origin is dict:
            mapping = _split_mapping(value) if isinstance(value, str) else dict(value or {})
            _, val_t = args
            return {str(k): coerce_value(v, val_t, key) for k, v in mapping.items()}
    except (ValueError, TypeError, yaml.YAMLError):
        raise ConfigError(f"config key {key}: cannot read {shorten(value)} as "
                          f"{getattr(hint, '__name__', None) or hint}") from None
    if isinstance(value, str):  # a field of another type (Any, Literal, …): read the text as YAML
        try:
            return parse_yaml(value)
        except yaml.YAMLError:
            return value
    return value


def apply_values(obj: Any, data: dict[str, Any], prefix: str = "") -> None:
    """Set the fields of dataclass `obj` (a `Config` or one of its sections) from a nested dict, each value converted
    to its field's type (`coerce_value`) and range-checked; a mapping updates a dict field key by key. An unknown
    key is a ConfigError that names it (with "did you mean")."""
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in data.items():
        dotted = prefix + str(key)
        if key not in names:
            raise ConfigError(f"unknown config key {shorten(dotted)}{suggest(dotted, [prefix + n for n in names])}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if value is None:  # `data:` with nothing below it in YAML
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"config key {dotted!r} is a section; give it keys, e.g. {dotted}.<key>=…")
            apply_values(current, value, dotted + ".")
            continue
        new = coerce_value(value, hints[key], dotted)
        check_range(dotted, new)
        if isinstance(current, dict) and isinstance(new, dict):
            # `--set decide.thresholds.species=0.5` changes one rank and keeps the others
            new = {**current, **new}
        setattr(obj, key, new)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`["train.lr=1e-3", "model.head=flat"]` → `{"train": {"lr": "1e-3"}, "model": {"head": "flat"}}`.

    Values stay the text given; `apply_values` converts each to its field's type (int, float, bool, tuple …).
    """
    nested: dict[str, Any] = {}
    for pair in pairs:
        if not isinstance(pair, str) or "=" not in pair:
            raise ConfigError(f"--set {pair!r}: expected key=value, e.g. --set train.epochs=3")
        key, raw = pair.split("=", 1)
        parts = [p.strip() for p in key.strip().split(".")]
        if not all(parts):
            raise ConfigError(f"--set {pair!r}: empty key; expected e.g. --set train.epochs=3")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {pair!r}: {part!r} is set twice")
        node[parts[-1]] = raw
    return nested


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> Config:
    """Defaults ← `base` ← YAML file ← `--set` overrides.

    >>> cfg = load_config(overrides=["train.epochs=3", "augment.scale=0.2,1.0", "decide.thresholds.species=0.5"])
    >>> cfg.train.epochs, cfg.augment.scale, cfg.decide.thresholds["species"], cfg.decide.thresholds["genus"]
    (3, (0.2, 1.0), 0.5, 0.6)
    """
    cfg = Config()
    if base:
        apply_values(cfg, base)
    if path:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"{path}: config file not found")
        if not path.is_file():
            raise ConfigError(f"{path}: is not a file, expected a YAML config")
        # aliases, nesting and size are limited before any value is built; a key given twice is an error
        data = read_yaml(path, ConfigError) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections (data:, model:, train:, …)")
        try:
            apply_values(cfg, data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    if overrides:
        apply_values(cfg, parse_overrides(overrides))
    return cfg
