"""Export a checkpoint to ONNX or TorchScript with its labels, taxonomy, preprocessing and calibration inside,
so that one file (and its OOD statistics beside it, `FILE.ood.safetensors`) is enough to predict; or to a folder
for the Hugging Face Hub (`fmt="hf"`, written by `taxonomist.deploy.hub.export_hub_folder`).

The graph takes `image` (and `context` for two-stream models), a normalised float batch (B, 3, S, S) with a
dynamic batch axis, and returns `logits` over the labels and pooled `features` (DESIGN.md).
"""
from __future__ import annotations

import dataclasses
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from taxonomist.deploy.summary import ExportSummary
from taxonomist.errors import ConfigError, ModelError
from taxonomist.inference.model_file import is_onnx, ood_path
from taxonomist.inference.onnx_model import (DEFAULT_OPSET, check_agreement, export_onnx, file_metadata,
                                             trace_batches, traceable)
from taxonomist.taxonomy import suggest
from taxonomist.utils.files import file_set

FORMATS = ("onnx", "torchscript", "hf")

__all__ = ["DEFAULT_OPSET", "FORMATS", "ExportSummary", "export_model"]


def export_model(checkpoint: str | Path, out: str | Path, fmt: str = "onnx", opset: int = DEFAULT_OPSET,
                 check: bool = True, trust_code: bool = False, card=None) -> ExportSummary:
    """Export a checkpoint (or a run directory's best checkpoint, a Hub folder, `hf-hub:ORG/NAME[@REVISION]`) to
    `out`, atomically.

    `fmt="onnx"`: `inference.onnx_model.export_onnx` (torch.export, or the TorchScript-based exporter when
    torch.export cannot trace the backbone; validated by `onnx.checker`); the metadata goes to `metadata_props`
    (`inference.onnx_model.file_metadata`). `fmt="torchscript"`: `torch.jit.trace`, the same
    metadata as `_extra_files`. With `check`, the exported model runs a random batch of another size than
    the traced one and must agree with PyTorch (`onnx_model.CHECK_TOLERANCE`). The checkpoint's OOD
    statistics, if any, go beside it (`ood_path(out)`).

    The model and its statistics replace an earlier export as a pair (`utils.files.file_set`): both are written
    completely first, then the old statistics are removed, the model renamed into place and the statistics
    after it. A kill leaves the old pair, the new pair, or a model without statistics (refused when OOD is
    asked for: "OOD statistics named in … are missing"), never a model beside another export's statistics.
    `fmt="hf"`: the folder `out` for the Hugging Face Hub (`deploy.hub.export_hub_folder`; `card` is its
    `deploy.hub_card.CardOptions`: repo id, licence); its weights are the checkpoint's bytes, so no check runs.
    `out` may not be a file of the checkpoint. `trust_code`: export checkpoints whose backbone imports code
    (`module:`), refused without it; the exported file itself never imports it.

    >>> export_model("runs/demo/run", "model.onnx")        # doctest: +SKIP
    """
    from taxonomist.deploy.hub import resolve_model_source
    from taxonomist.inference.model_file import load_model
    from taxonomist.models.checkpoint import resolve_checkpoint

    start = time.time()
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}{suggest(str(fmt), FORMATS)}; choose one of "
                          f"{', '.join(FORMATS)}")
    checkpoint = resolve_model_source(checkpoint)
    if is_onnx(checkpoint):
        raise ModelError(f"{checkpoint}: already an exported ONNX model; export takes a checkpoint "
                         "(.safetensors) or a run directory")
    if fmt == "hf":
        from taxonomist.deploy.hub import export_hub_folder

        return export_hub_folder(checkpoint, out, card)
    out = Path(out)
    if fmt == "onnx" and not is_onnx(out):
        raise ConfigError(f"--out {out}: an ONNX model file must end in .onnx (predict and serve recognise it so)")
    if fmt == "torchscript" and is_onnx(out):
        raise ConfigError(f"--out {out}: a TorchScript file must not end in .onnx; use .pt")
    if isinstance(opset, bool) or not isinstance(opset, int) or not 13 <= opset <= 23:
        raise ConfigError(f"opset {opset!r}: choose an ONNX opset between 13 and 23 (default {DEFAULT_OPSET})")
    if fmt == "onnx":
        _require_onnx()
    ckpt = resolve_checkpoint(checkpoint)
    from taxonomist.inference.model_file import model_file_parts
    from taxonomist.utils.files import refuse_output_over_inputs
    refuse_output_over_inputs(out, model_file_parts(ckpt))
    refuse_output_over_inputs(ood_path(out), model_file_parts(ckpt), option=f"--out {out}: its OOD statistics")
    model, card, _ = load_model(ckpt, device="cpu", trust_code=trust_code)

    stored = card
    ood_src = ood_file = None
    if card.ood is not None:
        ood_src = ckpt.parent / (card.ood.file or ood_path(ckpt).name)
        if not ood_src.is_file():
            raise ModelError(f"{ood_src}: OOD statistics named in the checkpoint metadata are missing")
        ood_file = ood_path(out)
        stored = stored.replace(ood=dataclasses.replace(card.ood, file=ood_file.name))
    stored = stored.replace(export={"format": fmt, "checkpoint": ckpt.name, "torch": torch.__version__,
                                    **({"opset": opset} if fmt == "onnx" else {})})
    props = file_metadata(stored)

    if fmt == "onnx":
        graph = export_onnx(model, card, props, opset, check=check, source=ckpt, target=out)
        payload, exporter, diff = graph.payload, graph.exporter, graph.max_abs_diff
    else:
        _, sample, probe = trace_batches(card)
        module = traceable(model, card.two_stream)
        with torch.no_grad():
            reference = module(*probe)[0].numpy()
        scripted, exporter = _torchscript(module, sample), "torch.jit.trace"
        diff = None
        if check:
            with torch.no_grad():
                diff = float(np.abs(scripted(*probe)[0].numpy() - reference).max())
        check_agreement(diff, reference, fmt, ckpt)

    # statistics of an earlier export never stay beside this model, whether or not it has its own
    with file_set([out, *([ood_file] if ood_src is not None else [])], remove_first=[ood_path(out)]) as tmp:
        if ood_src is not None:
            shutil.copyfile(ood_src, tmp[ood_file])
        if fmt == "onnx":
            tmp[out].write_bytes(payload)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export and says so
                torch.jit.save(scripted, str(tmp[out]), _extra_files=props)
    return ExportSummary(out, fmt, ckpt, exporter, out.stat().st_size, time.time() - start, ood_file, diff)


def _require_onnx() -> None:
    from taxonomist.inference.onnx_model import require_onnx_package

    for module in ("onnx", "onnxscript", "onnxruntime"):
        require_onnx_package(module)


def _torchscript(module, sample):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export and says so
        return torch.jit.trace(module, sample, check_trace=True)
