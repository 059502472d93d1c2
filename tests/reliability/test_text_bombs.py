"""Small text inputs that expand into huge work: YAML alias graphs ("billion laughs"), deep YAML and JSON nesting.
Each is refused in bounded time with one `error:` line that never prints the expanded value."""
from __future__ import annotations

import json
import time

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taxonomist.config import load_config
from taxonomist.data.coco import read_coco
from taxonomist.errors import ConfigError, DataError
from taxonomist.sweep.space import load_space
from taxonomist.utils.safe_parse import MAX_YAML_DEPTH, MAX_YAML_NODES, YAMLLimitError, parse_yaml, shorten

from .conftest import assert_refused, run_cli

FUZZ = settings(deadline=None, derandomize=True, database=None, max_examples=40,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

#: "billion laughs": 9 levels of 9 aliases, 10^9 strings once expanded, 350 bytes on disk
LAUGHS = ("lol0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
          + "".join(f"lol{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]\n" for i in range(1, 9)))


# ---------------------------------------------------------------------------------------- YAML alias graphs
@st.composite
def alias_graph(draw) -> list[list[int | None]]:
    """Anchors 0…n-1; anchor i is a list whose items are scalars (None) or aliases of earlier anchors."""
    n = draw(st.integers(1, 12))
    graph = []
    for i in range(n):
        item = st.none() if i == 0 else st.one_of(st.none(), st.integers(0, i - 1))
        graph.append(draw(st.lists(item, min_size=1, max_size=7)))
    return graph


def _yaml_of(graph) -> str:
    """A flow-style top-level list holding every anchor once: `[&a0 [x, x], &a1 [*a0, x], …]`."""
    items = [f"&a{i} [" + ", ".join("x" if c is None else f"*a{c}" for c in children) + "]"
             for i, children in enumerate(graph)]
    return "[" + ", ".join(items) + "]"


def _expanded(graph) -> tuple[int, list]:
    """The node count with every alias expanded (the top list, each anchor, each item), and the value."""
    sizes, values = [], []
    for children in graph:
        sizes.append(1 + sum(1 if c is None else sizes[c] for c in children))
        values.append(["x" if c is None else values[c] for c in children])
    return 1 + sum(sizes), values


@settings(FUZZ)
@given(graph=alias_graph())
def test_alias_graphs_are_refused_past_the_limit_before_expansion(graph):
    size, value = _expanded(graph)
    start = time.perf_counter()
    if size > MAX_YAML_NODES:
        with pytest.raises(YAMLLimitError, match="aliases"):
            parse_yaml(_yaml_of(graph))
    else:
        assert parse_yaml(_yaml_of(graph)) == value
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize("text", ["&a [*a]", "&a {k: [1, *a]}", "a: &x {b: &y [*x]}", "&a [&b [*a]]"])
def test_recursive_aliases_are_refused(text):
    with pytest.raises(YAMLLimitError, match="recursive"):
        parse_yaml(text)


def test_merge_keys_and_plain_aliases_still_work():
    assert parse_yaml("base: &b {lr: 1, wd: 2}\nrun: {<<: *b, lr: 3}\ncopy: *b") == {
        "base": {"lr": 1, "wd": 2}, "run": {"lr": 3, "wd": 2}, "copy": {"lr": 1, "wd": 2}}
    with pytest.raises(yaml.YAMLError, match="appears twice"):
        parse_yaml("a: 1\na: 2")


def test_billion_laughs_config_is_one_quick_error_line(tmp_path, capsys):
    """The issue's case: a 1 KB config took 35 s and 5.5 GB, and its error printed the expanded value."""
    for key in ("train:\n  epochs: *l8\n", "model:\n  lora:\n    target_modules: *l8\n", "laughs: *l8\n"):
        config = tmp_path / "lol.yaml"
        config.write_text(LAUGHS + key)
        start = time.perf_counter()
        code, out, err = run_cli(["train", "--config", config, "--set", f"out={tmp_path / 'run'}"], capsys)
        assert time.perf_counter() - start < 5.0
        assert_refused(code, err, config, "aliases")
        assert len(err) < 400 and "lol, lol" not in err, err[:500]
        assert not (tmp_path / "run").exists()


def test_laughs_below_the_limit_give_a_short_value_error(tmp_path):
    """Aliases under the limit build the value; a type error about it still prints only its first items."""
    config = tmp_path / "c.yaml"
    words = "&w [" + ", ".join(["word"] * 50) + "]"
    config.write_text("train:\n  epochs: [" + ", ".join([words] + ["*w"] * 49) + "]\n")   # 2,551 values
    with pytest.raises(ConfigError) as e:
        load_config(config)
    message = str(e.value)
    assert "train.epochs" in message and len(message) < 300 and message.count("word") < 20


def test_search_space_and_set_values_get_the_same_limits(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(LAUGHS + "train.lr: {choice: *l8}\n")
    with pytest.raises(ConfigError, match="aliases") as e:
        load_space(space)
    assert str(space) in str(e.value) and len(str(e.value)) < 300
    flow = "[&a [x, x, x, x, x, x, x, x], " + ", ".join(f"&a{i} [" + ", ".join(["*a" if i == 0 else f"*a{i - 1}"] * 8)
                                                       + "]" for i in range(8)) + "]"
    with pytest.raises(ConfigError, match="model.lora.target_modules") as e:
        load_config(None, [f"model.lora.target_modules={flow}"])
    assert len(str(e.value)) < 300


def test_a_huge_yaml_file_is_refused_unread(tmp_path):
    config = tmp_path / "big.yaml"
    config.write_text("train:\n  epochs: 3\n" + "# padding\n" * 200_000)
    with pytest.raises(ConfigError, match="over the .*-byte limit"):
        load_config(config)


# ---------------------------------------------------------------------------------------------- nesting depth
@settings(FUZZ)
@given(depth=st.integers(1, 3 * MAX_YAML_DEPTH), style=st.sampled_from(["flow-list", "flow-map", "block"]))
def test_yaml_nesting_is_capped(depth, style):
    if style == "flow-list":
        text = "[" * depth + "1" + "]" * depth
    elif style == "flow-map":
        text = "{a: " * depth + "1" + "}" * depth
    else:
        text = "".join("  " * i + "a:\n" for i in range(depth - 1)) + "  " * (depth - 1) + "a: 1\n"
    if depth <= MAX_YAML_DEPTH:
        value = parse_yaml(text)
        for _ in range(depth):
            value = value[0] if style == "flow-list" else value["a"]
        assert value == 1
    else:
        with pytest.raises(YAMLLimitError, match="nested more than"):
            parse_yaml(text)


def test_deep_yaml_config_is_one_error_line(tmp_path, capsys):
    config = tmp_path / "deep.yaml"
    config.write_text("train: " + "[" * 100_000 + "]" * 100_000 + "\n")
    code, _, err = run_cli(["train", "--config", config], capsys)
    assert_refused(code, err, config, "nested more than")


@settings(FUZZ, max_examples=25)
@given(depth=st.one_of(st.integers(1, 3000), st.sampled_from([10_000, 100_000, 1_000_000])),
       opener=st.sampled_from(["[", '{"a": ']))
def test_deeply_nested_coco_json_is_one_error_line(tmp_path_factory, depth, opener):
    closer = "]" if opener == "[" else "}"
    path = tmp_path_factory.mktemp("coco") / "deep.json"
    path.write_text('{"images": ' + opener * depth + "1" + closer * depth + "}")
    with pytest.raises(DataError) as e:
        read_coco(path)
    message = str(e.value)
    assert str(path) in message and "\n" not in message and len(message) < 300
    if depth >= 10_000:   # past Python's recursion limit: json itself gives up, and says so on one line
        assert "nested too deeply" in message


def test_deep_coco_json_at_the_cli(tmp_path, capsys):
    coco = tmp_path / "deep.json"
    coco.write_text("[" * 200_000 + "]" * 200_000)
    code, _, err = run_cli(["data", "prepare", coco, tmp_path, tmp_path / "out"], capsys)
    assert_refused(code, err, coco, "nested too deeply")
    code, _, err = run_cli(["data", "download", coco, tmp_path / "out"], capsys)
    assert_refused(code, err, coco, "nested too deeply")


def test_deep_metrics_json_in_a_run_folder_is_one_error_line(tmp_path):
    from taxonomist.report.runs import load_run
    (tmp_path / "metrics.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match="nested too deeply"):
        load_run(tmp_path)


# ------------------------------------------------------------------------------------------- error messages
@pytest.mark.parametrize("value", ["x" * 1_000_000, [[1, 2]] * 10**6, {"k" * 500: list(range(10**5))}])
def test_shorten_is_cheap_and_short(value):
    start = time.perf_counter()
    assert len(shorten(value)) <= 100
    assert time.perf_counter() - start < 0.5


def test_a_huge_value_in_a_config_error_is_cut(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"train": {"epochs": "9" * 100_000 + "x"}, "data": {}}))
    with pytest.raises(ConfigError) as e:
        load_config(config)
    assert "train.epochs" in str(e.value) and len(str(e.value)) < 400
    with pytest.raises(ConfigError) as e:
        load_config(None, ["k" * 100_000 + "=1"])
    assert len(str(e.value)) < 400


def test_deeply_nested_checkpoint_metadata_is_one_error_line(tmp_path, capsys):
    """A model file's JSON metadata nested 100,000 deep: refused as corrupt, not a RecursionError traceback."""
    from taxonomist.cli.main import main
    from taxonomist.errors import ModelError
    from taxonomist.train.checkpoint import read_metadata

    ckpt = tmp_path / "best.safetensors"
    ckpt.write_bytes(b"\0" * 16)
    (tmp_path / "best.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ModelError, match="corrupt checkpoint metadata"):
        read_metadata(ckpt)
    assert main(["predict", str(ckpt), "--images", str(tmp_path), "--out", str(tmp_path / "p.csv")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "corrupt checkpoint metadata" in err
