"""The model card: everything a model file carries besides its weights — labels and taxonomy, preprocessing, the
temperature, the distance metric, the head, the data settings (input column, context scale), the calibration, the
OOD statistics and the format version — as one typed object, with the default of every key an older file lacks
defined here and nowhere else.

A checkpoint stores the card as JSON beside its weights (`models.checkpoint`), an exported ONNX file in its
`metadata_props` (`inference.onnx_model`); both go through `ModelCard.from_dict` and `to_dict`, and every
consumer reads a model through `inference.model_file.load_model` / `read_card`. The card is a top-level module,
like `config`: the training loop writes it and inference, evaluation and deployment read it, so it cannot live in
any one of those stages, and it needs neither torch nor numpy.

>>> card = ModelCard.from_dict({"labels": ["Cod", "Hake"], "image_size": 32, "model_config": {"backbone": "b"},
...                             "taxonomy": {"columns": ["concept_name", "parent"], "labels": ["Cod", "Hake"],
...                                          "rows": [{"concept_name": "Fish", "parent": ""},
...                                                   {"concept_name": "Cod", "parent": "Fish"},
...                                                   {"concept_name": "Hake", "parent": "Fish"}]}})
>>> card.temperature, card.metric, card.distance_metric, card.head, card.data.input, card["labels"]
(1.0, 'auto', 'lca', 'flat', 'path', ['Cod', 'Hake'])
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Iterator

from taxonomist.errors import ModelError, TaxonomistError
from taxonomist.taxonomy import Taxonomy, default_metric
from taxonomist.taxonomy.io import parse_taxonomy

#: The layout written here; a reader refuses a newer one. Version 1 is the only layout so far; files written
#: before some of its keys existed are read with the defaults below (`_upgrade` lists them).
FORMAT_VERSION = 1
#: Keys a model file must have: without them no reader can build or run the model.
REQUIRED = ("labels", "taxonomy", "model_config", "image_size")

# The defaults of keys an older (or hand-written) file may lack — the only place they are stated.
DEFAULT_TEMPERATURE = 1.0          # no calibration: softmax(logits) as the model gives them
DEFAULT_METRIC = "auto"            # the taxonomy's default distance: fathomnet2025 for ranked trees, else lca
DEFAULT_HEAD = "flat"
DEFAULT_INTERPOLATION = "bicubic"  # what every backbone recorded before the key existed
DEFAULT_RESIZE = "stretch"         # config.DataConfig.resize
DEFAULT_CROP_PCT = 0.875           # config.AugmentConfig.crop_pct
DEFAULT_INPUT = "path"             # the ROI column; `context_path` for models trained on the context crops
DEFAULT_TEMPERATURE_OBJECTIVE = "nll"  # what the temperature was fitted for before `decide.temperature` existed


def taxonomy_to_json(taxonomy: Taxonomy) -> dict[str, Any]:
    """A taxonomy as the card stores it: its table's columns and rows, its labels (the logits' order) and hash."""
    rows = taxonomy.to_rows()
    return {"format": taxonomy.source_format, "columns": list(rows[0].keys()), "rows": rows,
            "labels": list(taxonomy.labels), "hash": taxonomy.hash}


def taxonomy_from_json(data: Mapping[str, Any]) -> Taxonomy:
    """The taxonomy `taxonomy_to_json` stored (raises the taxonomy's own errors for an invalid tree)."""
    tax = parse_taxonomy(data["columns"], data["rows"], "<checkpoint taxonomy>")
    return tax.with_labels(data["labels"])


# ---------------------------------------------------------------------------------------------- parts
@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's input: normalisation, resize interpolation, input side."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = DEFAULT_INTERPOLATION
    input_size: int | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocessing:
        size = data.get("input_size")
        return cls(tuple(float(v) for v in data["mean"]), tuple(float(v) for v in data["std"]),
                   str(data.get("interpolation", DEFAULT_INTERPOLATION)), None if size is None else int(size))

    def to_dict(self) -> dict[str, Any]:
        out = {"mean": list(self.mean), "std": list(self.std), "interpolation": self.interpolation}
        return out if self.input_size is None else {**out, "input_size": self.input_size}


@dataclass(frozen=True)
class DataSettings:
    """How the training images were read: resize mode, greyscale, eval crop, the input column and, for models
    that see context crops, the context scale `data prepare` cut them at (None: not recorded)."""

    resize: str = DEFAULT_RESIZE
    grayscale: bool = False
    crop_pct: float = DEFAULT_CROP_PCT
    input: str = DEFAULT_INPUT
    context: str | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> DataSettings:
        data = data or {}
        return cls(str(data.get("resize", DEFAULT_RESIZE)), bool(data.get("grayscale", False)),
                   float(data.get("crop_pct", DEFAULT_CROP_PCT)), str(data.get("input", DEFAULT_INPUT)),
                   data.get("context"))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class CalibrationInfo:
    """What calibration measured on the validation rows (before and after the temperature)."""

    ece_before: float | None = None
    ece_after: float | None = None
    nll_before: float | None = None
    nll_after: float | None = None
    objective: str = DEFAULT_TEMPERATURE_OBJECTIVE
    n_val: int | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CalibrationInfo:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True)
class OODInfo:
    """The OOD statistics beside the model file: which methods were fitted (and on how many examples), the
    thresholds per method and known-data TPR, and the options of the scores that rerun the model."""

    file: str | None = None                  # the statistics' file name, beside the model (None: FILE.ood.safetensors)
    methods: tuple[str, ...] = ()            # scorers fitted on features/logits
    n_train: int | None = None
    n_val: int | None = None
    flag: str | None = None                  # the flagging rule, in words
    thresholds: dict[str, dict[str, float]] | None = None   # method → {tpr: threshold}
    model_methods: dict[str, dict] = field(default_factory=dict)  # odin / mc-dropout → their options

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OODInfo:
        return cls(data.get("file"), tuple(data.get("methods") or ()), data.get("n_train"), data.get("n_val"),
                   data.get("flag"), data.get("thresholds"), dict(data.get("model_methods") or {}))

    def to_dict(self) -> dict[str, Any]:
        out = {"file": self.file, "methods": list(self.methods), "n_train": self.n_train, "n_val": self.n_val,
               "flag": self.flag, "thresholds": self.thresholds, "model_methods": self.model_methods or None}
        return {k: v for k, v in out.items() if v is not None}

    @property
    def stored_methods(self) -> list[str]:
        """Every method with thresholds: fitted scorers, then model scores."""
        return [*self.methods, *self.model_methods]


# ---------------------------------------------------------------------------------------------- the card
#: The stored key of each field, in the order a file lists them (the training loop's order, then calibration's).
_KEYS = {"format_version": "format_version", "labels": "labels", "taxonomy_json": "taxonomy",
         "taxonomy_hash": "taxonomy_hash", "backbone": "backbone", "head": "head", "image_size": "image_size",
         "preprocessing": "preprocessing", "model_config": "model_config", "metric": "metric", "model": "model",
         "data": "data", "monitor": "monitor", "epoch": "epoch", "metrics": "metrics", "temperature": "temperature",
         "calibration": "calibration", "ood": "ood", "export": "export", "label_prior": "label_prior"}


@dataclass(frozen=True, eq=False)
class ModelCard(Mapping):
    """A model file's card, typed. Read it with `from_dict`, write it with `to_dict` (the stored layout, in a
    fixed key order; unknown keys are kept in `extra`). Change it with `replace`.

    The card is also a read-only mapping over `to_dict()` — the stored layout — so that code written against
    the metadata dict keeps reading it; in the package, read the attributes, which hold the defaults.
    """

    labels: tuple[str, ...]
    taxonomy_json: Mapping[str, Any]
    image_size: int
    model_config: Mapping[str, Any]
    backbone: str = ""
    head: str = DEFAULT_HEAD
    taxonomy_hash: str | None = None
    preprocessing: Preprocessing | None = None
    metric: str = DEFAULT_METRIC
    model: Mapping[str, Any] | None = None          # the network as built (`models.model_metadata`)
    data: DataSettings = field(default_factory=DataSettings)
    monitor: str | None = None
    epoch: int | None = None
    metrics: Mapping[str, Any] | None = None        # the validation metrics of the epoch that chose it
    temperature: float = DEFAULT_TEMPERATURE
    calibration: CalibrationInfo | None = None
    ood: OODInfo | None = None
    export: Mapping[str, Any] | None = None         # how an exported file was made (format, torch, opset, …)
    #: the label frequencies the model's probabilities assume (its training split's, per label, summing to 1);
    #: None: uniform (an older file, or a loss that weighted the classes) — what context priors divide out
    label_prior: tuple[float, ...] | None = None
    format_version: int = FORMAT_VERSION
    extra: Mapping[str, Any] = field(default_factory=dict)  # keys this version does not know, kept as they are
    source: str = field(default="<model card>", compare=False, repr=False)  # the file, for messages

    # ------------------------------------------------------------------------------------------ reading
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "<model card>") -> ModelCard:
        """The card of a stored dict (a checkpoint's JSON, an export's properties); `where` names the file in the
        one-line `ModelError` a missing or malformed key gives."""
        if not isinstance(data, Mapping):
            raise ModelError(f"{where}: corrupt checkpoint metadata (not a JSON object)")
        version = data.get("format_version", FORMAT_VERSION)
        if isinstance(version, bool) or not isinstance(version, int):
            raise ModelError(f"{where}: corrupt checkpoint metadata (format_version {version!r})")
        if version > FORMAT_VERSION:
            raise ModelError(f"{where}: model card format {version} is newer than this taxonomist reads "
                             f"({FORMAT_VERSION}); upgrade taxonomist")
        missing = [k for k in REQUIRED if k not in data]
        if missing:
            raise ModelError(f"{where}: incomplete checkpoint metadata (no {', '.join(map(repr, missing))})")
        data = _upgrade(data)
        try:
            cal, ood, pre = data.get("calibration"), data.get("ood"), data.get("preprocessing")
            card = cls(
                labels=tuple(str(v) for v in _list(data["labels"], "labels")),
                taxonomy_json=_mapping(data["taxonomy"], "taxonomy"),
                image_size=int(data["image_size"]),
                model_config=_mapping(data["model_config"], "model_config"),
                backbone=str(data["backbone"]), head=str(data["head"]),
                taxonomy_hash=data.get("taxonomy_hash"),
                preprocessing=None if pre is None else Preprocessing.from_dict(_mapping(pre, "preprocessing")),
                metric=str(data.get("metric") or DEFAULT_METRIC), model=data.get("model"),
                data=DataSettings.from_dict(data.get("data")), monitor=data.get("monitor"), epoch=data.get("epoch"),
                metrics=data.get("metrics"), temperature=float(data.get("temperature", DEFAULT_TEMPERATURE)),
                calibration=None if cal is None else CalibrationInfo.from_dict(_mapping(cal, "calibration")),
                ood=OODInfo.from_dict(_mapping(ood, "ood")) if ood else None, export=data.get("export"),
                label_prior=_label_prior(data.get("label_prior"), len(data["labels"]), where),
                format_version=FORMAT_VERSION,
                extra={k: v for k, v in data.items() if k not in _STORED}, source=where)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ModelError(f"{where}: incomplete checkpoint metadata ({type(e).__name__}: {e})") from None
        return card

    def to_dict(self) -> dict[str, Any]:
        """The stored layout: plain JSON values in a fixed key order; a default that the file did not need to
        record (no calibration, no OOD, …) is left out."""
        out: dict[str, Any] = {}
        for name, key in _KEYS.items():
            value = getattr(self, name)
            if value is None or (name == "backbone" and not value):
                continue
            if name == "temperature" and not self.calibrated:
                continue  # uncalibrated: the file says nothing about a temperature
            out[key] = (value.to_dict() if hasattr(value, "to_dict") else
                        list(value) if name in ("labels", "label_prior") else value)
        out.update(self.extra)
        return out

    # ------------------------------------------------------------------------------------------ derived
    @cached_property
    def taxonomy(self) -> Taxonomy:
        """The model's taxonomy, its labels in the order of the logits."""
        try:
            return taxonomy_from_json(self.taxonomy_json)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ModelError(f"{self.source}: incomplete checkpoint metadata ({type(e).__name__}: {e})") from None
        except TaxonomistError as e:  # a taxonomy edited into an invalid tree
            raise ModelError(f"{self.source}: {e}") from None

    @property
    def distance_metric(self) -> str:
        """The distance the model is scored with: its `metric`, `auto` made concrete for its taxonomy."""
        return default_metric(self.taxonomy) if self.metric in ("", DEFAULT_METRIC) else self.metric

    @property
    def calibrated(self) -> bool:
        """True when the model has a temperature of its own (calibration fitted one, or the file records one)."""
        return self.calibration is not None or self.temperature != DEFAULT_TEMPERATURE

    @property
    def two_stream(self) -> bool:
        """True when the model takes an ROI crop and a context crop per example."""
        return self.head == "two_stream"

    @property
    def label_index(self) -> dict[str, int]:
        """label → its column in the logits."""
        return {label: i for i, label in enumerate(self.labels)}

    def replace(self, **changes) -> ModelCard:
        """A copy with `changes` (field names, e.g. `temperature=…, calibration=CalibrationInfo(…)`)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------------------------------ mapping
    @cached_property
    def _stored(self) -> dict[str, Any]:
        return self.to_dict()

    def __getitem__(self, key: str) -> Any:
        return self._stored[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._stored)

    def __len__(self) -> int:
        return len(self._stored)

    def __eq__(self, other) -> bool:
        if isinstance(other, ModelCard):
            return self.to_dict() == other.to_dict()
        return NotImplemented

    __hash__ = None

    def __repr__(self) -> str:
        return (f"ModelCard({self.backbone or self.model_config.get('backbone')!r}, head={self.head!r}, "
                f"{len(self.labels)} labels, image_size={self.image_size}, metric={self.metric!r}, "
                f"temperature={self.temperature:g}, ood={list(self.ood.stored_methods) if self.ood else None})")


_STORED = frozenset(_KEYS.values())


def _upgrade(data: Mapping[str, Any]) -> dict[str, Any]:
    """A version-1 dict of any age as the current writer lays it out. What older files lack, and what it means:

    - `backbone`, `head` at the top level (hand-written files): the model config's;
    - `data.context` (before the context scale was recorded): None, not recorded;
    - `preprocessing.interpolation`: bicubic; `calibration.nll_*`, `calibration.objective` (before
      `decide.temperature`): not measured, nll;
    - `metric`, `temperature`, `calibration`, `ood`: the taxonomy's default distance, 1, none.
    A safetensors file without the identity header (before it existed) is `models.checkpoint.check_metadata`'s.
    """
    out = dict(data)
    config = out.get("model_config")
    if isinstance(config, Mapping):
        out.setdefault("backbone", config.get("backbone", ""))
        out.setdefault("head", config.get("head", DEFAULT_HEAD))
    else:
        out.setdefault("backbone", "")
        out.setdefault("head", DEFAULT_HEAD)
    return out


def _label_prior(value, n_labels: int, where: str) -> tuple[float, ...] | None:
    if value is None:
        return None
    values = _list(value, "label_prior")
    if len(values) != n_labels or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0
                                      or v == float("inf") for v in values) or not sum(values) > 0:
        raise ModelError(f"{where}: corrupt checkpoint metadata (label_prior must be {n_labels} non-negative "
                         "numbers, one per label, with a positive sum)")
    return tuple(float(v) for v in values)


def _list(value, name: str) -> list:
    if not isinstance(value, list):
        raise TypeError(f"{name} must be a list, got {type(value).__name__}")
    return value


def _mapping(value, name: str) -> Mapping:
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a JSON object, got {type(value).__name__}")
    return value


__all__ = ["ModelCard", "Preprocessing", "DataSettings", "CalibrationInfo", "OODInfo", "FORMAT_VERSION", "REQUIRED",
           "taxonomy_to_json", "taxonomy_from_json"]
