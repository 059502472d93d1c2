"""The model behind the service: a checkpoint or ONNX file with its eval transform, temperature, decision rule
and optional OOD scorer, turning a batch of decoded images into the answers `POST /predict` returns.

The same steps as `taxonomist predict` (`inference.predict`), on images that arrive over HTTP instead of files.
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
from taxonomist.taxonomy import default_metric, suggest

#: Alternatives listed per image.
TOP_K = 5


@dataclass(frozen=True)
class ServeOptions:
    """What `taxonomist serve` decides and how (the options `predict` takes for the same purpose)."""

    decision: str = "argmax"
    candidates: str | None = None            # None | "" | "all" | "fathomnet2025" | a file path
    thresholds: str | float | None = None    # backoff: RANK=P,… or one number
    selective_threshold: float | None = None
    ood: str | None = None
    ood_threshold: float | None = None
    ood_tpr: float | None = None
    ood_fallback: str | None = "auto"
    device: str = "cpu"

    def check(self) -> None:
        """Validate the option values that need no model (the rest is checked when the model loads)."""
        from taxonomist.inference.calibrate import check_tpr

        if self.decision not in DECISIONS:
            raise ConfigError(f"unknown decision {self.decision!r}{suggest(str(self.decision), DECISIONS)}; "
                              f"choose one of {', '.join(DECISIONS)}")
        if self.ood is not None and self.ood not in OOD_METHODS:
            raise ConfigError(f"unknown OOD method {self.ood!r}{suggest(str(self.ood), OOD_METHODS)}; "
                              f"choose one of {', '.join(OOD_METHODS)}")
        if self.ood_threshold is not None and self.ood_tpr is not None:
            raise ConfigError("give either an OOD threshold or an OOD TPR, not both")
        if (self.ood_threshold is not None or self.ood_tpr is not None) and not self.ood:
            raise ConfigError("an OOD threshold or TPR needs an OOD method (--ood METHOD)")
        if self.ood_tpr is not None:
            check_tpr(self.ood_tpr)


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
    info: dict = field(default_factory=dict)

    # ------------------------------------------------------------------------------------------ build
    @classmethod
    def load(cls, model_path: str | Path, options: ServeOptions | None = None) -> Predictor:
        """Load `model_path` (checkpoint, run directory or `.onnx`) and prepare the decision and OOD steps;
        every option is checked here, before the service accepts a request."""
        from taxonomist.inference.model_file import load_model, resolve_model
        from taxonomist.inference.predict import DEFAULT_OOD_TPR, _parse_fallback, _rule_thresholds, parse_thresholds
        from taxonomist.inference.run_model import eval_transform
        from taxonomist.train.loop import select_device

        options = options or ServeOptions()
        options.check()
        path = resolve_model(model_path)
        device = select_device(options.device)
        model, meta, taxonomy = load_model(path, device=str(device))
        if meta.get("head") == "two_stream":
            raise ModelError(f"{path}: a two-stream model needs a context image beside each crop; the service "
                             "takes single images (use `taxonomist predict` on a dataset with context_path)")
        metric = meta.get("metric", "auto")
        metric = default_metric(taxonomy) if metric in ("", "auto") else metric
        cand = None if options.candidates is None else candidate_nodes(taxonomy, options.candidates)
        rule_thr = _rule_thresholds(options.decision, parse_thresholds(options.thresholds),
                                    options.selective_threshold, taxonomy)
        scorer = threshold = fallback = None
        if options.ood:
            from taxonomist.inference.calibrate import load_ood_scorers, ood_threshold

            scorers = load_ood_scorers(path)
            if options.ood not in scorers:
                raise ModelError(f"{path}: no {options.ood!r} OOD statistics (stored: "
                                 f"{', '.join(scorers) or 'none'}); `taxonomist train` calibrates checkpoints "
                                 "unless --no-calibrate")
            scorer = scorers[options.ood]
            threshold = (float(options.ood_threshold) if options.ood_threshold is not None else
                         float(ood_threshold(path, options.ood, options.ood_tpr or DEFAULT_OOD_TPR)))
            fallback = _parse_fallback(options.ood_fallback, taxonomy)
        model.eval()
        predictor = cls(path, model, meta, taxonomy, options, device, eval_transform(meta),
                        float(meta.get("temperature", 1.0)), metric, cand, rule_thr, fallback, scorer, threshold)
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
                "epoch": meta.get("epoch"), "device": str(self.device)}

    # ------------------------------------------------------------------------------------------ run
    def preprocess(self, image) -> Any:
        """A decoded uint8 CHW image → the model's normalised input (its eval transform)."""
        return self.transform(image)

    def predict_images(self, inputs: Sequence) -> list[dict]:
        """Preprocessed images (from `preprocess`) → one answer dict per image (no filename)."""
        import torch

        batch = torch.stack(list(inputs)).to(self.device)
        with torch.inference_mode():
            out = self.model(batch)
        logits = out["logits"].float().cpu().numpy().astype(np.float64)
        features = out["features"].float().cpu().numpy()
        return self.answers(logits, features)

    def answers(self, logits: np.ndarray, features: np.ndarray) -> list[dict]:
        """Raw logits and features of a batch → answers: decision, P(answer), lineage with P per level,
        top labels, and the OOD score and flag when an OOD method is set."""
        from taxonomist.inference.predict import _answer_probability, _level_columns

        tax = self.taxonomy
        probs = apply_temperature(logits, self.temperature)
        nodes = decide(probs, tax, self.options.decision, candidates=self.candidates, metric=self.metric,
                       thresholds=self.rule_thresholds).nodes.copy()
        scores = unknown = None
        if self.ood_scorer is not None:
            # predict scores the raw (untempered) logits; the stored thresholds were fitted on those
            scores = np.asarray(self.ood_scorer.score(features, logits.astype(np.float32)), dtype=np.float64)
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
                answer["ood"] = {"score": round(float(scores[i]), 6), "unknown": bool(unknown[i]),
                                 "method": self.options.ood}
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
