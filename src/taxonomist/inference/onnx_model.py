"""Run an exported ONNX model (`taxonomist export --format onnx`) with onnxruntime, called like a `TaxonModel`.

The file is self-contained: its `metadata_props` hold the labels, the taxonomy as CSV text, the preprocessing,
the temperature and the rest of the checkpoint's model card (`file_metadata` writes them, `metadata_from_props`
reads them back into a `ModelCard`). The OOD statistics sit beside it as `FILE.ood.safetensors`.

`export_onnx` makes such a graph from a model (`taxonomist export` and the cache share it). `predict` and `serve`
run checkpoints on onnxruntime through `load_checkpoint_on_onnxruntime`: exported once into a cache folder keyed by
the checkpoint's SHA-256 (`--engine`, `ENGINES`; docs/deploy.md, "Which engine runs the model").
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from taxonomist.errors import ConfigError, ModelError, TaxonomistError
from taxonomist.taxonomy import Taxonomy
from taxonomist.taxonomy.io import parse_taxonomy
from taxonomist.card import ModelCard, taxonomy_to_json
from taxonomist.utils.files import file_sha256

#: Version of the metadata layout below; a reader refuses a newer one.
FORMAT_VERSION = 1
#: metadata_props keys (also the TorchScript extra files): one fact per key, JSON or plain text.
FORMAT_KEY = "taxonomist.format"
LABELS_KEY = "labels"                    # JSON list, the order of the `logits` columns
TAXONOMY_KEY = "taxonomy.csv"            # the taxonomy table as CSV text (rank columns or concept_name,parent)
PREPROCESSING_KEY = "preprocessing"      # JSON: image_size, mean, std, interpolation, resize, crop_pct, grayscale
TEMPERATURE_KEY = "temperature"          # a number as text: calibrated probabilities = softmax(logits / T)
METADATA_KEY = "taxonomist.metadata"     # JSON: the rest of the checkpoint metadata (backbone, head, ood, …)
PROPERTY_KEYS = (FORMAT_KEY, LABELS_KEY, TAXONOMY_KEY, PREPROCESSING_KEY, TEMPERATURE_KEY, METADATA_KEY)
#: Graph input and output names (DESIGN.md): two-stream models take `context` too.
INPUT_NAMES = ("image", "context")
OUTPUT_NAMES = ("logits", "features")
INSTALL_HINT = "pip install 'taxonomist[onnx]'"
#: ONNX opset of exported graphs: 18 runs on onnxruntime ≥ 1.14 and is the torch.export exporter's default.
DEFAULT_OPSET = 18
#: An export is refused when its logits differ from PyTorch's by more than this (relative to the largest logit).
CHECK_TOLERANCE = 1e-3
#: The ONNX exporters, in the order they are tried: torch.export, then the TorchScript-based one (deprecated, but
#: it handles Python control flow that torch.export cannot trace). The TorchScript-based one is 3× quicker to
#: export Lite0 (8 s against 25 s), but its graph keeps the runtime padding arithmetic of the `tf_` "same" convs
#: (595 nodes against 94) and ran 1.4× slower on onnxruntime, so it stays the fallback, for the cache too.
EXPORTERS = ("torch.export", "torchscript-onnx")

#: `--engine` of predict and serve. auto: a checkpoint on CPU runs on onnxruntime (exported once, cached) when the
#: `onnx` extra is installed and no option needs the PyTorch model, else on PyTorch; torch and onnx force one.
ENGINES = ("auto", "torch", "onnx")
#: Bump when this code would export a checkpoint into another graph than an earlier version did (cache key).
CACHE_VERSION = 1
#: The property of a cached export that holds the key it was made for (`export_cache_key`).
CACHE_KEY_PROPERTY = "taxonomist.cache_key"

log = logging.getLogger("taxonomist.inference")

_DATA_KEYS = ("resize", "crop_pct", "grayscale", "input", "context")


def taxonomy_csv_text(taxonomy: Taxonomy) -> str:
    """The taxonomy as the text of its `taxonomy.csv`, in the layout it was read from."""
    rows = taxonomy.to_rows()
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0].keys()), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def file_metadata(card: ModelCard | Mapping[str, Any]) -> dict[str, str]:
    """A model card as the string properties of an exported file (see the keys above)."""
    if not isinstance(card, ModelCard):
        card = ModelCard.from_dict(card)
    pre, data = card.preprocessing, card.data
    if pre is None:
        raise ModelError("checkpoint metadata lacks 'preprocessing' (labels, taxonomy, image_size and preprocessing "
                         "are needed to export)")
    taxonomy = card.taxonomy
    preprocessing = {"image_size": card.image_size, "mean": list(pre.mean), "std": list(pre.std),
                     "interpolation": pre.interpolation, "resize": data.resize, "crop_pct": data.crop_pct,
                     "grayscale": data.grayscale, "input": data.input, "context": data.context}
    rest = {k: v for k, v in card.to_dict().items()
            if k not in ("labels", "taxonomy", "image_size", "preprocessing", "data", "temperature")}
    # the hash as this version computes it: a checkpoint from an older taxonomist may carry another formula's
    rest["taxonomy_hash"] = taxonomy.hash
    return {FORMAT_KEY: str(FORMAT_VERSION), LABELS_KEY: json.dumps(list(card.labels)),
            TAXONOMY_KEY: taxonomy_csv_text(taxonomy), PREPROCESSING_KEY: json.dumps(preprocessing),
            TEMPERATURE_KEY: repr(float(card.temperature)), METADATA_KEY: json.dumps(rest)}


def metadata_from_props(props: Mapping[str, str | bytes], where: str) -> ModelCard:
    """The model card (as a checkpoint's JSON holds it) from an exported file's properties; `where` names the file
    in errors."""
    # TorchScript hands its extra files back as bytes
    props = {k: v.decode("utf-8") if isinstance(v, bytes) else v for k, v in props.items()}
    if FORMAT_KEY not in props:
        raise ModelError(f"{where}: no taxonomist metadata in the model file (export checkpoints with "
                         "`taxonomist export CHECKPOINT --format onnx --out FILE.onnx`)")
    missing = [k for k in PROPERTY_KEYS if k not in props]
    if missing:
        raise ModelError(f"{where}: incomplete taxonomist metadata (missing {', '.join(missing)})")
    try:
        version = int(props[FORMAT_KEY])
        labels = json.loads(props[LABELS_KEY])
        pre = json.loads(props[PREPROCESSING_KEY])
        temperature = float(props[TEMPERATURE_KEY])
        rest = json.loads(props[METADATA_KEY])
    except (ValueError, TypeError, RecursionError) as e:
        raise ModelError(f"{where}: corrupt taxonomist metadata ({e})") from None
    if version > FORMAT_VERSION:
        raise ModelError(f"{where}: metadata format {version} is newer than this taxonomist reads "
                         f"({FORMAT_VERSION}); upgrade taxonomist")
    reader = csv.DictReader(io.StringIO(props[TAXONOMY_KEY]))
    header = list(reader.fieldnames or [])
    taxonomy = parse_taxonomy(header, [dict(r) for r in reader], f"{where} (taxonomy)").with_labels(labels)
    if rest.get("taxonomy_hash") not in (None, taxonomy.hash):
        raise ModelError(f"{where}: the stored taxonomy does not match its hash (the file was altered)")
    stored = {**rest, "labels": list(labels), "taxonomy": taxonomy_to_json(taxonomy), "taxonomy_hash": taxonomy.hash,
              "image_size": int(pre["image_size"]), "temperature": temperature,
              "preprocessing": {"mean": pre["mean"], "std": pre["std"], "interpolation": pre["interpolation"],
                                "input_size": int(pre["image_size"])},
              "data": {k: pre[k] for k in _DATA_KEYS if k in pre}}
    return ModelCard.from_dict(stored, where)


def read_onnx_card(path: str | Path) -> ModelCard:
    """The model card stored in an exported ONNX file (labels, taxonomy, image_size, preprocessing, data, head,
    temperature, backbone, ood, …), without building an inference session."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: ONNX model not found")
    try:
        import onnx
    except ImportError:  # a runtime-only install: onnxruntime reads the properties too (building a session)
        return load_onnx_model(path)[1]
    from google.protobuf.message import DecodeError

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, OSError, ValueError) as e:
        raise ModelError(f"{path}: not a readable ONNX model ({e})") from None
    return metadata_from_props({p.key: p.value for p in proto.metadata_props}, str(path))


class OnnxTaxonModel:
    """An onnxruntime session behind the `TaxonModel` call: `model(image[, context])` → `{"logits", "features"}`
    as float32 CPU tensors. `eval()`, `train(False)` and `to()` are accepted and change nothing."""

    def __init__(self, session, path: Path, card: ModelCard):
        self.session = session
        self.path = Path(path)
        self.input_names = tuple(i.name for i in session.get_inputs())
        self.head_type = card.head
        self.labels = card.labels
        self.backbone_name = card.backbone
        self.providers = tuple(session.get_providers())

    @property
    def needs_context(self) -> bool:
        return "context" in self.input_names

    def __call__(self, image, context=None) -> dict[str, Any]:
        import torch

        if image.ndim != 4:
            raise ModelError(f"model input must be images (B, C, H, W), got shape {tuple(image.shape)}")
        feed = {"image": _numpy(image)}
        if self.needs_context:
            if context is None:
                raise ModelError(f"{self.path}: a two_stream model needs the context image too: model(image, context)")
            if context.shape[0] != image.shape[0]:
                raise ModelError(f"ROI batch has {image.shape[0]} images but context batch has {context.shape[0]}")
            feed["context"] = _numpy(context)
        logits, features = self.session.run(list(OUTPUT_NAMES), feed)
        return {"logits": torch.from_numpy(logits), "features": torch.from_numpy(features)}

    forward = __call__

    def eval(self) -> "OnnxTaxonModel":
        return self

    def train(self, mode: bool = True) -> "OnnxTaxonModel":
        if mode:
            raise ModelError(f"{self.path}: an exported ONNX model cannot be trained; train the checkpoint")
        return self

    def to(self, *args, **kwargs) -> "OnnxTaxonModel":
        return self  # the execution provider was chosen when the session was built

    def __repr__(self) -> str:
        return f"OnnxTaxonModel({self.path.name}, head={self.head_type}, providers={list(self.providers)})"


def load_onnx_model(path: str | Path, device: str = "cpu"):
    """An exported ONNX model in an onnxruntime session. Returns (model, card, taxonomy) like
    `models.checkpoint.load_checkpoint`.

    `device` `cuda` / `cuda:N` uses onnxruntime's CUDA provider when installed (`onnxruntime-gpu`), else
    warns and runs on CPU; anything else runs on CPU with as many threads as torch uses.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: ONNX model not found")
    ort = require_onnx_package("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(str(path), options, providers=_providers(str(device), ort))
    except Exception as e:  # onnxruntime raises its own (unexported) error types for unreadable graphs
        raise ModelError(f"{path}: onnxruntime cannot load the model ({str(e).splitlines()[0]})") from None
    card = metadata_from_props(session.get_modelmeta().custom_metadata_map, str(path))
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    if "image" not in inputs or not set(OUTPUT_NAMES) <= set(outputs):
        raise ModelError(f"{path}: expected an input 'image' and outputs 'logits', 'features' "
                         f"(found inputs {inputs}, outputs {outputs})")
    if card.two_stream != ("context" in inputs):
        raise ModelError(f"{path}: head {card.head!r} does not match the graph inputs {inputs}")
    return OnnxTaxonModel(session, path, card), card, card.taxonomy


def _providers(device: str, ort) -> list:
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" in ort.get_available_providers():
            index = int(device.partition(":")[2] or 0)
            return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
        warnings.warn("onnxruntime has no CUDA provider here (install onnxruntime-gpu); running the ONNX model "
                      "on CPU", stacklevel=3)
    return ["CPUExecutionProvider"]


def _numpy(tensor):
    import numpy as np

    return np.ascontiguousarray(tensor.detach().float().cpu().numpy())


def require_onnx_package(module: str):
    """Import an optional ONNX dependency, or a one-line error with the install command."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ModelError(f"ONNX models need the {module} package: {INSTALL_HINT}") from None


# ---------------------------------------------------------------------------------------------- export
@dataclass
class OnnxExport:
    """A model exported to ONNX (`export_onnx`): the file's bytes, how it was made and how well it agrees."""

    payload: bytes
    exporter: str               # torch.export, or torchscript-onnx (the fallback)
    max_abs_diff: float | None  # |logits(onnxruntime) − logits(PyTorch)| on a random batch, when checked


def traceable(model, two_stream: bool):
    """`model` (a `TaxonModel`) as the module an exporter traces: `(image[, context]) → (logits, features)`."""
    outputs, two_stream_outputs = _tuple_output_types()
    return (two_stream_outputs if two_stream else outputs)(model).eval()


def trace_batches(card: ModelCard) -> tuple[tuple[str, ...], tuple, tuple]:
    """(input names, a batch of 2 to trace, a batch of 3 to check): seeded random images of the model's size."""
    import torch

    names = INPUT_NAMES[:2 if card.two_stream else 1]
    size = card.image_size
    generator = torch.Generator().manual_seed(0)
    sample = tuple(torch.randn(2, 3, size, size, generator=generator) for _ in names)
    probe = tuple(torch.randn(3, 3, size, size, generator=generator) for _ in names)
    return names, sample, probe


def check_agreement(diff: float | None, reference, fmt: str, source) -> None:
    """A ModelError naming `source` when an export's logits differ from PyTorch's by more than `CHECK_TOLERANCE`."""
    import numpy as np

    if diff is not None and diff > CHECK_TOLERANCE * max(1.0, float(np.abs(reference).max())):
        raise ModelError(f"{source}: the exported {fmt} model disagrees with PyTorch (max |logit difference| "
                         f"{diff:.3g}); the backbone may hold an operation the exporter mistranslates")


def export_onnx(model, card: ModelCard, props: Mapping[str, str], opset: int = DEFAULT_OPSET,
                check: bool = True, source: str | Path = "the model",
                target: str | Path = "the ONNX file") -> OnnxExport:
    """A `TaxonModel` as the bytes of an ONNX file with a dynamic batch axis and `props` as its metadata_props.

    `torch.onnx.export` with the first of `EXPORTERS` that succeeds (torch.export, then the TorchScript-based
    exporter, with a warning), validated by `onnx.checker`; with `check`, onnxruntime runs a
    random batch of another size than the traced one and must agree with PyTorch (`check_agreement`). `source`
    and `target` name the model and the file in errors. Needs the `onnx` extra (onnx, onnxscript, onnxruntime)."""
    import torch

    for module in ("onnx", "onnxscript", "onnxruntime"):
        require_onnx_package(module)
    names, sample, probe = trace_batches(card)
    module = traceable(model, card.two_stream)
    with torch.no_grad():
        reference = module(*probe)[0].numpy()
    proto, exporter = _onnx_proto(module, sample, names, opset, card.backbone)
    _set_props(proto, props)
    _check_onnx(proto, target)
    payload = proto.SerializeToString()
    diff = _onnx_diff(payload, probe, names, reference) if check else None
    check_agreement(diff, reference, "onnx", source)
    return OnnxExport(payload, exporter, diff)


def _tuple_output_types():
    """The two wrapper classes, made on first use: torch is imported only when a model is exported."""
    global _TUPLE_OUTPUT_TYPES
    if _TUPLE_OUTPUT_TYPES is None:
        import torch

        class TupleOutputs(torch.nn.Module):
            def __init__(self, model):
                super().__init__()
                self.model = model

            def forward(self, image):  # the argument names are the graph's input names
                out = self.model(image)
                return out["logits"], out["features"]

        class TwoStreamTupleOutputs(TupleOutputs):
            def forward(self, image, context):
                out = self.model(image, context)
                return out["logits"], out["features"]

        _TUPLE_OUTPUT_TYPES = (TupleOutputs, TwoStreamTupleOutputs)
    return _TUPLE_OUTPUT_TYPES


_TUPLE_OUTPUT_TYPES = None


def _onnx_proto(module, sample, names, opset: int, backbone: str, exporters: tuple[str, ...] = EXPORTERS):
    """The ModelProto with a dynamic batch axis, from the first of `exporters` that succeeds."""
    for k, exporter in enumerate(exporters):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the TorchScript-based exporter is deprecated and says so
                return _EXPORT[exporter](module, sample, names, opset), exporter
        except Exception as e:  # any tracing failure: the other exporter handles other Python control flow
            if k == len(exporters) - 1:
                raise
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            words = {"torch.export": "torch.export", "torchscript-onnx": "the TorchScript-based ONNX exporter"}
            warnings.warn(f"{words[exporter]} could not export {backbone or 'the model'} ({reason}); using "
                          f"{words[exporters[k + 1]]}", stacklevel=4)


def _torch_export(module, sample, names, opset: int):
    import torch

    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    program = torch.onnx.export(module, sample, None, dynamo=True, input_names=list(names),
                                output_names=list(OUTPUT_NAMES), opset_version=opset, verbose=False,
                                dynamic_shapes={name: {0: batch} for name in names}, optimize=True)
    return program.model_proto


def _torchscript_onnx(module, sample, names, opset: int):
    import onnx
    import torch

    buf = io.BytesIO()
    axes = {name: {0: "batch"} for name in (*names, *OUTPUT_NAMES)}
    torch.onnx.export(module, sample, buf, dynamo=False, input_names=list(names), output_names=list(OUTPUT_NAMES),
                      opset_version=opset, dynamic_axes=axes, do_constant_folding=True)
    return onnx.load_from_string(buf.getvalue())


_EXPORT = {"torch.export": _torch_export, "torchscript-onnx": _torchscript_onnx}


def _set_props(proto, props: Mapping[str, str]) -> None:
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = "taxonomist model: inputs " + ", ".join(i.name for i in proto.graph.input) + \
        "; outputs logits (over the labels in metadata 'labels'), features"


def _check_onnx(proto, target) -> None:
    import onnx

    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ModelError(f"{target}: the exported graph fails onnx.checker ({str(e).splitlines()[0]})") from None


def _onnx_diff(payload: bytes, probe, names, reference) -> float:
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(payload, providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {n: x.numpy() for n, x in zip(names, probe)})[0]
    return float(np.abs(logits - reference).max())


# ---------------------------------------------------------------------------------------------- engine
def choose_engine(engine: str, path: str | Path, device: Any = "cpu",
                  needs_torch: str | None = None) -> tuple[str, str | None]:
    """(`onnx` or `torch`, why PyTorch when `auto` did not pick onnxruntime): what runs the model file `path` on
    `device` under `--engine engine` (`ENGINES`).

    An `.onnx` file runs on onnxruntime (`torch` is refused). A checkpoint: `torch` and `onnx` force that engine;
    `auto` picks onnxruntime on CPU unless `needs_torch` names an option that needs the PyTorch model (e.g.
    "--ood odin"), which `onnx` refuses. Whether the `onnx` extra is installed and the export works is settled
    when the model loads (`load_checkpoint_on_onnxruntime`), where `auto` falls back to PyTorch too.

    >>> choose_engine("auto", "best.safetensors", "cpu"), choose_engine("auto", "m.onnx", "cpu")
    (('onnx', None), ('onnx', None))
    >>> choose_engine("auto", "best.safetensors", "cpu", needs_torch="--ood odin")
    ('torch', '--ood odin needs the PyTorch model')
    """
    if engine not in ENGINES:
        from taxonomist.taxonomy import suggest

        raise ConfigError(f"unknown engine {engine!r}{suggest(str(engine), ENGINES)}; choose one of "
                          f"{', '.join(ENGINES)}")
    if Path(path).suffix.lower() == ".onnx":
        if engine == "torch":
            raise ConfigError(f"--engine torch: {path} is an exported ONNX model, which runs on onnxruntime only; "
                              "give its checkpoint, or --engine auto")
        return "onnx", None
    if engine == "onnx":
        if needs_torch:
            raise ConfigError(f"--engine onnx: {needs_torch} needs the PyTorch model; use --engine auto or torch")
        return "onnx", None
    if engine == "torch":
        return "torch", None
    if str(device).partition(":")[0] != "cpu":
        return "torch", f"onnxruntime is the engine for CPU only (device {device})"
    if needs_torch:
        return "torch", f"{needs_torch} needs the PyTorch model"
    return "onnx", None


def onnx_cache_dir() -> Path:
    """Where checkpoints exported for onnxruntime are kept: `$XDG_CACHE_HOME/taxonomist/onnx` (`~/.cache/…`)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "taxonomist" / "onnx"


def export_cache_key(checkpoint: str | Path, opset: int = DEFAULT_OPSET) -> str:
    """The cache key of a checkpoint's export: SHA-256 over the weights' and the metadata's SHA-256 (the metadata
    holds the backbone, head, image size, labels, preprocessing and temperature) and what else changes the file
    (opset, metadata layout, `CACHE_VERSION`, the exporters' order, taxonomist and torch versions)."""
    import torch

    from taxonomist import __version__
    from taxonomist.models.checkpoint import metadata_path

    checkpoint = Path(checkpoint)
    facts = {"weights_sha256": file_sha256(checkpoint), "metadata_sha256": file_sha256(metadata_path(checkpoint)),
             "opset": int(opset), "format": FORMAT_VERSION, "cache": CACHE_VERSION, "exporters": list(EXPORTERS),
             "taxonomist": __version__, "torch": torch.__version__}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()


def load_checkpoint_on_onnxruntime(checkpoint: str | Path, device: str = "cpu", trust_code: bool = False,
                                   fallback: bool = False, opset: int = DEFAULT_OPSET):
    """A checkpoint on onnxruntime: (model, card, taxonomy) like `models.checkpoint.load_checkpoint`, the model
    an `OnnxTaxonModel` over its export in `onnx_cache_dir()`, the card the checkpoint's own.

    The first call exports the checkpoint (logging one line) to `<export_cache_key>.onnx`, written to a temporary
    file and renamed, so that processes exporting at once each leave a whole file. A cached file is used only
    when onnxruntime loads it and its `CACHE_KEY_PROPERTY` equals the key; otherwise it is exported again.
    Nothing is written beside the checkpoint. With `fallback` (`--engine auto`) a backbone that is code
    (`module:`, an `open_clip:hf-hub:` model), a missing `onnx` extra or a failed export returns None after one log
    line saying why (the caller then runs PyTorch); without it the code is exported (with `trust_code`) and the
    others raise.
    """
    from taxonomist.models.backbones import check_backbone_trusted, code_named_by
    from taxonomist.models.checkpoint import metadata_path, read_card

    checkpoint = Path(checkpoint)
    card = read_card(checkpoint)
    backbone = card.model_config.get("backbone")
    check_backbone_trusted(backbone, metadata_path(checkpoint), trust_code)  # a warm cache must not bypass it
    code = code_named_by(backbone)
    if code and fallback:
        # such a model is built from its code on every run, as --trust-code promises; auto does not freeze it
        log.info("%s: running it with PyTorch (its backbone is code, %s; --engine onnx exports it)", checkpoint, code)
        return None
    missing = _missing_packages(("onnxruntime",))
    if missing:
        return _no_onnx(checkpoint, missing, fallback)
    key = export_cache_key(checkpoint, opset)
    path = onnx_cache_dir() / f"{key}.onnx"
    if path.is_file():
        try:
            return _open_cached(path, key, device, card)
        except ModelError as e:
            log.warning("%s; exporting the checkpoint again", e)
    missing = _missing_packages(("onnx", "onnxscript"))
    if missing:
        return _no_onnx(checkpoint, missing, fallback)
    log.warning("exporting %s to ONNX for CPU inference (once; cached at %s)", checkpoint, path)
    try:
        _export_to_cache(checkpoint, path, key, trust_code, opset)
        return _open_cached(path, key, device, card)
    except Exception as e:  # the export is an optimisation: under auto any failure of it falls back to PyTorch
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if not fallback:
            if isinstance(e, TaxonomistError):
                raise
            raise ModelError(f"{checkpoint}: the ONNX export failed ({reason})") from None
        log.warning("%s: the ONNX export failed (%s); running it with PyTorch", checkpoint, reason)
        return None


def _export_to_cache(checkpoint: Path, path: Path, key: str, trust_code: bool, opset: int) -> None:
    import torch

    from taxonomist.models.checkpoint import load_checkpoint
    from taxonomist.utils.files import atomic_write_bytes

    model, card, _ = load_checkpoint(checkpoint, device="cpu", trust_code=trust_code)
    stored = card.replace(export={"format": "onnx", "checkpoint": str(checkpoint.resolve()),
                                  "torch": torch.__version__, "opset": opset, "cache": True})
    props = {**file_metadata(stored), CACHE_KEY_PROPERTY: key}
    graph = export_onnx(model, card, props, opset, check=True, source=checkpoint, target=path)
    atomic_write_bytes(path, graph.payload)  # a temporary file in the cache folder, renamed into place


def _open_cached(path: Path, key: str, device: str, card: ModelCard):
    model, _, _ = load_onnx_model(path, device=device)
    found = model.session.get_modelmeta().custom_metadata_map.get(CACHE_KEY_PROPERTY)
    if found != key:
        raise ModelError(f"{path}: the cached export does not carry its key (made for another checkpoint, or altered)")
    return model, card, card.taxonomy


def _missing_packages(modules: tuple[str, ...]) -> str | None:
    import importlib

    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            return module
    return None


def _no_onnx(checkpoint: Path, missing: str, fallback: bool):
    if not fallback:
        raise ModelError(f"--engine onnx needs the {missing} package: {INSTALL_HINT}")
    log.info("%s: running it with PyTorch (onnxruntime would be faster on CPU: the %s package is missing; %s)",
             checkpoint, missing, INSTALL_HINT)
    return None


