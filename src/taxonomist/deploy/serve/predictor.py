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
from typing import Any

import numpy as np

from taxonomist.decide import (
    DECISIONS,
    OOD_METHODS,
    apply_temperature,
    candidate_nodes,
    decide,
    node_probabilities,
    ood_fallback,
)
from taxonomist.errors import ConfigError, ModelError
from taxonomist.inference.ood_model import MODEL_OOD_METHODS
from taxonomist.taxonomy import default_metric, suggest

#: Alternatives listed per image.
TOP_K = 5
#: `--ood` methods of the service: those of `predict` but `ensemble` (one model). `odin` and `mc-dropout` run
#: the PyTorch model again per batch (`inference.ood_model`), with the options it was calibrated with.
SERVE_OOD_METHODS = (*OOD_METHODS, *MODEL_OOD_METHODS)


@dataclass(frozen=True)
class ServeOptions:
    """What `taxonomist serve` decides and how (the options `predict` takes for the same purpose)."""

    decision: str = "argmax"
    candidates: str | None = None            # None | "" | "all" | "fathomnet2025" | a file path
    thresholds: str | float | None = None    # backoff: RANK=P,… or one number
    selective_threshold: float | None = None
    top_k: int | None = None                 # rollup / common-ancestor: the labels that count
    ood: str | None = None
    ood_threshold: float | None = None
    ood_tpr: float | None = None
    ood_fallback: str | None = "auto"
    device: str = "cpu"
    context_scale: str | None = None         # the context a frame + box gives; None: the model's recorded one
    trust_code: bool = False                 # load a checkpoint whose backbone imports code (`--trust-code`)

    def __post_init__(self):
        from taxonomist.decide import resolve_ood_method
        object.__setattr__(self, "ood", resolve_ood_method(self.ood))  # `auto`: the score measured best

    def check(self) -> None:
        """Validate the option values that need no model (the rest is checked when the model loads)."""
        from taxonomist.inference.calibrate import check_tpr

        if self.decision not in DECISIONS:
            raise ConfigError(f"unknown decision {self.decision!r}{suggest(str(self.decision), DECISIONS)}; "
                              f"choose one of {', '.join(DECISIONS)}")
        if self.ood == "ensemble":
            raise ConfigError("--ood ensemble needs several checkpoints; the service runs one model (use "
                              f"{', '.join(SERVE_OOD_METHODS)}, or `taxonomist predict` for an ensemble)")
        if self.ood is not None and self.ood not in SERVE_OOD_METHODS:
            raise ConfigError(f"unknown OOD method {self.ood!r}{suggest(str(self.ood), SERVE_OOD_METHODS)}; "
                              f"choose one of {', '.join(SERVE_OOD_METHODS)}")
        if self.ood_threshold is not None and self.ood_tpr is not None:
            raise ConfigError("give either an OOD threshold or an OOD TPR, not both")
        if (self.ood_threshold is not None or self.ood_tpr is not None) and not self.ood:
            raise ConfigError("an OOD threshold or TPR needs an OOD method (--ood METHOD)")
        if self.ood_tpr is not None:
            check_tpr(self.ood_tpr)
        if self.context_scale is not None:
            from taxonomist.deploy.serve.boxes import canonical_scale

            canonical_scale(self.context_scale)


@dataclass
class Predictor:
    """A loaded model ready to answer batches of uint8 CHW images (`predict_images`)."""

    model_path: Path
    model: Any
    meta: dict
    taxonomy: Any
    options: ServeOptions
    device: Any
    transform: Any = None
    temperature: float = 1.0
    metric: str = "lca"
    candidates: list[str] | None = None
    rule_thresholds: Any = None
    fallback: Any = None
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
        from taxonomist.inference.model_file import load_model, resolve_model
        from taxonomist.inference.predict import _parse_fallback, _rule_thresholds, parse_thresholds
        from taxonomist.inference.run_model import eval_transform
        from taxonomist.train.loop import select_device

        options = options or ServeOptions()
        options.check()
        path = resolve_model(model_path)
        if options.ood:
            from taxonomist.inference.predict import check_ood_options

            check_ood_options(options.ood, options.ood_threshold, options.ood_tpr, [path])  # before loading
        device = select_device(options.device)
        model, meta, taxonomy = load_model(path, device=str(device), trust_code=options.trust_code)
        metric = meta.get("metric", "auto")
        metric = default_metric(taxonomy) if metric in ("", "auto") else metric
        cand = None if options.candidates is None else candidate_nodes(taxonomy, options.candidates)
        rule_thr = _rule_thresholds(options.decision, parse_thresholds(options.thresholds),
                                    options.selective_threshold, taxonomy, options.top_k)
        scorer = threshold = fallback = ood_options = None
        if options.ood:
            from taxonomist.inference.predict import member_ood_scorers

            how = member_ood_scorers([path], options.ood, options.ood_threshold, options.ood_tpr)[0]
            scorer, threshold, ood_options = how.scorer, how.threshold, how.options
            fallback = _parse_fallback(options.ood_fallback, taxonomy)
        model.eval()
        predictor = cls(path, model, meta, taxonomy, options, device, eval_transform(meta),
                        float(meta.get("temperature", 1.0)), metric, cand, rule_thr, fallback, scorer, threshold,
                        _context_scale(options, meta, path), ood_options)
        predictor.info = predictor._describe()
        return predictor

    def _describe(self) -> dict:
        meta = self.meta
        path = self.model_path
        # `run/checkpoints/best.safetensors` says which run; the bare file name would not
        name = f"{path.parent.parent.name}/{path.parent.name}/{path.name}" if path.parent.name == "checkpoints" \
            else path.name
        return {"model": name, "path": str(path), "backbone": meta.get("backbone"),
                "head": meta.get("head"), "image_size": meta.get("image_size"),
                "preprocessing": meta.get("preprocessing"), "temperature": self.temperature,
                "labels": len(meta.get("labels", [])), "taxonomy_hash": self.taxonomy.hash,
                "metric": self.metric, "decision": self.options.decision,
                "candidates": len(self.candidates) if self.candidates is not None else None,
                "ood": ({"method": self.options.ood, "threshold": self.ood_threshold}
                        if self.options.ood else None),
                "epoch": meta.get("epoch"), "device": str(self.device), "inputs": self.inputs()}

    # ------------------------------------------------------------------------------------------ inputs
    @property
    def two_stream(self) -> bool:
        """True when the model takes an ROI crop and a context crop per example."""
        return self.meta.get("head") == "two_stream"

    @property
    def sees_context(self) -> bool:
        """True for a single-stream model trained on the context crops (`data.input: context`)."""
        return not self.two_stream and self.meta.get("data", {}).get("input") == "context_path"

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
        """Preprocessed inputs (from `preprocess`: images, or (ROI, context) pairs for a two-stream model) → one
        answer dict per image (no filename)."""
        import torch

        items = list(inputs)
        if self.two_stream:
            images = torch.stack([roi for roi, _ in items]).to(self.device)
            contexts = torch.stack([context for _, context in items]).to(self.device)
        else:
            images, contexts = torch.stack(items).to(self.device), None
        with torch.inference_mode():
            out = self.model(images) if contexts is None else self.model(images, contexts)
        logits = out["logits"].float().cpu().numpy().astype(np.float64)
        features = out["features"].float().cpu().numpy()
        scores = self._model_ood_scores(images, contexts) if self.options.ood in MODEL_OOD_METHODS else None
        return self.answers(logits, features, scores)

    def _model_ood_scores(self, images, contexts) -> np.ndarray:
        """ODIN or MC-dropout scores of one batch, with the calibrated options (`ood_model.model_ood_batch`;
        MC-dropout's masks are seeded per batch)."""
        from taxonomist.inference.ood_model import model_ood_batch

        return model_ood_batch(self.options.ood, self.model, images, contexts, self.temperature,
                               self.meta["preprocessing"]["std"], self.ood_options)

    def answers(self, logits: np.ndarray, features: np.ndarray, ood_scores: np.ndarray | None = None) -> list[dict]:
        """Raw logits and features of a batch → answers: decision, P(answer), lineage with P per level,
        top labels, and the OOD score and flag when an OOD method is set (`ood_scores`: the batch's scores of
        a model OOD method, computed by the caller)."""
        from taxonomist.inference.predict import _answer_probability, _level_columns

        tax = self.taxonomy
        probs = apply_temperature(logits, self.temperature)
        nodes = decide(probs, tax, self.options.decision, candidates=self.candidates, metric=self.metric,
                       thresholds=self.rule_thresholds, top_k=self.options.top_k).nodes.copy()
        scores = unknown = None
        if self.ood_scorer is not None or ood_scores is not None:
            # predict scores the raw (untempered) logits; the stored thresholds were fitted on those
            scores = np.asarray(ood_scores if ood_scores is not None else
                                self.ood_scorer.score(features, logits.astype(np.float32)), dtype=np.float64)
            unknown = scores >= self.ood_threshold
            if self.options.decision != "argmax" and unknown.any():
                nodes = ood_fallback(nodes, unknown, tax, self.fallback, probs=probs, candidates=self.candidates)
        confidence = _answer_probability(probs, tax, nodes)
        levels = _level_columns(tax, nodes)
        node_p = node_probabilities(probs, tax)  # (N, nodes): P(the label lies at or below the node)
        top = np.argsort(-probs, axis=1, kind="stable")[:, :TOP_K]
        labels = tax.labels
        out = []
        for i, node in enumerate(nodes.tolist()):
            lineage = {}
            for level, names in levels.items():
                name = names[i]
                if name:
                    lineage[level] = {"name": name, "p": round(float(node_p[i, tax.index(name)]), 6)}
            answer: dict[str, Any] = {
                "decision": tax.names[node], "confidence": round(float(confidence[i]), 6),
                "rank": tax.rank(tax.names[node]) if tax.has_ranks else None, "lineage": lineage,
                "top": [{"name": labels[j], "p": round(float(probs[i, j]), 6)} for j in top[i].tolist()]}
            if scores is not None:
                # unrounded, as predict writes it: ODIN's scores differ in the 7th decimal
                answer["ood"] = {"score": float(scores[i]), "unknown": bool(unknown[i]),
                                 "method": self.options.ood, "threshold": float(self.ood_threshold)}
            out.append(answer)
        return out

    def taxonomy_table(self) -> dict:
        """`GET /taxonomy`: the nodes with parent and rank, and the training labels."""
        tax = self.taxonomy
        labels = set(tax.labels)
        nodes = [{"name": n, "parent": tax.parent(n), "rank": tax.rank(n), "label": n in labels} for n in tax.names]
        return {"labels": list(tax.labels), "nodes": nodes, "has_ranks": bool(tax.has_ranks),
                "levels": [level.name for level in tax.levels()], "hash": tax.hash}

    def metadata(self) -> Mapping:
        """`GET /metadata`: the model's metadata without the bulky label and taxonomy tables."""
        skip = {"labels", "taxonomy"}
        meta = {k: v for k, v in self.meta.items() if k not in skip}
        return {"service": self.info, "model": meta}


def _context_scale(options: ServeOptions, meta: dict, path: Path) -> str | None:
    """--context-scale when given, else the scale the model recorded at training (`data.context`), else None."""
    from taxonomist.deploy.serve.boxes import canonical_scale

    if options.context_scale is not None:
        return canonical_scale(options.context_scale)
    recorded = (meta.get("data") or {}).get("context")
    if recorded in (None, ""):
        return None
    try:
        return canonical_scale(recorded)
    except ConfigError:
        raise ModelError(f"{path}: the model's metadata records an invalid context scale {recorded!r}; start the "
                         "service with --context-scale S|full") from None
