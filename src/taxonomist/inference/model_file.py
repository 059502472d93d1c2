"""One entry point for "a model file": a taxonomist checkpoint (`.safetensors` + JSON, or a run directory) or an
exported ONNX graph (`.onnx`, metadata inside, OOD statistics beside it as `FILE.ood.safetensors`).

`predict`, `serve`, `evaluate`, calibration and export load models through `load_model` and read their cards
through `read_card`, so each accepts either kind. The returned model is called like a `TaxonModel`:
`model(images[, context]) -> {"logits": tensor, "features": tensor}` on a normalised float batch, and has
`.eval()` / `.to(device)`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from taxonomist.card import ModelCard
from taxonomist.taxonomy import Taxonomy


def is_onnx(path: str | Path) -> bool:
    """True for an exported ONNX model file."""
    return Path(path).suffix.lower() == ".onnx"


def ood_path(checkpoint: str | Path) -> Path:
    """`best.safetensors` → `best.ood.safetensors`, `model.onnx` → `model.ood.safetensors` (DESIGN.md), and a
    TorchScript export `model.pt` → `model.pt.ood.safetensors`, so that an ONNX and a TorchScript export to one
    stem keep their own statistics."""
    p = Path(checkpoint)
    if p.suffix == ".pt":
        return p.with_name(p.name + ".ood.safetensors")
    return p.with_name(p.stem + ".ood.safetensors")


def resolve_model(path: str | Path) -> Path:
    """The model file: a checkpoint (a run directory → its best checkpoint) or an `.onnx` file."""
    from taxonomist.errors import ModelError
    from taxonomist.models.checkpoint import resolve_checkpoint

    if is_onnx(path):
        p = Path(path)
        if not p.is_file():
            raise ModelError(f"{p}: ONNX model not found")
        return p
    return resolve_checkpoint(path)


class LoadedModel(NamedTuple):
    """What `load_model` gives: the model (a `TaxonModel`, or an `OnnxTaxonModel` that onnxruntime runs), its
    card and its taxonomy (the card's, built once). Unpacks as `model, card, taxonomy = load_model(path)`."""

    model: Any
    card: ModelCard
    taxonomy: Taxonomy


def read_card(path: str | Path) -> ModelCard:
    """The card (labels, taxonomy, preprocessing, temperature, metric, head, calibration, OOD, …) of a checkpoint,
    run directory or `.onnx` file, without building the model."""
    if is_onnx(path):
        from taxonomist.inference.onnx_model import read_onnx_card

        return read_onnx_card(resolve_model(path))
    from taxonomist.models.checkpoint import read_card as read_checkpoint_card

    return read_checkpoint_card(resolve_model(path))


def load_model(path: str | Path, device: str = "cpu", trust_code: bool = False, engine: str | None = None,
               needs_torch: str | None = None) -> LoadedModel:
    """Load a checkpoint, a run directory (its best checkpoint) or an exported `.onnx` file: the one loader of
    every command that runs a model. Returns `LoadedModel(model in eval mode, card, taxonomy)`.

    A model file is data: a checkpoint whose backbone would import or fetch code is refused unless `trust_code`
    (`--trust-code`). An ONNX graph runs in onnxruntime and builds no backbone, so the backbone its card names is
    never imported, trusted or not.

    `engine` (`--engine`, `onnx_model.ENGINES`) says what runs a checkpoint: None (the default) PyTorch, as the
    file is; `auto` onnxruntime on CPU through the checkpoint's cached export
    (`onnx_model.load_checkpoint_on_onnxruntime`) when it can, else PyTorch; `torch` or `onnx` force one.
    `needs_torch` names an option that needs the PyTorch model (e.g. "--ood odin"): `auto` then runs PyTorch and
    `onnx` refuses. An `.onnx` file always runs on onnxruntime."""
    path = resolve_model(path)
    if engine is not None:
        from taxonomist.inference.onnx_model import choose_engine, load_checkpoint_on_onnxruntime, log

        chosen, why_torch = choose_engine(engine, path, device, needs_torch)
        if chosen == "onnx" and not is_onnx(path):
            loaded = load_checkpoint_on_onnxruntime(path, device=device, trust_code=trust_code,
                                                    fallback=engine == "auto")
            if loaded is not None:
                return LoadedModel(*loaded)
        elif why_torch:
            log.info("%s: running it with PyTorch (%s)", path, why_torch)
    if is_onnx(path):
        from taxonomist.inference.onnx_model import load_onnx_model

        return LoadedModel(*load_onnx_model(path, device=device))
    from taxonomist.models.checkpoint import load_checkpoint

    return LoadedModel(*load_checkpoint(path, device=device, trust_code=trust_code))


def model_file_parts(path: str | Path) -> list[tuple[Path, str]]:
    """The files a model consists of, each with a few words saying what it is (for `refuse_output_over_inputs`):
    a checkpoint's weights, its JSON metadata and OOD statistics; an ONNX file and its OOD statistics."""
    from taxonomist.models.checkpoint import metadata_path

    p = resolve_model(path)
    parts = [(p, "a model file"), (ood_path(p), "a model's OOD statistics")]
    if not is_onnx(p):
        parts.append((metadata_path(p), "a model's metadata"))
    return parts
