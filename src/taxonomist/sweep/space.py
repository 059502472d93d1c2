"""The search space of a sweep: SPACE.yaml (config keys → distributions) read into Optuna distributions,
every key and range checked against the Config dataclasses before any trial runs.

    train.lr: {loguniform: [1e-5, 1e-2]}
    loss.distance_weight: {uniform: [0, 1]}          # or [0, 1, 0.25] for a step
    train.batch_size: {int: [16, 64, 16]}            # low, high, step (step optional)
    model.head: {choice: [flat, multirank]}
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from taxonomist.config import Config, check_range, coerce_value, value_type
from taxonomist.errors import ConfigError
from taxonomist.taxonomy.core import suggest
from taxonomist.utils.safe_parse import read_yaml

KINDS = ("loguniform", "uniform", "int", "choice")
#: keys the sweep sets itself
RESERVED = ("out",)


@dataclass(frozen=True)
class Parameter:
    key: str                # dotted config key, e.g. `train.lr`
    kind: str               # one of KINDS
    distribution: Any       # an optuna.distributions.BaseDistribution


def import_optuna():
    """The optuna module, or a ConfigError saying how to install it (an optional extra)."""
    try:
        import optuna
    except ImportError:
        raise ConfigError("taxonomist sweep needs Optuna: pip install 'taxonomist[sweep]'") from None
    return optuna


def _leaf_fields() -> dict[str, Any]:
    """Every settable config key → its type hint (sections flattened to dotted keys)."""
    out: dict[str, Any] = {}

    def walk(cls, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            if dataclasses.is_dataclass(hint):
                walk(hint, prefix + f.name + ".")
            else:
                out[prefix + f.name] = hint
    walk(Config, "")
    return out


def _flatten(data: dict, source: str, prefix: str = "") -> dict[str, Any]:
    """`{train: {lr: {loguniform: …}}}` and `{train.lr: {loguniform: …}}` both → `{"train.lr": {…}}`."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = prefix + str(key)
        if isinstance(value, dict) and value and not (set(value) & set(KINDS)) and \
                all(isinstance(v, dict) for v in value.values()):
            flat.update(_flatten(value, source, dotted + "."))
        else:
            if dotted in flat:
                raise ConfigError(f"{source}: {dotted} is given twice")
            flat[dotted] = value
    return flat


def _number(value: Any, key: str, source: str, integer: bool = False) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        if isinstance(value, str):  # YAML reads 1e-5 (no dot) as text
            try:
                return _number(float(value) if not integer else int(value), key, source, integer)
            except ValueError:
                pass
        raise ConfigError(f"{source}: {key}: {value!r} is not {'an integer' if integer else 'a number'}")
    if integer:
        if isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{source}: {key}: {value!r} is not an integer")
        return int(value)
    return float(value)


def _parameter(key: str, spec: Any, hint: Any, source: str) -> Parameter:
    dist = import_optuna().distributions
    example = f"e.g. {key}: {{choice: [a, b]}} or {{uniform: [0, 1]}}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{source}: {key}: expected one of {', '.join(KINDS)} with its range, {example}")
    kind, args = next(iter(spec.items()))
    if kind not in KINDS:
        raise ConfigError(f"{source}: {key}: unknown distribution {kind!r}{suggest(str(kind), KINDS)}; "
                          f"use {', '.join(KINDS)}")
    if not isinstance(args, list):
        raise ConfigError(f"{source}: {key}: {kind} takes a list, e.g. {kind}: "
                          + ("[a, b, c]" if kind == "choice" else "[low, high]"))
    if kind == "choice":
        if not args:
            raise ConfigError(f"{source}: {key}: choice needs at least one value")
        for v in args:
            if v is not None and not isinstance(v, (bool, int, float, str)):
                raise ConfigError(f"{source}: {key}: choice values must be numbers, text or booleans, not {v!r} "
                                  "(write a pair as text: \"0.2,1.0\")")
            try:
                check_range(key, coerce_value(v, hint, key))
            except ConfigError as e:
                raise ConfigError(f"{source}: {e}") from None
        if len(set(map(repr, args))) != len(args):
            raise ConfigError(f"{source}: {key}: choice lists a value twice")
        return Parameter(key, kind, dist.CategoricalDistribution(args))
    numeric = value_type(hint) in (int, float)  # `float | None`: an augment strength
    if not numeric:
        raise ConfigError(f"{source}: {key} is {getattr(hint, '__name__', hint)}, not a number: "
                          f"use {{choice: [...]}}")
    if len(args) not in (2, 3) or (kind == "loguniform" and len(args) != 2):
        form = "[low, high]" if kind == "loguniform" else "[low, high] or [low, high, step]"
        raise ConfigError(f"{source}: {key}: {kind} takes {form}, got {args!r}")
    integer = kind == "int"
    if hint is int and not integer:
        raise ConfigError(f"{source}: {key} is an integer: use {{int: [low, high]}} or {{choice: [...]}}")
    low, high = (_number(a, key, source, integer) for a in args[:2])
    if not low < high:
        raise ConfigError(f"{source}: {key}: {kind} needs low < high, got [{args[0]}, {args[1]}]")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{source}: {key}: loguniform needs low > 0, got {args[0]}")
    for bound in (low, high):  # a trial must not fail on a value the config refuses
        try:
            check_range(key, bound)
        except ConfigError as e:
            raise ConfigError(f"{source}: {kind} bound: {e}") from None
    if kind == "loguniform":
        return Parameter(key, kind, dist.FloatDistribution(low, high, log=True))
    step = _number(args[2], key, source, integer) if len(args) == 3 else None
    if step is not None and not step > 0:
        raise ConfigError(f"{source}: {key}: step must be > 0, got {args[2]}")
    if step is not None and step > high - low:
        raise ConfigError(f"{source}: {key}: step {args[2]} is larger than the range [{args[0]}, {args[1]}]")
    if integer:
        return Parameter(key, kind, dist.IntDistribution(low, high, step=step or 1))
    return Parameter(key, kind, dist.FloatDistribution(low, high, step=step))


def parse_space(spec: dict, source: str = "search space") -> list[Parameter]:
    """Check a search space (a mapping as SPACE.yaml holds) and return its parameters.

    >>> [p.key for p in parse_space({"train.lr": {"loguniform": [1e-5, 1e-2]}, "model.head": {"choice": ["flat"]}})]
    ['train.lr', 'model.head']
    """
    if not isinstance(spec, dict) or not spec:
        raise ConfigError(f"{source}: expected a mapping of config keys to distributions, "
                          "e.g. train.lr: {loguniform: [1e-5, 1e-2]}")
    fields = _leaf_fields()
    params = []
    for key, value in _flatten(spec, source).items():
        if key in RESERVED:
            raise ConfigError(f"{source}: {key} is set by the sweep (each trial trains in OUT/trials/NNNN)")
        if key not in fields:
            sections = {k.rsplit(".", 1)[0] for k in fields if "." in k}
            if key in sections:
                raise ConfigError(f"{source}: {key} is a section; name one of its keys, e.g. {key}.<key>")
            raise ConfigError(f"{source}: unknown config key {key!r}{suggest(key, list(fields))}")
        params.append(_parameter(key, value, fields[key], source))
    return params


def load_space(path: str | Path) -> list[Parameter]:
    """Read and check SPACE.yaml."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: search space file not found")
    return parse_space(read_yaml(path, ConfigError), str(path))


def suggest_values(trial, params: list[Parameter]) -> dict[str, Any]:
    """Ask the trial for one value of each parameter (Optuna's sampler chooses)."""
    values: dict[str, Any] = {}
    for p in params:
        d = p.distribution
        if p.kind == "choice":
            values[p.key] = trial.suggest_categorical(p.key, d.choices)
        elif p.kind == "int":
            values[p.key] = trial.suggest_int(p.key, d.low, d.high, step=d.step)
        else:
            values[p.key] = trial.suggest_float(p.key, d.low, d.high, step=d.step, log=d.log)
    return values


def grid(params: list[Parameter]) -> dict[str, list]:
    """Every value of each parameter, for Optuna's GridSampler; only choices and stepped ranges have a grid."""
    out = {}
    for p in params:
        d = p.distribution
        if p.kind == "choice":
            out[p.key] = list(d.choices)
        elif getattr(d, "step", None) is not None:
            n = round((d.high - d.low) / d.step)
            values = [d.low + i * d.step for i in range(n + 1)]
            out[p.key] = [int(v) for v in values] if p.kind == "int" else [round(v, 12) for v in values]
        else:
            raise ConfigError(f"--sampler grid: {p.key} is a continuous {p.kind} range; give it a step "
                              f"({p.kind}: [low, high, step]) or a choice list")
    return out


def overrides(values: dict[str, Any]) -> list[str]:
    """Trial values as `--set` pairs (`key=value`), read back by `load_config` with each field's type."""
    return [f"{k}={'' if v is None else v}" for k, v in values.items()]
