"""SPACE.yaml → Optuna distributions: every kind read right, every mistake one error naming the key."""
from __future__ import annotations

import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from taxonomist.cli.main import main
from taxonomist.errors import ConfigError
from taxonomist.sweep.space import grid, load_space, parse_space

ISSUE_EXAMPLE = {
    "train.lr": {"loguniform": [1e-5, 1e-2]},
    "loss.distance_weight": {"uniform": [0, 1]},
    "model.head": {"choice": ["flat", "multirank"]},
    "data.image_size": {"choice": [96, 128, 160]},
    "train.batch_size": {"int": [16, 64, 16]},
}


def test_the_issue_example_reads_into_optuna_distributions():
    params = {p.key: p for p in parse_space(ISSUE_EXAMPLE)}
    assert list(params) == list(ISSUE_EXAMPLE)
    assert params["train.lr"].distribution == FloatDistribution(1e-5, 1e-2, log=True)
    assert params["loss.distance_weight"].distribution == FloatDistribution(0.0, 1.0)
    assert params["model.head"].distribution == CategoricalDistribution(["flat", "multirank"])
    assert params["data.image_size"].distribution == CategoricalDistribution([96, 128, 160])
    assert params["train.batch_size"].distribution == IntDistribution(16, 64, step=16)


def test_nested_sections_yaml_text_numbers_and_steps(tmp_path):
    space = tmp_path / "space.yaml"
    # PyYAML reads 1e-5 (no dot) as text; nested sections mean the same as dotted keys
    space.write_text("train:\n  lr: {loguniform: [1e-5, 1e-2]}\n  epochs: {int: [1, 3]}\n"
                     "loss.distance_weight: {uniform: [0, 1, 0.25]}\naugment.scale: {choice: ['0.2,1.0', '0.5,1.0']}\n")
    params = {p.key: p.distribution for p in load_space(space)}
    assert params["train.lr"] == FloatDistribution(1e-5, 1e-2, log=True)
    assert params["train.epochs"] == IntDistribution(1, 3)
    assert grid(load_space(space)[1:]) == {"train.epochs": [1, 2, 3],
                                           "loss.distance_weight": [0.0, 0.25, 0.5, 0.75, 1.0],
                                           "augment.scale": ["0.2,1.0", "0.5,1.0"]}


@pytest.mark.parametrize("spec,message", [
    ({"train.lrr": {"uniform": [0, 1]}}, r"unknown config key 'train.lrr'.*train\.lr"),
    ({"train": {"uniform": [0, 1]}}, r"train is a section"),
    ({"out": {"choice": ["a", "b"]}}, r"out is set by the sweep"),
    ({"train.lr": {"loguniform": [1e-2, 1e-5]}}, r"train.lr: loguniform needs low < high"),
    ({"train.lr": {"loguniform": [0, 1e-2]}}, r"train.lr: loguniform needs low > 0"),
    ({"train.lr": {"loguniform": [1e-5, 1e-2, 1e-3]}}, r"train.lr: loguniform takes \[low, high\]"),
    ({"train.lr": {"logunifrom": [1e-5, 1e-2]}}, r"train.lr: unknown distribution 'logunifrom'.*loguniform"),
    ({"train.lr": [1e-5, 1e-2]}, r"train.lr: expected one of loguniform"),
    ({"train.lr": {"uniform": "0,1"}}, r"train.lr: uniform takes a list"),
    ({"train.lr": {"uniform": [0, "a lot"]}}, r"train.lr: 'a lot' is not a number"),
    ({"train.batch_size": {"uniform": [8, 64]}}, r"train.batch_size is an integer: use \{int"),
    ({"train.batch_size": {"int": [8, 64.5]}}, r"train.batch_size: 64.5 is not an integer"),
    ({"train.batch_size": {"int": [8, 64, 0]}}, r"train.batch_size: step must be > 0"),
    ({"train.batch_size": {"int": [8, 16, 32]}}, r"train.batch_size: step 32 is larger than the range"),
    ({"model.head": {"uniform": [0, 1]}}, r"model.head is str, not a number"),
    ({"train.epochs": {"choice": [2, "many"]}}, r"space.yaml: config key train.epochs: cannot read 'many' as int"),
    ({"train.epochs": {"choice": []}}, r"train.epochs: choice needs at least one value"),
    ({"train.epochs": {"choice": [2, 2]}}, r"train.epochs: choice lists a value twice"),
    ({"augment.scale": {"choice": [[0.2, 1.0]]}}, r"augment.scale: choice values must be numbers"),
    ({}, r"expected a mapping of config keys"),
])
def test_bad_specs_are_one_line_errors_naming_the_key(spec, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_space(spec, "space.yaml")
    assert "\n" not in str(info.value) and str(info.value).startswith("space.yaml")


def test_grid_needs_steps_or_choices():
    with pytest.raises(ConfigError, match="--sampler grid: train.lr is a continuous loguniform range"):
        grid(parse_space({"train.lr": {"loguniform": [1e-5, 1e-2]}}))


def test_cli_reports_a_bad_space_in_one_line_before_any_trial(tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text("train.lr: {loguniform: [1e-2, 1e-5]}\n")
    out = tmp_path / "sweep"
    code = main(["sweep", "--space", str(space), "--trials", "2", "--out", str(out), "--set", f"data.root={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err == f"error: {space}: train.lr: loguniform needs low < high, got [1e-2, 1e-5]\n"
    assert not out.exists()
    space.write_text(": not yaml [\n")
    assert main(["sweep", "--space", str(space), "--trials", "2", "--out", str(out)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert main(["sweep", "--space", str(tmp_path / "nope.yaml"), "--trials", "2", "--out", str(out)]) == 2
    assert "search space file not found" in capsys.readouterr().err
