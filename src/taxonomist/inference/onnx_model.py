"""Run an exported ONNX model (`taxonomist export --format onnx`) with onnxruntime, called like a `TaxonModel`.

The file is self-contained: its `metadata_props` hold the labels, the taxonomy as CSV text, the preprocessing,
the temperature and the rest of the checkpoint's metadata (`file_metadata` writes them, `metadata_from_props`
reads them back into the checkpoint's metadata dict). The OOD statistics sit beside it as `FILE.ood.safetensors`.
"""
from __future__ import annotations

import csv
import io
import json
import warnings
from pathlib import Path
from typing import Any, Mapping

from taxonomist.errors import ModelError
from taxonomist.taxonomy import Taxonomy
from taxonomist.taxonomy.io import parse_taxonomy
from taxonomist.train.checkpoint import taxonomy_from_json, taxonomy_to_json

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

_DATA_KEYS = ("resize", "crop_pct", "grayscale", "input", "context")


def taxonomy_csv_text(taxonomy: Taxonomy) -> str:
    """The taxonomy as the text of its `taxonomy.csv`, in the layout it was read from."""
    rows = taxonomy.to_rows()
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0].keys()), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def file_metadata(meta: Mapping[str, Any]) -> dict[str, str]:
    """A checkpoint's metadata as the string properties of an exported file (see the keys above)."""
    try:
        taxonomy = taxonomy_from_json(meta["taxonomy"])
        pre = meta["preprocessing"]
        data = meta.get("data", {})
        preprocessing = {"image_size": int(meta["image_size"]), "mean": [float(v) for v in pre["mean"]],
                         "std": [float(v) for v in pre["std"]], "interpolation": pre.get("interpolation", "bicubic"),
                         "resize": data.get("resize", "stretch"), "crop_pct": float(data.get("crop_pct", 0.875)),
                         "grayscale": bool(data.get("grayscale", False)), "input": data.get("input", "path"),
                         "context": data.get("context")}
    except (KeyError, TypeError, ValueError) as e:
        raise ModelError(f"checkpoint metadata lacks {e} (labels, taxonomy, image_size and preprocessing are "
                         "needed to export)") from None
    rest = {k: v for k, v in meta.items()
            if k not in ("labels", "taxonomy", "image_size", "preprocessing", "data", "temperature")}
    # the hash as this version computes it: a checkpoint from an older taxonomist may carry another formula's
    rest["taxonomy_hash"] = taxonomy.hash
    return {FORMAT_KEY: str(FORMAT_VERSION), LABELS_KEY: json.dumps(list(meta["labels"])),
            TAXONOMY_KEY: taxonomy_csv_text(taxonomy), PREPROCESSING_KEY: json.dumps(preprocessing),
            TEMPERATURE_KEY: repr(float(meta.get("temperature", 1.0))), METADATA_KEY: json.dumps(rest)}


def metadata_from_props(props: Mapping[str, str | bytes], where: str) -> dict[str, Any]:
    """The checkpoint metadata dict (as `train.checkpoint.read_metadata` returns it) from an exported file's
    properties; `where` names the file in errors."""
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
    return {**rest, "labels": list(labels), "taxonomy": taxonomy_to_json(taxonomy), "taxonomy_hash": taxonomy.hash,
            "image_size": int(pre["image_size"]), "temperature": temperature,
            "preprocessing": {"mean": pre["mean"], "std": pre["std"], "interpolation": pre["interpolation"],
                              "input_size": int(pre["image_size"])},
            "data": {k: pre[k] for k in _DATA_KEYS if k in pre}}


def read_onnx_metadata(path: str | Path) -> dict[str, Any]:
    """The checkpoint metadata stored in an exported ONNX file (labels, taxonomy JSON, image_size,
    preprocessing, data, head, temperature, backbone, ood, …), without building an inference session."""
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

    def __init__(self, session, path: Path, meta: Mapping[str, Any]):
        self.session = session
        self.path = Path(path)
        self.input_names = tuple(i.name for i in session.get_inputs())
        self.head_type = meta.get("head", "flat")
        self.labels = tuple(meta["labels"])
        self.backbone_name = meta.get("backbone", "")
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
    """An exported ONNX model in an onnxruntime session. Returns (model, metadata, taxonomy) like
    `train.checkpoint.load_checkpoint`.

    `device` `cuda` / `cuda:N` uses onnxruntime's CUDA provider when installed (`onnxruntime-gpu`), else
    warns and runs on CPU; anything else runs on CPU with as many threads as torch uses.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: ONNX model not found")
    ort = _require("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(str(path), options, providers=_providers(str(device), ort))
    except Exception as e:  # onnxruntime raises its own (unexported) error types for unreadable graphs
        raise ModelError(f"{path}: onnxruntime cannot load the model ({str(e).splitlines()[0]})") from None
    meta = metadata_from_props(session.get_modelmeta().custom_metadata_map, str(path))
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    if "image" not in inputs or not set(OUTPUT_NAMES) <= set(outputs):
        raise ModelError(f"{path}: expected an input 'image' and outputs 'logits', 'features' "
                         f"(found inputs {inputs}, outputs {outputs})")
    if (meta.get("head") == "two_stream") != ("context" in inputs):
        raise ModelError(f"{path}: head {meta.get('head')!r} does not match the graph inputs {inputs}")
    return OnnxTaxonModel(session, path, meta), meta, taxonomy_from_json(meta["taxonomy"])


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


def _require(module: str):
    """Import an optional ONNX dependency, or a one-line error with the install command."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ModelError(f"ONNX models need the {module} package: {INSTALL_HINT}") from None
