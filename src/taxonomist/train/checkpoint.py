"""The resume state of an interrupted training run, and the check that a resumed run keeps its model, labels and
taxonomy. Checkpoints themselves — weights and model card — are read and written beside the models
(`taxonomist.models.checkpoint`; its names are repeated here for the training loop).
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from taxonomist.errors import ConfigError, ModelError
from taxonomist.models.checkpoint import (FORMAT_VERSION, HEADER_KEY, REQUIRED_METADATA, ModelCard, check_metadata,
                                          is_torchscript, load_checkpoint, metadata_path, read_card, read_metadata,
                                          resolve_checkpoint, save_checkpoint, taxonomy_from_json, taxonomy_to_json,
                                          weights_identity, write_card)
from taxonomist.taxonomy import Taxonomy
from taxonomist.utils.files import atomic_path


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
    card = read_card(last)
    saved = card.model_config
    for key in ("backbone", "head", "finetune"):
        if key in saved and key in model_config and saved[key] != model_config[key]:
            raise ConfigError(f"{Path(run_dir) / 'config.yaml'}: model.{key} is {model_config[key]!r} but the run "
                              f"was trained with {saved[key]!r}; resume with the run's own config")
    if list(card.labels) != list(taxonomy.labels):
        raise ConfigError(f"{Path(run_dir)}: the data gives {len(taxonomy.labels)} labels but the run was trained "
                          f"on {len(card.labels)} other ones; resume with the same data.root and split")
    # compared as canonical rows, not taxonomy_hash: a hash from an older version may be computed differently
    now = weights_identity({"taxonomy": taxonomy_to_json(taxonomy)}).get("taxonomy_sha256")
    if now != weights_identity(card.to_dict()).get("taxonomy_sha256"):
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


__all__ = ["FORMAT_VERSION", "HEADER_KEY", "REQUIRED_METADATA", "ModelCard", "metadata_path", "is_torchscript",
           "taxonomy_to_json", "taxonomy_from_json", "save_checkpoint", "write_card", "read_metadata", "read_card",
           "resolve_checkpoint", "weights_identity", "check_metadata", "load_checkpoint", "save_resume_state",
           "check_resume_config", "load_resume_state"]
