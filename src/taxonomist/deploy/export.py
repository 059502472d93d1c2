"""Export a checkpoint to ONNX or TorchScript with its labels, taxonomy, preprocessing and calibration inside,
so that one file (and its OOD statistics beside it, `FILE.ood.safetensors`) is enough to predict.

The graph takes `image` (and `context` for two-stream models), a normalised float batch (B, 3, S, S) with a
dynamic batch axis, and returns `logits` over the labels and pooled `features` (DESIGN.md).
"""
from __future__ import annotations

import io
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from taxonomist.errors import ConfigError, ModelError
from taxonomist.inference.calibrate import ood_path
from taxonomist.inference.model_file import is_onnx
from taxonomist.inference.onnx_model import INPUT_NAMES, OUTPUT_NAMES, file_metadata
from taxonomist.taxonomy import suggest
from taxonomist.utils.files import file_set

FORMATS = ("onnx", "torchscript")
#: ONNX opset of the exported graph: 18 runs on onnxruntime ≥ 1.14 and is the torch.export exporter's default.
DEFAULT_OPSET = 18
#: An export is refused when its logits differ from PyTorch's by more than this (relative to the largest logit).
CHECK_TOLERANCE = 1e-3


@dataclass
class ExportSummary:
    """What `export_model` wrote."""

    out: Path
    fmt: str
    checkpoint: Path
    exporter: str              # torch.export, torchscript-onnx (fallback) or torch.jit.trace
    size_bytes: int
    seconds: float
    ood_file: Path | None
    max_abs_diff: float | None  # |logits(export) − logits(PyTorch)| on a random batch, when checked

    def summary(self) -> str:
        lines = [f"exported {self.checkpoint} → {self.out} ({self.fmt}, {self.exporter}, "
                 f"{self.size_bytes / 1e6:.1f} MB) in {self.seconds:.1f} s"]
        if self.max_abs_diff is not None:
            lines.append(f"checked: max |logit difference| against PyTorch on a random batch {self.max_abs_diff:.2e}")
        if self.ood_file is not None:
            lines.append(f"OOD statistics copied to {self.ood_file}")
        return "\n".join(lines)


class TupleOutputs(torch.nn.Module):
    """A `TaxonModel` whose outputs are the (logits, features) tuple an exporter traces."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image):
        out = self.model(image)
        return out["logits"], out["features"]


class TwoStreamTupleOutputs(TupleOutputs):
    def forward(self, image, context):
        out = self.model(image, context)
        return out["logits"], out["features"]


def export_model(checkpoint: str | Path, out: str | Path, fmt: str = "onnx", opset: int = DEFAULT_OPSET,
                 check: bool = True, trust_code: bool = False) -> ExportSummary:
    """Export a checkpoint (or a run directory's best checkpoint) to `out`, atomically.

    `fmt="onnx"`: `torch.onnx.export` through torch.export (the TorchScript-based exporter when torch.export
    cannot trace the backbone), validated by `onnx.checker`; the metadata goes to `metadata_props`
    (`taxonomist.inference.onnx_model.file_metadata`). `fmt="torchscript"`: `torch.jit.trace`, the same
    metadata as `_extra_files`. With `check`, the exported model runs a random batch of another size than
    the traced one and must agree with PyTorch (`CHECK_TOLERANCE`). The checkpoint's OOD statistics, if any,
    go beside it (`ood_path(out)`).

    The model and its statistics replace an earlier export as a pair (`utils.files.file_set`): both are written
    completely first, then the old statistics are removed, the model renamed into place and the statistics
    after it. A kill leaves the old pair, the new pair, or a model without statistics (refused when OOD is
    asked for: "OOD statistics named in … are missing"), never a model beside another export's statistics.
    `out` may not be a file of the checkpoint. `trust_code`: export checkpoints whose backbone imports code
    (`module:`), refused without it; the exported file itself never imports it.

    >>> export_model("runs/demo/run", "model.onnx")        # doctest: +SKIP
    """
    from taxonomist.train.checkpoint import load_checkpoint, resolve_checkpoint

    start = time.time()
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}{suggest(str(fmt), FORMATS)}; choose one of "
                          f"{', '.join(FORMATS)}")
    if is_onnx(checkpoint):
        raise ModelError(f"{checkpoint}: already an exported ONNX model; export takes a checkpoint "
                         "(.safetensors) or a run directory")
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
    model, meta, _ = load_checkpoint(ckpt, device="cpu", trust_code=trust_code)
    two_stream = meta.get("head") == "two_stream"
    names = INPUT_NAMES[:2 if two_stream else 1]
    size = int(meta["image_size"])
    generator = torch.Generator().manual_seed(0)
    sample = tuple(torch.randn(2, 3, size, size, generator=generator) for _ in names)
    probe = tuple(torch.randn(3, 3, size, size, generator=generator) for _ in names)
    module = (TwoStreamTupleOutputs if two_stream else TupleOutputs)(model).eval()

    stored = dict(meta)
    ood_src = ood_file = None
    if meta.get("ood"):
        ood_src = ckpt.parent / meta["ood"].get("file", ood_path(ckpt).name)
        if not ood_src.is_file():
            raise ModelError(f"{ood_src}: OOD statistics named in the checkpoint metadata are missing")
        ood_file = ood_path(out)
        stored["ood"] = {**meta["ood"], "file": ood_file.name}
    stored["export"] = {"format": fmt, "checkpoint": ckpt.name, "torch": torch.__version__,
                        **({"opset": opset} if fmt == "onnx" else {})}
    props = file_metadata(stored)

    with torch.no_grad():
        reference = module(*probe)[0].numpy()
    if fmt == "onnx":
        proto, exporter = _onnx_proto(module, sample, names, opset, meta.get("backbone", ""))
        _set_props(proto, props)
        _check_onnx(proto, out)
        payload = proto.SerializeToString()
        diff = _onnx_diff(payload, probe, names, reference) if check else None
    else:
        scripted, exporter = _torchscript(module, sample), "torch.jit.trace"
        diff = None
        if check:
            with torch.no_grad():
                diff = float(np.abs(scripted(*probe)[0].numpy() - reference).max())
    if diff is not None and diff > CHECK_TOLERANCE * max(1.0, float(np.abs(reference).max())):
        raise ModelError(f"{ckpt}: the exported {fmt} model disagrees with PyTorch (max |logit difference| "
                         f"{diff:.3g}); the backbone may hold an operation the exporter mistranslates")

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
    from taxonomist.inference.onnx_model import _require

    for module in ("onnx", "onnxscript", "onnxruntime"):
        _require(module)


def _onnx_proto(module, sample, names, opset: int, backbone: str):
    """The ModelProto with a dynamic batch axis: torch.export first, the TorchScript-based exporter if it fails."""
    import onnx

    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, sample, None, dynamo=True, input_names=list(names),
                                        output_names=list(OUTPUT_NAMES), opset_version=opset, verbose=False,
                                        dynamic_shapes={name: {0: batch} for name in names}, optimize=True)
        return program.model_proto, "torch.export"
    except Exception as e:  # any tracing failure: the older exporter handles more Python control flow
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        warnings.warn(f"torch.export could not trace {backbone or 'the model'} ({reason}); using the "
                      "TorchScript-based ONNX exporter", stacklevel=3)
    buf = io.BytesIO()
    axes = {name: {0: "batch"} for name in (*names, *OUTPUT_NAMES)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, sample, buf, dynamo=False, input_names=list(names), output_names=list(OUTPUT_NAMES),
                          opset_version=opset, dynamic_axes=axes, do_constant_folding=True)
    return onnx.load_from_string(buf.getvalue()), "torchscript-onnx"


def _set_props(proto, props: dict[str, str]) -> None:
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = "taxonomist model: inputs " + ", ".join(i.name for i in proto.graph.input) + \
        "; outputs logits (over the labels in metadata 'labels'), features"


def _check_onnx(proto, out: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ModelError(f"{out}: the exported graph fails onnx.checker ({str(e).splitlines()[0]})") from None


def _onnx_diff(payload: bytes, probe, names, reference: np.ndarray) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(payload, providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {n: x.numpy() for n, x in zip(names, probe)})[0]
    return float(np.abs(logits - reference).max())


def _torchscript(module, sample):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export and says so
        return torch.jit.trace(module, sample, check_trace=True)
