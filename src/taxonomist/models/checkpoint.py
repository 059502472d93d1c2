"""Checkpoints: weights as safetensors plus the model card as JSON beside them (`taxonomist.card.ModelCard`:
labels, taxonomy, backbone, preprocessing, epoch, metrics, calibration), both written atomically, and the model
rebuilt from them.

A checkpoint is self-contained: its JSON carries the taxonomy, so `predict` needs no run directory. The
safetensors header repeats the labels, taxonomy and backbone, so weights and JSON that do not belong together
are refused; nothing here unpickles code. This I/O sits beside the models (DESIGN.md): the training loop writes
checkpoints through it and every consumer reads them through `inference.model_file.load_model` / `read_card`,
which take exported ONNX files too. The resume state of an interrupted run is training's (`train.checkpoint`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from taxonomist.card import FORMAT_VERSION, REQUIRED, ModelCard, taxonomy_from_json, taxonomy_to_json
from taxonomist.errors import ModelError, TaxonomistError
from taxonomist.taxonomy import Taxonomy
from taxonomist.utils.files import atomic_path, atomic_write_json

#: keys every reader of a checkpoint relies on
REQUIRED_METADATA = REQUIRED
#: the safetensors header entry that repeats the JSON's labels, taxonomy and backbone (see `check_metadata`)
HEADER_KEY = "taxonomist"


def metadata_path(weights: str | Path) -> Path:
    return Path(weights).with_suffix(".json")


def is_torchscript(path: str | Path) -> bool:
    """True for a TorchScript archive (`torch.jit.save`, `taxonomist export --format torchscript`): a zip file that
    holds compiled code (`<name>/code/…`, `<name>/constants.pkl`), which a `torch.save` file does not."""
    import zipfile

    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except OSError:
        return False
    return any("/code/" in f"/{n}" or n.endswith("constants.pkl") for n in names)


def save_checkpoint(path: str | Path, model, card: ModelCard | Mapping[str, Any]) -> Path:
    """Write `path` (.safetensors) and its card as `.json`, each atomically; weights first, so a JSON file only
    ever describes complete weights. `card` may be the card's dict (the training loop's metadata)."""
    from safetensors.torch import save_file

    path = Path(path)
    if not isinstance(card, ModelCard):
        card = ModelCard.from_dict(card, str(metadata_path(path)))
    meta = card.to_dict()
    state = {k: v.detach().contiguous().cpu() for k, v in _unwrap(model).state_dict().items()}
    with atomic_path(path) as tmp:
        # one key: safetensors writes its metadata map in no fixed order, and equal weights must give equal bytes
        save_file(state, str(tmp), metadata={HEADER_KEY: json.dumps(weights_identity(meta), sort_keys=True)})
    atomic_write_json(metadata_path(path), meta)
    return path


def write_card(path: str | Path, card: ModelCard) -> None:
    """Replace the card (the `.json`) of the checkpoint `path`, atomically; the weights stay as they are, so the
    card must keep their labels, taxonomy and backbone (calibration adds its keys)."""
    atomic_write_json(metadata_path(path), card.to_dict())


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The checkpoint's JSON as stored (a dict with at least `REQUIRED_METADATA`); `read_card` types it."""
    path = Path(path)
    meta_file = metadata_path(path)
    if not path.is_file():
        raise ModelError(f"{path}: checkpoint not found")
    if not meta_file.is_file():
        if is_torchscript(path):
            raise ModelError(f"{path}: a TorchScript export, made for running the model in other programs "
                             "(torch.jit.load); taxonomist predict, evaluate, serve and export take the checkpoint or "
                             "run directory it was exported from, an .onnx export or a Hub folder")
        raise ModelError(f"{meta_file}: checkpoint metadata not found (expected beside {path.name})")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise ModelError(f"{meta_file}: corrupt checkpoint metadata") from None
    missing = [k for k in REQUIRED_METADATA if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise ModelError(f"{meta_file}: incomplete checkpoint metadata (no {', '.join(map(repr, missing))})")
    return meta


def read_card(path: str | Path) -> ModelCard:
    """The checkpoint's card (`read_metadata`, typed; its defaults fill what an older file lacks)."""
    return ModelCard.from_dict(read_metadata(path), str(metadata_path(path)))


def resolve_checkpoint(path_or_run: str | Path) -> Path:
    """A checkpoint file, or a run directory (→ its checkpoints/best.safetensors)."""
    p = Path(path_or_run)
    if p.is_dir():
        p = p / "checkpoints" / "best.safetensors"
    if not p.is_file():
        raise ModelError(f"{p}: checkpoint not found (give a .safetensors file or a run directory)")
    return p


def weights_identity(meta: Mapping[str, Any]) -> dict[str, str]:
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
    expected = weights_identity(meta)
    for key, value in expected.items():
        if key in header and header[key] != value:
            what = {"labels_sha256": "labels", "taxonomy_sha256": "taxonomy"}.get(key, key)
            raise ModelError(f"{path}: the weights were saved for other {what} than {meta_file.name} describes "
                             f"({header[key][:24]!r} vs {value[:24]!r}); keep each .safetensors with its own .json")


def load_checkpoint(path_or_run: str | Path, device: str = "cpu", trust_code: bool = False):
    """Rebuild the model of a checkpoint and load its weights. Returns (model in eval mode, its `ModelCard`, taxonomy).

    A checkpoint is data: a backbone that would import or fetch code (`module:PKG:FACTORY`, an
    `open_clip:hf-hub:` model) is refused with a ModelError unless `trust_code` (the CLI's `--trust-code`). The
    other fields that select code are checked against registries when the model is built (timm names, heads,
    fine-tuning modes, interpolations, OOD methods).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from taxonomist.config import ModelConfig, apply_values
    from taxonomist.models import build_model
    from taxonomist.models.backbones import check_backbone_trusted
    from taxonomist.models.pretrained import describe_mismatch

    path = resolve_checkpoint(path_or_run)
    meta = read_metadata(path)
    card = ModelCard.from_dict(meta, str(metadata_path(path)))
    taxonomy = card.taxonomy
    try:
        model_cfg = ModelConfig()
        apply_values(model_cfg, card.model_config)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ModelError(f"{metadata_path(path)}: incomplete checkpoint metadata ({type(e).__name__}: {e})") from None
    except TaxonomistError as e:  # a model config edited into invalid values
        raise ModelError(f"{metadata_path(path)}: {e}") from None
    check_metadata(path, meta, taxonomy)
    # before anything is built (the top-level `backbone` is a label that check_metadata ties to model_config)
    check_backbone_trusted(model_cfg.backbone, metadata_path(path), trust_code)
    model_cfg.pretrained = "none"  # the checkpoint holds every weight
    model = build_model(model_cfg, taxonomy, card.image_size)
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
    return model, card, taxonomy


def _unwrap(model):
    model = getattr(model, "module", model)        # DistributedDataParallel
    return getattr(model, "_orig_mod", model)      # torch.compile


__all__ = ["FORMAT_VERSION", "HEADER_KEY", "REQUIRED_METADATA", "ModelCard", "metadata_path", "is_torchscript",
           "taxonomy_to_json", "taxonomy_from_json", "save_checkpoint", "write_card", "read_metadata", "read_card",
           "resolve_checkpoint", "weights_identity", "check_metadata", "load_checkpoint"]
