"""Checkpoints: weights as safetensors plus a JSON file of metadata (labels, taxonomy, backbone,
preprocessing, epoch, metrics), both written atomically; and the resume state of an interrupted run.

A checkpoint is self-contained: its JSON carries the taxonomy, so `predict` needs no run directory. The
safetensors header repeats the labels, taxonomy and backbone, so weights and JSON that do not belong together
are refused; nothing here unpickles code (the resume state loads with `weights_only=True`).
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

from taxonomist.errors import ConfigError, ModelError, TaxonomistError
from taxonomist.taxonomy import Taxonomy
from taxonomist.taxonomy.io import parse_taxonomy
from taxonomist.utils.files import atomic_path, atomic_write_json

FORMAT_VERSION = 1
#: keys every reader of a checkpoint relies on
REQUIRED_METADATA = ("labels", "taxonomy", "model_config", "image_size")
#: the safetensors header entry that repeats the JSON's labels, taxonomy and backbone (see `check_metadata`)
HEADER_KEY = "taxonomist"


def metadata_path(weights: str | Path) -> Path:
    return Path(weights).with_suffix(".json")


def taxonomy_to_json(taxonomy: Taxonomy) -> dict[str, Any]:
    rows = taxonomy.to_rows()
    return {"format": taxonomy.source_format, "columns": list(rows[0].keys()), "rows": rows,
            "labels": list(taxonomy.labels), "hash": taxonomy.hash}


def taxonomy_from_json(data: dict[str, Any]) -> Taxonomy:
    tax = parse_taxonomy(data["columns"], data["rows"], "<checkpoint taxonomy>")
    return tax.with_labels(data["labels"])


def save_checkpoint(path: str | Path, model, metadata: dict[str, Any]) -> Path:
    """Write `path` (.safetensors) and its `.json` metadata, each atomically; weights first, so a JSON file
    only ever describes complete weights."""
    from safetensors.torch import save_file

    path = Path(path)
    state = {k: v.detach().contiguous().cpu() for k, v in _unwrap(model).state_dict().items()}
    with atomic_path(path) as tmp:
        # one key: safetensors writes its metadata map in no fixed order, and equal weights must give equal bytes
        save_file(state, str(tmp), metadata={HEADER_KEY: json.dumps(_weights_identity(metadata), sort_keys=True)})
    meta = {"format_version": FORMAT_VERSION, **metadata}
    atomic_write_json(metadata_path(path), meta)
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    meta_file = metadata_path(path)
    if not path.is_file():
        raise ModelError(f"{path}: checkpoint not found")
    if not meta_file.is_file():
        raise ModelError(f"{meta_file}: checkpoint metadata not found (expected beside {path.name})")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise ModelError(f"{meta_file}: corrupt checkpoint metadata") from None
    missing = [k for k in REQUIRED_METADATA if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise ModelError(f"{meta_file}: incomplete checkpoint metadata (no {', '.join(map(repr, missing))})")
    return meta


def resolve_checkpoint(path_or_run: str | Path) -> Path:
    """A checkpoint file, or a run directory (→ its checkpoints/best.safetensors)."""
    p = Path(path_or_run)
    if p.is_dir():
        p = p / "checkpoints" / "best.safetensors"
    if not p.is_file():
        raise ModelError(f"{p}: checkpoint not found (give a .safetensors file or a run directory)")
    return p


def _weights_identity(meta: dict[str, Any]) -> dict[str, str]:
    """What the safetensors header repeats of the JSON metadata, so that weights swapped in from another
    run, or JSON edited by hand, are caught at load time instead of predicting with mismatched labels."""
    import hashlib
    labels = meta.get("labels")
    ident = {"format_version": str(FORMAT_VERSION)}
    if isinstance(labels, list):
        ident["labels_sha256"] = hashlib.sha256("\n".join(map(str, labels)).encode("utf-8")).hexdigest()
    tax = meta.get("taxonomy")
    if isinstance(tax, dict) and isinstance(tax.get("rows"), list):
        # rows in a canonical order, so the value depends on the tree and labels, not on how they were listed
        rows = sorted(json.dumps(row, sort_keys=True, ensure_ascii=False) for row in tax["rows"])
        canonical = json.dumps([rows, tax.get("labels")], ensure_ascii=False)
        ident["taxonomy_sha256"] = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    for key in ("taxonomy_hash", "backbone", "head"):
        if isinstance(meta.get(key), str):
            ident[key] = meta[key]
    return ident


def check_metadata(path: Path, meta: dict[str, Any], taxonomy: Taxonomy) -> None:
    """Refuse a checkpoint whose JSON contradicts itself or its weights file (labels, taxonomy, backbone)."""
    from safetensors import SafetensorError, safe_open

    meta_file = metadata_path(path)
    labels = meta.get("labels")
    if labels is not None and list(labels) != list(taxonomy.labels):
        raise ModelError(f"{meta_file}: labels ({len(labels)}) differ from the labels of its taxonomy "
                         f"({len(taxonomy.labels)}); the metadata was edited or mixed from two runs")
    backbone = meta.get("model_config", {}).get("backbone")
    if meta.get("backbone") is not None and backbone is not None and meta["backbone"] != backbone:
        raise ModelError(f"{meta_file}: backbone {meta['backbone']!r} differs from model_config.backbone {backbone!r}")
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = (f.metadata() or {}).get(HEADER_KEY)
    except (SafetensorError, OSError) as e:
        raise ModelError(f"{path}: cannot read checkpoint ({e})") from None
    if stored is None:
        return  # written before the header carried these; the shape check in load_checkpoint still applies
    try:
        header = json.loads(stored)
    except (json.JSONDecodeError, RecursionError):
        header = None
    if not isinstance(header, dict):
        raise ModelError(f"{path}: corrupt {HEADER_KEY!r} entry in the safetensors header")
    expected = _weights_identity(meta)
    for key, value in expected.items():
        if key in header and header[key] != value:
            what = {"labels_sha256": "labels", "taxonomy_sha256": "taxonomy"}.get(key, key)
            raise ModelError(f"{path}: the weights were saved for other {what} than {meta_file.name} describes "
                             f"({header[key][:24]!r} vs {value[:24]!r}); keep each .safetensors with its own .json")


def load_checkpoint(path_or_run: str | Path, device: str = "cpu", trust_code: bool = False):
    """Rebuild the model of a checkpoint and load its weights. Returns (model in eval mode, metadata, taxonomy).

    A checkpoint is data: a backbone that would import or fetch code (`module:PKG:FACTORY`, an
    `open_clip:hf-hub:` model) is refused with a ModelError unless `trust_code` (the CLI's `--trust-code`). The
    other fields that select code are checked against registries when the model is built (timm names, heads,
    fine-tuning modes, interpolations, OOD methods).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from taxonomist.config import ModelConfig, _apply
    from taxonomist.models import build_model
    from taxonomist.models.backbones import check_backbone_trusted
    from taxonomist.models.pretrained import describe_mismatch

    path = resolve_checkpoint(path_or_run)
    meta = read_metadata(path)
    try:
        taxonomy = taxonomy_from_json(meta["taxonomy"])
        model_cfg = ModelConfig()
        _apply(model_cfg, meta["model_config"])
        image_size = int(meta["image_size"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ModelError(f"{metadata_path(path)}: incomplete checkpoint metadata ({type(e).__name__}: {e})") from None
    except TaxonomistError as e:  # a taxonomy edited into an invalid tree
        raise ModelError(f"{metadata_path(path)}: {e}") from None
    check_metadata(path, meta, taxonomy)
    # before anything is built (the top-level `backbone` is a label that check_metadata ties to model_config)
    check_backbone_trusted(model_cfg.backbone, metadata_path(path), trust_code)
    model_cfg.pretrained = "none"  # the checkpoint holds every weight
    model = build_model(model_cfg, taxonomy, image_size)
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as e:
        raise ModelError(f"{path}: cannot read checkpoint ({e})") from None
    problem = describe_mismatch(state, model.state_dict())
    if problem:
        raise ModelError(f"{path}: weights do not match the model described in its metadata "
                         f"(backbone {model_cfg.backbone!r}, {len(taxonomy.labels)} labels): {problem}")
    model.load_state_dict(state, strict=True)
    model.to(device).eval()
    return model, meta, taxonomy


def save_resume_state(path: str | Path, state: dict[str, Any]) -> None:
    import torch
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def check_resume_config(run_dir: str | Path, model_config: dict[str, Any], taxonomy: Taxonomy) -> None:
    """Before `--resume` touches a run: its last checkpoint must have the model, labels and taxonomy that the
    config asks for, else a ConfigError naming the key (the run's own config.yaml stays as it was)."""
    last = Path(run_dir) / "checkpoints" / "last.safetensors"
    if not metadata_path(last).is_file():
        return  # nothing finished yet; load_resume_state says so
    meta = read_metadata(last)
    saved = meta.get("model_config") or {}
    for key in ("backbone", "head", "finetune"):
        if key in saved and key in model_config and saved[key] != model_config[key]:
            raise ConfigError(f"{Path(run_dir) / 'config.yaml'}: model.{key} is {model_config[key]!r} but the run "
                              f"was trained with {saved[key]!r}; resume with the run's own config")
    if list(meta["labels"]) != list(taxonomy.labels):
        raise ConfigError(f"{Path(run_dir)}: the data gives {len(taxonomy.labels)} labels but the run was trained "
                          f"on {len(meta['labels'])} other ones; resume with the same data.root and split")
    # compared as canonical rows, not taxonomy_hash: a hash from an older version may be computed differently
    now = _weights_identity({"taxonomy": taxonomy_to_json(taxonomy)}).get("taxonomy_sha256")
    if now != _weights_identity(meta).get("taxonomy_sha256"):
        raise ConfigError(f"{Path(run_dir)}: the taxonomy differs from the one the run was trained with "
                          "(see the run's taxonomy.csv)")


def load_resume_state(path: str | Path) -> dict[str, Any]:
    import torch
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: nothing to resume (no resume state; was the run started with this --out?)")
    # weights_only: the state holds tensors, numbers, strings, lists and dicts only, so a resume file from
    # elsewhere cannot run code when unpickled; a truncated or foreign file is one clear error
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ModelError(f"{path}: refused resume state: it holds more than tensors and plain values "
                         f"({_first_line(e)})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ModelError(f"{path}: corrupt resume state ({_first_line(e)})") from None


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _unwrap(model):
    model = getattr(model, "module", model)        # DistributedDataParallel
    return getattr(model, "_orig_mod", model)      # torch.compile
