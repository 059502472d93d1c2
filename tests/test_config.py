"""The typed config: YAML sections, `--set` overrides with type coercion, unknown keys, YAML round trip."""
from __future__ import annotations

import pytest

from taxonomist.config import Config, load_config, parse_overrides, value_type
from taxonomist.errors import ConfigError


def test_defaults_hold_the_contract_keys():
    cfg = Config()
    assert (cfg.data.image_size, cfg.model.backbone, cfg.model.pretrained, cfg.model.head) == \
        (224, "tf_efficientnet_lite0", "auto", "flat")
    assert (cfg.loss.name, cfg.loss.label_smoothing, cfg.loss.focal_gamma, cfg.loss.focal_alpha) == ("ce", 0.1, 2.0, 0.5)
    assert (cfg.train.monitor, cfg.train.save_every, cfg.train.device) == ("val_mhd", 0, "auto")
    # augmentation strength comes from augment.preset (auto); outside a training run that is today's default
    from taxonomist.data.augment_presets import resolve_augment
    aug = resolve_augment(cfg.augment)
    assert cfg.augment.preset == "auto" and cfg.augment.color_jitter is None
    assert aug.color_jitter == 0.2 and aug.mixup == 0.0 and aug.cutmix == 0.0
    assert cfg.decide.thresholds["species"] == 0.55


def test_yaml_sections(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("data:\n  root: data/synth\n  image_size: 96\nmodel:\n  head: multirank\n  lora:\n    r: 8\n"
                    "train:\n  epochs: 3\n  lr: 3.0e-4\n  amp: false\naugment:\n  scale: [0.2, 1.0]\n"
                    "loss:\n  rank_weights: {species: 2, genus: 1.5}\nout: runs/x\ndecide:\n", encoding="utf-8")
    cfg = load_config(path)
    assert cfg.data.root == "data/synth" and cfg.data.image_size == 96
    assert cfg.model.head == "multirank" and cfg.model.lora.r == 8
    assert cfg.train.epochs == 3 and cfg.train.lr == 3e-4 and cfg.train.amp is False
    assert cfg.augment.scale == (0.2, 1.0)
    assert cfg.loss.rank_weights == {"species": 2.0, "genus": 1.5}
    assert cfg.out == "runs/x"
    assert cfg.data.val_fraction == 0.15  # untouched keys keep their defaults
    assert cfg.decide == Config().decide  # an empty section changes nothing


def test_set_overrides_coerce_types(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("train:\n  epochs: 3\n", encoding="utf-8")
    cfg = load_config(path, overrides=[
        "train.epochs=5", "train.lr=1e-3", "train.amp=no", "data.strict=true", "augment.scale=0.1,0.9",
        "augment.ratio=[0.5, 2]", "model.lora.target_modules=qkv,proj", "loss.rank_weights=species=0.5,genus=2",
        "decide.thresholds.species=0.4", "data.root=0.10", "out=on", "train.batch_size=1e2", "train.wandb=",
    ])
    assert cfg.train.epochs == 5 and isinstance(cfg.train.epochs, int)
    assert cfg.train.lr == 0.001 and cfg.train.amp is False and cfg.data.strict is True
    assert cfg.augment.scale == (0.1, 0.9) and cfg.augment.ratio == (0.5, 2.0)
    assert cfg.model.lora.target_modules == ["qkv", "proj"]
    assert cfg.loss.rank_weights == {"species": 0.5, "genus": 2.0}
    # one threshold changes, the other ranks keep their defaults
    assert cfg.decide.thresholds == {**Config().decide.thresholds, "species": 0.4}
    # a text field keeps exactly what was typed (YAML would read 0.1 and True)
    assert cfg.data.root == "0.10" and cfg.out == "on"
    assert cfg.train.batch_size == 100 and cfg.train.wandb == ""


def test_later_sources_win():
    cfg = load_config(base={"train": {"epochs": 7, "seed": 3}}, overrides=["train.epochs=2"])
    assert (cfg.train.epochs, cfg.train.seed) == (2, 3)


def test_parse_overrides_nests_dotted_keys():
    assert parse_overrides(["train.lr=1e-3", "model.lora.r=4", "out=runs/a=b"]) == \
        {"train": {"lr": "1e-3"}, "model": {"lora": {"r": "4"}}, "out": "runs/a=b"}


@pytest.mark.parametrize("override, message", [
    ("trian.epochs=3", "unknown config key 'trian' (did you mean 'train'?)"),
    ("train.epoch=3", "unknown config key 'train.epoch' (did you mean 'train.epochs'"),
    ("model.lora.rank=4", "unknown config key 'model.lora.rank'"),
    ("train.epochs=three", "config key train.epochs: cannot read 'three' as int"),
    ("train.epochs=2.5", "config key train.epochs: cannot read 2.5 as int"),
    ("train.epochs=yes", "config key train.epochs: cannot read 'yes' as int"),
    ("train.lr=fast", "config key train.lr: cannot read 'fast' as float"),
    ("train.amp=maybe", "config key train.amp: cannot read 'maybe' as bool"),
    ("augment.scale=0.1,0.5,0.9", "config key augment.scale: cannot read '0.1,0.5,0.9' as tuple"),
    ("loss.rank_weights=species", "config key loss.rank_weights: cannot read 'species' as dict"),
    ("train=3", "config key 'train' is a section; give it keys, e.g. train.<key>=…"),
    ("epochs", "--set 'epochs': expected key=value, e.g. --set train.epochs=3"),
    ("train..lr=1", "--set 'train..lr=1': empty key"),
])
def test_bad_overrides_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [epochs\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config(bad)
    bad.write_bytes("data:\n  root: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="bad.yaml: not UTF-8 text"):
        load_config(bad)
    bad.write_text("train:\n  epochz: 3\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="unknown config key 'train.epochz' \\(did you mean 'train.epochs'"):
        load_config(bad)
    with pytest.raises(ConfigError, match="is not a file"):
        load_config(tmp_path)


def test_yaml_round_trip(tmp_path):
    cfg = load_config(overrides=["train.epochs=4", "augment.scale=0.3,0.9", "loss.rank_weights=species=0.5",
                                 "model.lora.target_modules=qkv", "data.root=0.10", "decide.thresholds.genus=0.5"])
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml(), encoding="utf-8")
    again = load_config(path)
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()
    assert load_config(path).to_yaml() == cfg.to_yaml()
    assert "  scale:\n  - 0.3\n  - 0.9\n" in cfg.to_yaml()  # tuples are written as plain YAML lists
    assert "  root: '0.10'\n" in cfg.to_yaml()               # quoted, so it reads back as text


def test_optional_fields_of_other_sections():
    """Sections added later may hold `X | None` fields; `--set` text reads as None or as X."""
    from dataclasses import dataclass

    from taxonomist.config import apply_values

    @dataclass
    class Section:
        limit: int | None = None
        name: str = "x"

    section = Section()
    apply_values(section, {"limit": "12"})
    assert section.limit == 12
    apply_values(section, {"limit": "null"})
    assert section.limit is None
    with pytest.raises(ConfigError, match="config key limit: cannot read 'many'"):
        apply_values(section, {"limit": "many"})


# ---------------------------------------------------------------------------------------------- value ranges
def _numeric_keys() -> dict[str, object]:
    """Every config key holding numbers (ints, floats, pairs or mappings of them) → its type hint."""
    import dataclasses
    import typing

    out = {}

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = value_type(hints[f.name])  # `float | None`: an augment strength left to the preset
            if dataclasses.is_dataclass(hint):
                walk(hint, prefix + f.name + ".")
                continue
            inner = typing.get_args(hint) or (hint,)
            if hint in (int, float) or (typing.get_origin(hint) in (tuple, dict) and inner[-1] in (int, float)):
                out[prefix + f.name] = hint
    walk(Config, "")
    return out


def test_every_numeric_key_has_a_range_and_its_default_lies_in_it():
    from taxonomist.config import RANGES, check_range

    numeric = _numeric_keys()
    assert set(numeric) == set(RANGES), set(numeric) ^ set(RANGES)
    defaults = Config().to_dict()
    for key in numeric:
        value = defaults
        for part in key.split("."):
            value = value[part]
        check_range(key, tuple(value) if isinstance(value, list) else value)


def _outside(valid) -> list[float]:
    """Values just outside each end of a Range."""
    out = []
    if valid.low is not None:
        out.append(valid.low if valid.low_open else valid.low - (1 if valid.low == int(valid.low) else 0.01))
    if valid.high is not None:
        out.append(valid.high if valid.high_open else valid.high + 1)
    return out


@pytest.mark.parametrize("key", sorted(_numeric_keys()))
def test_out_of_range_values_are_one_line_errors_naming_key_value_and_range(key, tmp_path):
    from taxonomist.config import RANGES

    valid, hint = RANGES[key], _numeric_keys()[key]
    integer = hint is int or getattr(hint, "__args__", (None,))[-1] is int
    bad_values = [v for v in _outside(valid) if not integer or float(v).is_integer()]
    assert bad_values, key
    for bad in bad_values:
        text = str(int(bad)) if integer else repr(float(bad))
        if typing_origin(hint) is tuple:
            setting, shown, where = f"{key}={text},{text}", text, key
        elif typing_origin(hint) is dict:
            setting, shown, where = f"{key}.species={text}", text, f"{key}.species"
        else:
            setting, shown, where = f"{key}={text}", text, key
        with pytest.raises(ConfigError) as e:
            load_config(None, [setting])
        message = str(e.value)
        assert message.startswith(f"config key {where}: {shown}") and f"valid: {valid}" in message, message
        assert "\n" not in message
        # the same value from a YAML file: the file is named too
        section, name = setting.split("=")[0].split(".", 1)
        config = tmp_path / "c.yaml"
        nested = name.split(".")
        body = "".join("  " * (i + 1) + f"{part}:\n" for i, part in enumerate(nested[:-1]))
        value = f"[{text}, {text}]" if typing_origin(hint) is tuple else text
        config.write_text(f"{section}:\n{body}{'  ' * len(nested)}{nested[-1]}: {value}\n")
        with pytest.raises(ConfigError, match=f"^{config}: config key {where}: "):
            load_config(config)


def typing_origin(hint):
    import typing
    return typing.get_origin(hint)


@pytest.mark.parametrize("setting, message", [
    ("data.val_fraction=1.5", "config key data.val_fraction: 1.5 is out of range; valid: [0, 1)"),
    ("train.grad_clip=-1", "config key train.grad_clip: -1.0 is out of range; valid: >= 0 (0 = off)"),
    ("decide.thresholds.genus=1.2", "config key decide.thresholds.genus: 1.2 is out of range; valid: [0, 1]"),
    ("decide.thresholds={species: 0.5, family: -0.1}", "config key decide.thresholds.family: -0.1"),
    ("augment.scale=0.9,0.2", "config key augment.scale: (0.9, 0.2) is out of order"),
    ("train.seed=-3", "config key train.seed: -3 is out of range; valid: [0, 4.29497e+09]"),
    ("data.image_size=100000", "config key data.image_size: 100000 is out of range; valid: [8, 4096]"),
])
def test_the_issue_examples(setting, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [setting])
    assert str(e.value).startswith(message), str(e.value)


def test_values_on_the_edges_of_their_ranges_are_accepted():
    cfg = load_config(None, ["data.val_fraction=0", "train.grad_clip=0", "decide.thresholds.species=1",
                             "augment.scale=1,1", "train.epochs=0", "data.fold=-1", "loss.focal_alpha=1"])
    assert cfg.data.val_fraction == 0 and cfg.decide.thresholds["species"] == 1 and cfg.augment.scale == (1, 1)


def test_shipped_configs_are_in_range():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = sorted((root / "configs").glob("*.yaml")) + sorted((root / "docs").rglob("*.yaml"))
    assert files
    for path in files:
        load_config(path)


def test_sweep_ranges_are_checked_against_the_config_ranges(tmp_path):
    pytest.importorskip("optuna")
    from taxonomist.sweep.space import parse_space

    with pytest.raises(ConfigError, match=r"uniform bound: config key data.val_fraction: 1.5 is out of range"):
        parse_space({"data.val_fraction": {"uniform": [0.1, 1.5]}})
    with pytest.raises(ConfigError, match=r"config key train.grad_clip: -1.0 is out of range"):
        parse_space({"train.grad_clip": {"choice": [1.0, -1.0]}})
    assert [p.key for p in parse_space({"data.val_fraction": {"uniform": [0.0, 0.5]}})] == ["data.val_fraction"]
