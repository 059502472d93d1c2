"""Checkpoints: weights as safetensors plus a JSON file of metadata (labels, taxonomy, backbone,
preprocessing, epoch, metrics), both written atomically; and the resume state of an interrupted run.

A checkpoint is self-contained: its JSON carries the taxonomy, so `predict` needs no run directory.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from taxonomist.errors import ModelError
from taxonomist.taxonomy import Taxonomy
from taxonomist.taxonomy.io import parse_taxonomy
from taxonomist.utils.files import atomic_path, atomic_write_json

FORMAT_VERSION = 1


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
        save_file(state, str(tmp))
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
        return json.loads(meta_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelError(f"{meta_file}: corrupt checkpoint metadata") from None


def resolve_checkpoint(path_or_run: str | Path) -> Path:
    """A checkpoint file, or a run directory (→ its checkpoints/best.safetensors)."""
    p = Path(path_or_run)
    if p.is_dir():
        p = p / "checkpoints" / "best.safetensors"
    if not p.is_file():
        raise ModelError(f"{p}: checkpoint not found (give a .safetensors file or a run directory)")
    return p


def load_checkpoint(path_or_run: str | Path, device: str = "cpu"):
    """Rebuild the model of a checkpoint and load its weights. Returns (model in eval mode, metadata, taxonomy)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from taxonomist.config import ModelConfig, _apply
    from taxonomist.models import build_model

    path = resolve_checkpoint(path_or_run)
    meta = read_metadata(path)
    taxonomy = taxonomy_from_json(meta["taxonomy"])
    model_cfg = ModelConfig()
    _apply(model_cfg, meta["model_config"])
    model_cfg.pretrained = "none"  # the checkpoint holds every weight
    model = build_model(model_cfg, taxonomy, int(meta["image_size"]))
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as e:
        raise ModelError(f"{path}: cannot read checkpoint ({e})") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelError(f"{path}: weights do not match the model described in its metadata "
                         f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")
    model.to(device).eval()
    return model, meta, taxonomy


def save_resume_state(path: str | Path, state: dict[str, Any]) -> None:
    import torch
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_resume_state(path: str | Path) -> dict[str, Any]:
    import torch
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: nothing to resume (no resume state; was the run started with this --out?)")
    return torch.load(path, map_location="cpu", weights_only=False)


def _unwrap(model):
    model = getattr(model, "module", model)        # DistributedDataParallel
    return getattr(model, "_orig_mod", model)      # torch.compile
