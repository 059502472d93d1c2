"""The one reader for YAML and JSON that users hand us (configs, search spaces, run folders, COCO files).

A small file must not become a huge value: YAML aliases ("billion laughs") are counted as the copies they
stand for and refused past a limit before any Python object is built, nesting is capped, and error
messages show a value only cut short (`shorten`).
"""
from __future__ import annotations

import json
import reprlib
import typing
from pathlib import Path
from typing import Any

import yaml

from taxonomist.errors import ConfigError, TaxonomistError

#: a YAML document may hold at most this many nodes, each alias counted as a full copy of what it names
#: (a config has about 150; "billion laughs" has 10^9)
MAX_YAML_NODES = 10_000
#: YAML nesting (mappings and lists inside each other); a config is 3 deep
MAX_YAML_DEPTH = 50
#: a YAML file larger than this is refused unread (a config is a few KB)
MAX_YAML_BYTES = 1 << 20

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxset = 3, 4, 6, 6, 6
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 60, 60, 40


def shorten(value: Any, limit: int = 100) -> str:
    """`repr(value)` cut to about `limit` characters, cheap on any value (a shared or recursive structure
    is never expanded): what an error message may show of a user's value.

    >>> shorten("x" * 1000)
    "'xxxxxxxxxxxxxxxxxxxxxxxxxxx...xxxxxxxxxxxxxxxxxxxxxxxxxxxx'"
    >>> shorten([[1, 2]] * 10**6)
    '[[1, 2], [1, 2], [1, 2], [1, 2], [1, 2], [1, 2], ...]'
    """
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[:limit - 1] + "…"


class YAMLLimitError(yaml.MarkedYAMLError):
    """A YAML document over one of the limits above; a `yaml.YAMLError`, so callers report it as bad YAML."""

    def __init__(self, problem: str, mark=None):
        super().__init__(problem=problem, problem_mark=mark)


class _SafeLoader(yaml.SafeLoader):
    """`yaml.safe_load` plus the limits, and a key given twice in one mapping is an error instead of the last one
    winning silently (two `train:` sections, say)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        # the composer recurses once per level: stop well before Python's recursion limit
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise YAMLLimitError(f"nested more than {MAX_YAML_DEPTH} levels deep", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_document(self, node):
        # composing keeps one node per anchor however often it is aliased; count the copies before building
        _check_expanded_size(node)
        return super().construct_document(node)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: merged keys may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, typing.Hashable):
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"key {shorten(key)} appears twice",
                                                            key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


def _children(node) -> list:
    if isinstance(node, yaml.SequenceNode):
        return node.value
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_expanded_size(root) -> None:
    """Refuse a node graph whose tree (every alias expanded) has more than MAX_YAML_NODES nodes, or a cycle.

    One pass over the distinct nodes, sizes memoised and capped, so it costs what the file costs."""
    cap = MAX_YAML_NODES + 1
    size: dict[int, int] = {}
    on_path: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            on_path.discard(key)
            size[key] = min(cap, 1 + sum(size[id(c)] for c in _children(node)))
            continue
        if key in size:
            continue
        on_path.add(key)
        stack.append((node, True))
        for child in _children(node):
            if id(child) in on_path:
                raise YAMLLimitError("an alias refers to a node that contains it (a recursive structure)",
                                     child.start_mark)
            if id(child) not in size:
                stack.append((child, False))
        if len(size) > cap:  # distinct nodes alone are over the limit
            break
    if size.get(id(root), cap) >= cap:
        raise YAMLLimitError(f"more than {MAX_YAML_NODES} values once its aliases (*name) are expanded "
                             "(counted, not expanded)", root.start_mark)


def parse_yaml(text: str) -> Any:
    """`yaml.safe_load(text)` with the limits; raises `yaml.YAMLError` (a `YAMLLimitError` over a limit).

    >>> parse_yaml("a: &x [1, 2]\\nb: *x")
    {'a': [1, 2], 'b': [1, 2]}
    """
    try:
        return yaml.load(text, Loader=_SafeLoader)
    except RecursionError:  # a construct that still recursed (merge keys …): same answer as the depth limit
        raise YAMLLimitError("nested too deeply") from None


def yaml_problem(e: yaml.YAMLError) -> str:
    """`line N: problem` of a YAML error, on one line."""
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}: " if mark is not None else ""
    problem = getattr(e, "problem", None) or (str(e).splitlines() or [type(e).__name__])[0]
    return where + problem


def read_yaml(path: str | Path, error: type[TaxonomistError] = ConfigError) -> Any:
    """The YAML value of a user's file, or `error("PATH: …")` on one line (too big, not UTF-8, bad YAML, a limit).

    The caller checks that the file exists and what the value must look like.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_YAML_BYTES:
            raise error(f"{path}: {size} bytes is over the {MAX_YAML_BYTES}-byte limit for a YAML file")
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise error(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        return parse_yaml(text)
    except YAMLLimitError as e:
        raise error(f"{path}: refused, {yaml_problem(e)}") from None
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML ({yaml_problem(e)})") from None


def parse_json(raw: bytes | str, where: str, error: type[TaxonomistError]) -> Any:
    """`json.loads(raw)`, or `error("WHERE: …")` on one line: invalid JSON, not UTF-8, or nested deeper than
    Python's recursion limit (about 1,000 levels; a COCO file is 4 deep).

    >>> parse_json(b'{"images": []}', "c.json", ConfigError)
    {'images': []}
    """
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise error(f"{where}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except UnicodeDecodeError:
        raise error(f"{where}: not UTF-8 text") from None
    except RecursionError:
        raise error(f"{where}: JSON nested too deeply (lists or objects more than about 1,000 levels inside "
                    "each other)") from None
