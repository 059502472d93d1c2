"""Stock models: a classifier trained elsewhere on its own label set (timm's ImageNet head, a FungiTastic
checkpoint), its classes mapped onto a taxonomy's labels by name, used as is — no fine-tuning.

`map_class_names` is the pure part (names → a sparse many-to-one mapping); `StockClassifier` wraps the model so
that it outputs `{"logits", "features"}` over the taxonomy's labels like a `TaxonModel`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from taxonomist.errors import ConfigError, DataError, ModelError
from taxonomist.taxonomy import Taxonomy

#: Probability given to a label that no source class maps to (its log is the label's logit): finite, so the
#: log-loss of an example whose label the stock model cannot name is large but not infinite.
UNMAPPED_FLOOR = 1e-12
TIMM_PREFIX = "timm/"


def _norm(name: str) -> str:
    return re.sub(r"\s+", " ", str(name).replace("_", " ")).strip().casefold()


@dataclass
class ClassMapping:
    """Where each source class went. `target[s]` is the label index of source class `s`, or -1 (dropped)."""

    target: np.ndarray
    how: list[str]                       # per source class: exact | genus | unmapped | internal
    labels: tuple[str, ...]
    source_names: list[str]
    notes: list[str] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        how = np.asarray(self.how)
        mapped_labels = set(self.target[self.target >= 0].tolist())
        return {"source_classes": len(self.how), "mapped": int((self.target >= 0).sum()),
                "exact": int((how == "exact").sum()), "genus": int((how == "genus").sum()),
                "unmapped": int((how == "unmapped").sum()), "internal": int((how == "internal").sum()),
                "labels": len(self.labels), "labels_covered": len(mapped_labels),
                "labels_without_source": len(self.labels) - len(mapped_labels),
                "many_to_one": int(sum(np.bincount(self.target[self.target >= 0], minlength=len(self.labels)) > 1))}

    def matrix(self) -> np.ndarray:
        """(S, L) 0/1 float32: source class s adds its probability to label target[s]."""
        m = np.zeros((len(self.target), len(self.labels)), dtype=np.float32)
        keep = self.target >= 0
        m[np.flatnonzero(keep), self.target[keep]] = 1.0
        return m

    def summary(self) -> str:
        c = self.counts
        return (f"{c['mapped']} of {c['source_classes']} source classes mapped to {c['labels_covered']} of "
                f"{c['labels']} labels ({c['exact']} by name, {c['genus']} rolled up to their genus; "
                f"{c['unmapped'] + c['internal']} dropped: {c['unmapped']} unknown names, {c['internal']} naming "
                f"a taxon that is not a label); {c['labels_without_source']} labels have no source class")


def map_class_names(source_names: Sequence[str], taxonomy: Taxonomy) -> ClassMapping:
    """Map a stock model's class names onto `taxonomy.labels`, case- and whitespace-insensitively.

    A source name may list synonyms separated by commas (timm's ImageNet descriptions: "goldfish, Carassius
    auratus"); the first synonym naming a node wins. A source class naming a label maps to it (`exact`);
    one naming a binomial whose species is not a node but whose genus (first word) is a label maps to that
    genus (`genus`: a species-level model evaluated on genus labels). Several source classes may map to one
    label: their probabilities are summed. Names matching nothing (`unmapped`) or an internal node that is not
    a label (`internal`) are dropped.

    >>> tax = Taxonomy.from_parents({"Animalia": None, "Carassius": "Animalia", "Carassius auratus": "Carassius",
    ...                              "Amanita": "Animalia"}, labels=["Carassius auratus", "Amanita"])
    >>> m = map_class_names(["goldfish, Carassius auratus", "Amanita muscaria", "Amanita phalloides", "tench"], tax)
    >>> m.target.tolist(), m.how
    ([0, 1, 1, -1], ['exact', 'genus', 'genus', 'unmapped'])
    """
    names = [str(n) for n in source_names]
    if not names:
        raise DataError("the stock model has no class names")
    nodes = {_norm(n): n for n in taxonomy.names}
    label_index = {lab: i for i, lab in enumerate(taxonomy.labels)}
    target = np.full(len(names), -1, dtype=np.int64)
    how = []
    for s, name in enumerate(names):
        synonyms = [p for p in (_norm(x) for x in name.split(",")) if p]
        node = next((nodes[p] for p in synonyms if p in nodes), None)
        if node is not None:
            if node in label_index:
                target[s], kind = label_index[node], "exact"
            else:
                kind = "internal"
        else:
            kind = "unmapped"
            for p in synonyms:
                words = p.split(" ")
                genus = nodes.get(words[0]) if len(words) >= 2 else None
                if genus is not None and genus in label_index:
                    target[s], kind = label_index[genus], "genus"
                    break
        how.append(kind)
    return ClassMapping(target, how, tuple(taxonomy.labels), names)


def read_class_names(path: str | Path) -> list[str]:
    """One class name per line, in the model's output order (a CSV/TSV line keeps its first field only when
    the file has a header `class_name` or `name`; blank lines are errors — they would shift every index)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: class-names file not found")
    lines = p.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if lines and lines[0].strip().split(",")[0].split("\t")[0] in ("class_name", "name"):
        lines = [re.split(r"[,\t]", ln, maxsplit=1)[0] for ln in lines[1:]]
    for i, ln in enumerate(lines, 1):
        if not ln.strip():
            raise DataError(f"{p}: line {i} is empty (one class name per line, in the model's output order)")
    if not lines:
        raise DataError(f"{p}: no class names")
    return [ln.strip() for ln in lines]


class StockClassifier(nn.Module):
    """A stock classifier with its probabilities mapped onto our labels: `{"logits", "features"}` like a
    TaxonModel. logits = log(renormalised mapped probabilities), floored at `UNMAPPED_FLOOR`, so a softmax of
    them gives back the renormalised probabilities (a row with no mapped mass becomes uniform)."""

    def __init__(self, model: nn.Module, mapping: ClassMapping, source_temperature: float = 1.0):
        super().__init__()
        self.model = model
        self.mapping = mapping
        self.source_temperature = float(source_temperature)
        self.register_buffer("map_matrix", torch.from_numpy(mapping.matrix()), persistent=False)

    def forward(self, image):
        if hasattr(self.model, "forward_features") and hasattr(self.model, "forward_head"):
            feats = self.model.forward_features(image)
            features = self.model.forward_head(feats, pre_logits=True)
            source = self.model.forward_head(feats)
        else:
            source = self.model(image)
            features = source
        if source.shape[1] != self.map_matrix.shape[0]:
            raise ModelError(f"the stock model outputs {source.shape[1]} classes but {self.map_matrix.shape[0]} "
                             "class names were given")
        probs = torch.softmax(source.float() / self.source_temperature, dim=1) @ self.map_matrix
        total = probs.sum(1, keepdim=True)
        probs = torch.where(total > 0, probs / total.clamp_min(1e-30), torch.full_like(probs, 1.0 / probs.shape[1]))
        return {"logits": probs.clamp_min(UNMAPPED_FLOOR).log(), "features": features.float().flatten(1)}


def stock_class_names(model: nn.Module, class_names: str | Path | Sequence[str] | None) -> list[str]:
    """The given names (a file or a list), else timm's ImageNet descriptions when the model has an ImageNet head."""
    if class_names is not None:
        names = read_class_names(class_names) if isinstance(class_names, (str, Path)) else [str(n) for n in class_names]
    else:
        from timm.data import ImageNetInfo, infer_imagenet_subset
        subset = infer_imagenet_subset(model) if hasattr(model, "pretrained_cfg") else None
        if not subset:
            raise ConfigError("the stock model's class names are unknown: pass --class-names FILE (one name per "
                              "line, in output order); only ImageNet heads are named automatically")
        names = ImageNetInfo(subset).label_descriptions()
    n_out = getattr(model, "num_classes", None)
    if isinstance(n_out, int) and n_out and n_out != len(names):
        raise ConfigError(f"the stock model has {n_out} outputs but {len(names)} class names were given")
    return names


def create_stock_model(spec: str, taxonomy: Taxonomy, class_names=None, pretrained: str = "auto",
                       image_size: int | None = None) -> tuple[StockClassifier, dict]:
    """`timm/NAME` (or a bare timm name) with its own classifier head → (StockClassifier, preprocessing).

    `pretrained`: `auto` (timm's weights: needs the network or timm's cache), `none` (random weights: tests),
    or a weights file of the whole model (head included, e.g. a FungiTastic checkpoint; `num_classes` is then
    the number of class names). Preprocessing (mean, std, interpolation, input size, crop) is the model's.
    """
    import timm

    from taxonomist.models import pretrained as weights

    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError("the stock model is empty; give timm/NAME, e.g. timm/resnet50.a1_in1k")
    name = spec.strip()[len(TIMM_PREFIX):] if spec.strip().startswith(TIMM_PREFIX) else spec.strip()
    if not timm.is_model(name):
        from taxonomist.models.backbones import timm_suggestion
        raise ModelError(f"unknown stock model {spec!r}{timm_suggestion(name)}")
    pretrained = (pretrained or "auto").strip()
    kwargs = {}
    names = None
    if class_names is not None:
        names = read_class_names(class_names) if isinstance(class_names, (str, Path)) else list(class_names)
        if pretrained != "auto":  # timm's own weights keep their head: its size is checked against the names
            kwargs["num_classes"] = len(names)
    if pretrained == "auto":
        model, _, pre_override = weights.create_timm_auto(name, advice=weights.STOCK_PRETRAINED_ADVICE, **kwargs)
    else:
        model, pre_override = timm.create_model(name, pretrained=False, **kwargs), None
        if pretrained != "none":
            path = Path(pretrained).expanduser()
            if not path.is_file():
                raise ModelError(f"stock weights {pretrained}: no such file (expected auto, none or a weights file)")
            weights.load_weights_file(model, path, name)
    model.eval()
    names = stock_class_names(model, names)
    mapping = map_class_names(names, taxonomy)
    if not (mapping.target >= 0).any():
        raise DataError(f"none of the stock model's {len(names)} class names is a label of the dataset "
                        f"(first names: {', '.join(names[:3])}); check --class-names")
    from timm.data import resolve_data_config
    dc = resolve_data_config({}, model=model)
    size = int(image_size or dc["input_size"][-1])
    dc.update(pre_override or {})  # the offline Lite0 weights have their own normalisation
    pre = {"mean": tuple(float(v) for v in dc["mean"]), "std": tuple(float(v) for v in dc["std"]),
           "interpolation": "bicubic" if dc.get("interpolation") == "bicubic" else "bilinear",
           "image_size": size, "crop_pct": float(dc.get("crop_pct", 0.875))}
    return StockClassifier(model, mapping), pre
