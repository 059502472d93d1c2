"""From a model's outputs on a labelled split (logits, targets, optional OOD scores) to the content of
metrics.json and the columns of predictions.csv, for any decision rule. Numpy only: no model, no files.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from taxonomist.decide import (DecisionOptions, answer, apply_temperature, coverage_risk_curve,
                               expected_calibration_error, ood_metrics, softmax, threshold_for_tpr, threshold_metrics)
from taxonomist.decide.answer import AUTO_METRIC
from taxonomist.errors import DataError
from taxonomist.evaluate.answers import answer_metrics, level_predictions, level_probability_chunks, per_label_table
from taxonomist.evaluate.curves import (downsample_curve, finite_or_none, one_vs_rest_roc, reliability_bins,
                                        roc_points)
from taxonomist.evaluate.metrics import classification_metrics, level_matrices, lineage_consistency
from taxonomist.taxonomy import Taxonomy, distance_matrix

#: Selective thresholds swept for the coverage–risk curve.
COVERAGE_THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)

#: Examples the coverage–risk curve is estimated on (a seeded sample beyond): each threshold costs a pass over
#: examples × nodes, 10 s for 20,000 × 2,000 on a laptop core.
COVERAGE_SAMPLE = 20_000

#: Largest labels × nodes distance matrix the coverage–risk curve builds (float64: 400 MB).
MAX_COVERAGE_CELLS = 5 * 10 ** 7


@dataclass
class OutputsEvaluation:
    """metrics.json content and the per-example columns of predictions.csv (label onwards, one entry per row)."""

    metrics: dict
    columns: dict[str, np.ndarray]


def evaluate_outputs(logits: np.ndarray, targets: np.ndarray, taxonomy: Taxonomy, metric: str,
                     temperature: float = 1.0, options: DecisionOptions | None = None,
                     rank_logits: Mapping[str, np.ndarray] | None = None,
                     ood_scores: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
                     ood_thresholds: Mapping[str, float] | None = None,
                     contexts=None) -> OutputsEvaluation:
    """Every figure of an evaluation, computed once from arrays.

    Args:
        logits: (N, L) label logits; targets: (N,) true label indices into `taxonomy.labels`.
        metric: the distance (`fathomnet2025` or `lca`).
        temperature: the checkpoint's temperature; probabilities are softmax(logits / temperature).
        options: the decision (`decide.DecisionOptions`; default argmax), applied by `decide.answer` as predict
            applies it; with `metric: auto` min-risk minimises `metric`, the distance the answers are scored with.
            Its OOD fields are not used: the scores below are measured, not turned into fallbacks.
        rank_logits: a multirank head's per-level logits, for the lineage consistency of its predictions.
        ood_scores: per OOD method, (scores of the evaluated examples, scores of the `ood` examples).
        ood_thresholds: per method, the threshold in use (from calibration); a missing one is set at 95 %
            recall of these unknowns and marked so.
        contexts: (N,) each example's context, for `options.priors` (`decide.priors`): the answers are decided
            on the shifted probabilities, and `priors` in the metrics holds the answers' figures without them.

    The top-level `mhd`, `top1`, `macro_f1`, `distance_histogram` and `per_label` describe the chosen
    decision's answers (which may be internal nodes); probability-based figures (`per_rank`, `log_loss`,
    `top5`, `hierarchical_accuracy`, ECE) describe the model. With a rule other than argmax, `argmax` holds
    argmax's own `mhd`, `top1`, `macro_f1` and histogram for comparison.
    """
    targets = np.asarray(targets, dtype=np.int64)
    labels = list(taxonomy.labels)
    options = options or DecisionOptions()
    if options.metric == AUTO_METRIC:
        options = options.replace(metric=metric)
    decision = options.decision
    if len(targets) == 0:
        raise DataError("nothing to evaluate: no labelled examples")
    raw = softmax(np.asarray(logits, dtype=np.float64))
    probs = apply_temperature(logits, temperature)
    D = distance_matrix(taxonomy, metric, labels, labels)
    m = classification_metrics(probs, targets, taxonomy, D)
    argmax = probs.argmax(axis=1)
    # `ece` is measured on the probabilities the model reports (after its temperature, when it has one)
    m["ece"] = m.pop("ece_uncalibrated")
    m["ece_uncalibrated"] = expected_calibration_error(raw.max(1), raw.argmax(1) == targets)
    m["temperature"] = float(temperature)
    m["metric"] = metric
    m["decision"] = decision
    m["n_labels"] = len(labels)

    chosen = answer(probs, taxonomy, options, contexts=contexts)
    answer_cols = np.unique(chosen.nodes if chosen.raw_nodes is None else np.r_[chosen.nodes, chosen.raw_nodes])
    d_answers = distance_matrix(taxonomy, metric, labels, [taxonomy.names[i] for i in answer_cols])
    distances = d_answers[targets, np.searchsorted(answer_cols, chosen.nodes)]
    answers = answer_metrics(targets, chosen.nodes, distances, taxonomy)
    truth_names = np.asarray(labels, dtype=object)[targets]
    answer_names = np.asarray(chosen.names, dtype=object)
    if decision != "argmax":
        m["argmax"] = {k: m[k] for k in ("mhd", "top1", "macro_f1", "distance_histogram")}
        m["argmax"]["answers"] = answer_metrics(targets, taxonomy.label_indices[argmax], D[targets, argmax],
                                                taxonomy)["answers"]
    for key in ("mhd", "top1", "macro_f1", "distance_histogram", "answers"):
        m[key] = answers[key]
    m["per_label"] = per_label_table(truth_names, answer_names)
    raw_distances = None
    if chosen.raw_nodes is not None:
        raw_distances = d_answers[targets, np.searchsorted(answer_cols, chosen.raw_nodes)]
        without = answer_metrics(targets, chosen.raw_nodes, raw_distances, taxonomy)
        shift = options.prior_shift
        m["priors"] = {"file": shift.source, "sha256": shift.digest, "strength": shift.strength,
                       "floor": shift.floor, "applied": int(chosen.prior_applied.sum()),
                       "conflicts": int(chosen.prior_conflict.sum()),
                       "changed": int((chosen.raw_nodes != chosen.nodes).sum()),
                       "unknown_taxa": list(shift.unknown_taxa),
                       "without": {k: without[k] for k in ("mhd", "top1", "macro_f1")}}
    if rank_logits:
        preds = [np.asarray(rank_logits[name]).argmax(1) for name, _, _ in level_matrices(taxonomy)
                 if name in rank_logits]
        if len(preds) == len(taxonomy.levels()):
            m["consistency"] = lineage_consistency(preds, taxonomy)

    per_level = level_predictions(probs, targets, taxonomy)
    curves = {"reliability": {
        "calibrated": reliability_bins(probs.max(1), argmax == targets),
        "uncalibrated": reliability_bins(raw.max(1), raw.argmax(1) == targets)}}
    curves["roc"] = _roc_per_level(probs, targets, taxonomy)
    notes = []
    n_nodes = len(taxonomy)
    if len(labels) * n_nodes <= MAX_COVERAGE_CELLS:
        d_all = distance_matrix(taxonomy, metric, labels, list(taxonomy.names))
        rows = np.arange(len(targets))
        if len(rows) > COVERAGE_SAMPLE:
            rows = np.sort(np.random.default_rng(0).choice(len(rows), COVERAGE_SAMPLE, replace=False))
        cr = coverage_risk_curve(probs[rows], targets[rows], taxonomy, d_all, COVERAGE_THRESHOLDS)
        curves["coverage_risk"] = {k: np.round(v, 6).tolist() for k, v in cr.items()}
        curves["coverage_risk"]["n"] = int(len(rows))
    else:
        notes.append(f"coverage–risk curve skipped: {len(labels)} labels × {n_nodes} nodes is too large a "
                     "distance matrix")
    if ood_scores:
        m["ood"], curves["ood_roc"] = _ood(ood_scores, ood_thresholds or {})
    m["curves"] = curves
    m["notes"] = notes

    columns = {"label": truth_names, "prediction": answer_names, "confidence": chosen.confidence.round(6),
               "distance": distances}
    if raw_distances is not None:
        columns["raw_prediction"] = np.asarray(chosen.raw_names, dtype=object)
        columns["raw_distance"] = raw_distances
        columns["prior_applied"] = chosen.prior_applied
    if decision != "argmax":
        columns["argmax"] = np.asarray(labels, dtype=object)[argmax]
        columns["argmax_confidence"] = probs[np.arange(len(argmax)), argmax].round(6)
        columns["argmax_distance"] = D[targets, argmax]
    for name, cols in per_level.items():
        columns[f"label_{name}"] = cols["label"]
        columns[f"prediction_{name}"] = cols["prediction"]
        columns[f"confidence_{name}"] = cols["confidence"].round(6)
    return OutputsEvaluation(m, columns)


def _roc_per_level(probs: np.ndarray, targets: np.ndarray, taxonomy: Taxonomy) -> dict:
    out = {}
    for level in taxonomy.levels():
        truth = level.label_to_node[targets]
        keep = truth >= 0
        if len(level.nodes) < 2 or not keep.any():
            continue
        sub_probs, sub_truth = probs[keep], truth[keep]
        blocks = ((lp, sub_truth[s:s + len(lp)])
                  for s, lp in level_probability_chunks(sub_probs, level.label_to_node, len(level.nodes)))
        roc = one_vs_rest_roc(blocks, len(level.nodes))
        fpr, tpr = downsample_curve(roc["fpr"], roc["tpr"])
        mfpr, mtpr = downsample_curve(roc["macro_fpr"], roc["macro_tpr"])
        out[level.name] = {"fpr": fpr, "tpr": tpr, "auc": finite_or_none(round(roc["auc"], 6)),
                           "macro_fpr": mfpr, "macro_tpr": mtpr,
                           "macro_auc": finite_or_none(round(roc["macro_auc"], 6)), "classes": roc["classes"]}
    return out


def _ood(scores: Mapping[str, tuple[np.ndarray, np.ndarray]], thresholds: Mapping[str, float]) -> tuple[dict, dict]:
    metrics, rocs = {}, {}
    for method, (known, unknown) in scores.items():
        known, unknown = np.asarray(known, dtype=np.float64), np.asarray(unknown, dtype=np.float64)
        entry = ood_metrics(known, unknown)
        if method in thresholds and thresholds[method] is not None:
            t, source = float(thresholds[method]), "checkpoint"
        else:
            # no calibrated threshold: the one that flags 95 % of these unknowns, said so in the report
            t, source = threshold_for_tpr(unknown, 0.95), "95 % recall on this split"
        entry.update(threshold_metrics(known, unknown, t))
        entry.update(threshold_source=source, n_known=int(len(known)), n_unknown=int(len(unknown)))
        metrics[method] = entry
        rocs[method] = roc_points(known, unknown)
    return metrics, rocs


__all__ = ["OutputsEvaluation", "evaluate_outputs", "COVERAGE_THRESHOLDS"]
