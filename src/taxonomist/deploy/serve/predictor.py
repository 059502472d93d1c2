"""The model behind the service: a checkpoint or ONNX file with its eval transform, temperature, decision rule
and optional OOD scorer, turning a batch of decoded images into the answers `POST /predict` returns.

The same steps as `taxonomist predict` (`inference.predict`), on images that arrive over HTTP instead of files.
A two-stream model takes each example as a pair (ROI crop, context crop): sent as two files, or cut here from a
frame and a box as `data prepare` cuts them (`crops`).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from taxonomist.card import ModelCard
from taxonomist.decide import ENSEMBLE_OOD_METHOD, MODEL_OOD_METHODS, OOD_METHODS, DecisionOptions, answer, \
    answer_records, apply_temperature
from taxonomist.decide.answer import TOP_SHOWN
from taxonomist.errors import ConfigError, ModelError
from taxonomist.taxonomy import suggest

#: Alternatives listed per image.
TOP_K = TOP_SHOWN


class WithContext(NamedTuple):
    """A preprocessed input with the context its answer's priors read (`context` form field, --priors)."""

    input: Any
    context: str | None
#: `--ood` methods of the service: those of `predict` but `ensemble` (one model). `odin` and `mc-dropout` run
#: the PyTorch model again per batch (`inference.ood_model`), with the options it was calibrated with.
SERVE_OOD_METHODS = (*OOD_METHODS, *MODEL_OOD_METHODS)


@dataclass(frozen=True)
class ServeOptions:
    """What `taxonomist serve` decides — `decide`, the `DecisionOptions` `predict` takes too — and how it runs the
    model. Checked when made; what needs the model is checked when it loads (`Predictor.load`)."""

    decide: DecisionOptions = field(default_factory=DecisionOptions)
    device: str = "cpu"
    context_scale: str | None = None         # the context a frame + box gives; None: the model's recorded one
    trust_code: bool = False                 # load a checkpoint whose backbone imports code (`--trust-code`)
    engine: str = "auto"                     # what runs a checkpoint: auto | torch | onnx (`onnx_model.ENGINES`)

    def __post_init__(self):
        from taxonomist.inference.onnx_model import ENGINES

        if not isinstance(self.decide, DecisionOptions):
            raise ConfigError(f"ServeOptions.decide must be a DecisionOptions, got {type(self.decide).__name__}")
        if self.decide.ood == ENSEMBLE_OOD_METHOD:
            raise ConfigError("--ood ensemble needs several checkpoints; the service runs one model (use "
                              f"{', '.join(SERVE_OOD_METHODS)}, or `taxonomist predict` for an ensemble)")
        if self.decide.tta is not None:
            raise ConfigError("--tta: the service answers one view per image; use `taxonomist predict --tta`")
        if self.context_scale is not None:
            from taxonomist.deploy.serve.boxes import canonical_scale

            canonical_scale(self.context_scale)
        if self.engine not in ENGINES:
            raise ConfigError(f"unknown engine {self.engine!r}{suggest(str(self.engine), ENGINES)}; "
                              f"choose one of {', '.join(ENGINES)}")

    def to_dict(self) -> dict[str, Any]:
        """Plain values (`from_dict` reads them back): what `--workers N` hands each worker process."""
        return {"decide": self.decide.describe(), "device": self.device, "context_scale": self.context_scale,
                "trust_code": self.trust_code, "engine": self.engine}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ServeOptions:
        return cls(DecisionOptions(**data.get("decide", {})),
                   **{k: v for k, v in data.items() if k != "decide"})


@dataclass
class Predictor:
    """A loaded model ready to answer batches of uint8 CHW images (`predict_images`)."""

    model_path: Path
    model: Any
    card: ModelCard
    taxonomy: Any
    options: ServeOptions
    device: Any
    decision: DecisionOptions                # `options.decide` resolved for the model's taxonomy
    transform: Any = None
    ood_scorer: Any = None
    ood_threshold: float | None = None
    context_scale: str | None = None
    ood_options: dict | None = None          # odin / mc-dropout: the options they were calibrated with
    info: dict = field(default_factory=dict)

    # ------------------------------------------------------------------------------------------ build
    @classmethod
    def load(cls, model_path: str | Path, options: ServeOptions | None = None) -> Predictor:
        """Load `model_path` (checkpoint, run directory or `.onnx`) and prepare the decision and OOD steps;
        every option is checked here, before the service accepts a request."""
        from taxonomist.inference.members import check_ood_members, member_ood_scorers
        from taxonomist.inference.model_file import load_model, resolve_model
        from taxonomist.inference.run_model import eval_transform
        from taxonomist.runtime import select_device

        options = options or ServeOptions()
        path = resolve_model(model_path)
        check_ood_members(options.decide, [path])  # before loading
        device = select_device(options.device)
        model, card, taxonomy = load_model(path, device=str(device), trust_code=options.trust_code,
                                           engine=options.engine, needs_torch=options.decide.needs_torch)
        decision = options.decide.resolve(taxonomy, model_metric=card.metric, label_prior=card.label_prior)
        scorer = threshold = ood_options = None
        if decision.ood:
            how = member_ood_scorers([path], decision.ood, decision.ood_threshold, decision.ood_tpr)[0]
            scorer, threshold, ood_options = how.scorer, how.threshold, how.options
        model.eval()
        predictor = cls(path, model, card, taxonomy, options, device, decision, eval_transform(card), scorer,
                        threshold, _context_scale(options, card, path), ood_options)
        predictor.info = predictor._describe()
        return predictor

    @property
    def temperature(self) -> float:
        return self.card.temperature

    def _describe(self) -> dict:
        card = self.card
        path = self.model_path
        # `run/checkpoints/best.safetensors` says which run; the bare file name would not
        name = f"{path.parent.parent.name}/{path.parent.name}/{path.name}" if path.parent.name == "checkpoints" \
            else path.name
        pre = card.preprocessing
        return {"model": name, "path": str(path), "backbone": card.backbone or None,
                "head": card.head, "image_size": card.image_size,
                "preprocessing": None if pre is None else pre.to_dict(), "temperature": card.temperature,
                "labels": len(card.labels), "taxonomy_hash": self.taxonomy.hash,
                "metric": self.decision.metric, "decision": self.decision.decision,
                "candidates": len(self.decision.candidates) if self.decision.candidates is not None else None,
                "ood": ({"method": self.decision.ood, "threshold": self.ood_threshold}
                        if self.decision.ood else None),
                "epoch": card.epoch, "device": str(self.device), "engine": self.engine,
                "inputs": self.inputs(), **self.priors_info()}

    def priors_info(self) -> dict:
        """With --priors: the file, its contexts and its settings (what `GET /health` and `/metadata` add)."""
        shift = self.decision.prior_shift
        if shift is None:
            return {}
        return {"priors": {"file": Path(shift.source).name, "sha256": shift.digest, "contexts": sorted(shift.index),
                           "strength": shift.strength, "floor": shift.floor,
                           "unknown_taxa": list(shift.unknown_taxa)}}

    @property
    def engine(self) -> str:
        """What runs the model: onnxruntime or PyTorch."""
        from taxonomist.inference.onnx_model import OnnxTaxonModel

        return "onnxruntime" if isinstance(self.model, OnnxTaxonModel) else "PyTorch"

    # ------------------------------------------------------------------------------------------ inputs
    @property
    def two_stream(self) -> bool:
        """True when the model takes an ROI crop and a context crop per example."""
        return self.card.two_stream

    @property
    def sees_context(self) -> bool:
        """True for a single-stream model trained on the context crops (`data.input: context`)."""
        return not self.two_stream and self.card.data.input == "context_path"

    def inputs(self) -> dict:
        """What a request may send for this model (`GET /health` and `/metadata`, read by the page)."""
        scale = self.context_scale if (self.two_stream or self.sees_context) else None
        return {"two_stream": self.two_stream, "context": "required" if self.two_stream else "refused",
                "bbox": "required" if self.two_stream else "optional",
                "crop": "context" if self.sees_context else "roi", "context_scale": scale,
                "context_scale_from": (None if scale is None else
                                       "--context-scale" if self.options.context_scale is not None else "model")}

    def require_context_scale(self, where: str) -> None:
        """An `UploadError` (400) naming `where` when a frame and a box cannot be cut for this model: it takes a
        context crop and neither its metadata nor --context-scale says at which scale."""
        from taxonomist.deploy.serve.uploads import UploadError

        if (self.two_stream or self.sees_context) and self.context_scale is None:
            raise UploadError(400, f"{where}: this model does not record the context scale it was trained with, "
                                   "so its context cannot be cut from a frame and a box; start `taxonomist serve` "
                                   "with --context-scale S|full (the scale of `data prepare --context`), or send "
                                   "each context crop in the field 'context'")

    def crops(self, frame, bbox, where: str) -> tuple:
        """A decoded frame and a box → the preprocessed input of one example (as `preprocess` returns it), cut
        as `data prepare` cuts it; an `UploadError` (400) naming `where` when the box or the scale does not do."""
        from taxonomist.deploy.serve.boxes import cut_crops

        needs_scale = self.two_stream or self.sees_context
        self.require_context_scale(where)
        roi, context = cut_crops(frame, bbox, self.context_scale if needs_scale else None, where)
        if self.sees_context:
            return self.preprocess(context)
        return self.preprocess(roi, context)

    # ------------------------------------------------------------------------------------------ run
    def preprocess(self, image, context=None) -> Any:
        """A decoded uint8 CHW image → the model's normalised input (its eval transform); a two-stream model's
        input is the pair (ROI, context), both through the same transform as `taxonomist predict` applies."""
        if self.two_stream:
            if context is None:
                raise ModelError("a two-stream model needs the context image too")
            return self.transform(image), self.transform(context)
        return self.transform(image)

    def predict_images(self, inputs: Sequence) -> list[dict]:
        """Preprocessed inputs (from `preprocess`: images, or (ROI, context) pairs for a two-stream model; either
        wrapped in `WithContext` to give the priors a context) → one answer dict per image (no filename)."""
        import torch

        items = list(inputs)
        keys = [item.context if isinstance(item, WithContext) else None for item in items]
        items = [item.input if isinstance(item, WithContext) else item for item in items]
        if self.two_stream:
            images = torch.stack([roi for roi, _ in items]).to(self.device)
            contexts = torch.stack([context for _, context in items]).to(self.device)
        else:
            images, contexts = torch.stack(items).to(self.device), None
        with torch.inference_mode():
            out = self.model(images) if contexts is None else self.model(images, contexts)
        logits = out["logits"].float().cpu().numpy().astype(np.float64)
        features = out["features"].float().cpu().numpy()
        scores = self._model_ood_scores(images, contexts) if self.decision.ood in MODEL_OOD_METHODS else None
        return self.answers(logits, features, scores, keys if self.decision.priors is not None else None)

    def _model_ood_scores(self, images, contexts) -> np.ndarray:
        """ODIN or MC-dropout scores of one batch, with the calibrated options (`ood_model.model_ood_batch`;
        MC-dropout's masks are seeded per batch)."""
        from taxonomist.inference.ood_model import model_ood_batch

        from taxonomist.inference.run_model import input_settings

        _, pre, _, _ = input_settings(self.card)
        return model_ood_batch(self.decision.ood, self.model, images, contexts, self.temperature, pre.std,
                               self.ood_options)

    def answers(self, logits: np.ndarray, features: np.ndarray, ood_scores: np.ndarray | None = None,
                contexts: Sequence | None = None) -> list[dict]:
        """Raw logits and features of a batch → answers (`decide.answer`, `decide.answer_records`): decision,
        P(answer), lineage with P per level, top labels, the rule, and the OOD score and flag when an OOD method
        is set (`ood_scores`: the batch's scores of a model OOD method, computed by the caller); with --priors,
        each image's context (`contexts`) shifts its probabilities and the answer without it is kept (`raw`)."""
        tax = self.taxonomy
        probs = apply_temperature(logits, self.temperature)
        scores = None
        if self.ood_scorer is not None or ood_scores is not None:
            # predict scores the raw (untempered) logits; the stored thresholds were fitted on those
            scores = np.asarray(ood_scores if ood_scores is not None else
                                self.ood_scorer.score(features, logits.astype(np.float32)), dtype=np.float64)
        answers = answer(probs, tax, self.decision, scores, self.ood_threshold, contexts=contexts)
        return answer_records(answers, tax, self.decision, TOP_K, self.decision.ood, self.ood_threshold, contexts)

    def taxonomy_table(self) -> dict:
        """`GET /taxonomy`: the nodes with parent and rank, and the training labels."""
        tax = self.taxonomy
        labels = set(tax.labels)
        nodes = [{"name": n, "parent": tax.parent(n), "rank": tax.rank(n), "label": n in labels} for n in tax.names]
        return {"labels": list(tax.labels), "nodes": nodes, "has_ranks": bool(tax.has_ranks),
                "levels": [level.name for level in tax.levels()], "hash": tax.hash}

    def metadata(self) -> Mapping:
        """`GET /metadata`: the model's card without the bulky label and taxonomy tables."""
        skip = {"labels", "taxonomy"}
        card = {k: v for k, v in self.card.to_dict().items() if k not in skip}
        return {"service": self.info, "model": card}


def _context_scale(options: ServeOptions, card: ModelCard, path: Path) -> str | None:
    """--context-scale when given, else the scale the model recorded at training (`data.context`), else None."""
    from taxonomist.deploy.serve.boxes import canonical_scale

    if options.context_scale is not None:
        return canonical_scale(options.context_scale)
    recorded = card.data.context
    if recorded in (None, ""):
        return None
    try:
        return canonical_scale(recorded)
    except ConfigError:
        raise ModelError(f"{path}: the model's metadata records an invalid context scale {recorded!r}; start the "
                         "service with --context-scale S|full") from None
