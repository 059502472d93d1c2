"""One entry point for "a model file": a taxonomist checkpoint (`.safetensors` + JSON, or a run directory) or an
exported ONNX graph (`.onnx`, metadata inside, OOD statistics beside it as `FILE.ood.safetensors`).

`predict`, `serve` and `evaluate` load models through `load_model`, so each accepts either kind. The returned
model is called like a `TaxonModel`: `model(images[, context]) -> {"logits": tensor, "features": tensor}` on a
normalised float batch, and has `.eval()` / `.to(device)`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any


def is_onnx(path: str | Path) -> bool:
    """True for an exported ONNX model file."""
    return Path(path).suffix.lower() == ".onnx"


def resolve_model(path: str | Path) -> Path:
    """The model file: a checkpoint (a run directory → its best checkpoint) or an `.onnx` file."""
    from taxonomist.errors import ModelError
    from taxonomist.train.checkpoint import resolve_checkpoint

    if is_onnx(path):
        p = Path(path)
        if not p.is_file():
            raise ModelError(f"{p}: ONNX model not found")
        return p
    return resolve_checkpoint(path)


def read_model_metadata(path: str | Path) -> dict[str, Any]:
    """The checkpoint metadata (labels, taxonomy JSON, preprocessing, temperature, head, …) of either kind,
    without building the model."""
    if is_onnx(path):
        from taxonomist.inference.onnx_model import read_onnx_metadata

        return read_onnx_metadata(resolve_model(path))
    from taxonomist.train.checkpoint import read_metadata

    return read_metadata(resolve_model(path))


def load_model(path: str | Path, device: str = "cpu", trust_code: bool = False):
    """Load a checkpoint or an ONNX file. Returns (model in eval mode, metadata, taxonomy).

    A model file is data: a checkpoint whose backbone would import or fetch code is refused unless `trust_code`
    (`--trust-code`). An ONNX graph runs in onnxruntime and builds no backbone, so the backbone its metadata
    names is never imported, trusted or not."""
    if is_onnx(path):
        from taxonomist.inference.onnx_model import load_onnx_model

        return load_onnx_model(resolve_model(path), device=device)
    from taxonomist.train.checkpoint import load_checkpoint

    return load_checkpoint(path, device=device, trust_code=trust_code)


def model_file_parts(path: str | Path) -> list[tuple[Path, str]]:
    """The files a model consists of, each with a few words saying what it is (for `refuse_output_over_inputs`):
    a checkpoint's weights, its JSON metadata and OOD statistics; an ONNX file and its OOD statistics."""
    from taxonomist.inference.calibrate import ood_path
    from taxonomist.train.checkpoint import metadata_path

    p = resolve_model(path)
    parts = [(p, "a model file"), (ood_path(p), "a model's OOD statistics")]
    if not is_onnx(p):
        parts.append((metadata_path(p), "a model's metadata"))
    return parts
