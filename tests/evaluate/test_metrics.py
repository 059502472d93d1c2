"""Evaluation arithmetic on hand-made arrays: curves, answer metrics, and `evaluate_outputs` for every rule."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from taxonomist.decide import DecisionOptions, ood_metrics
from taxonomist.evaluate.answers import answer_metrics, level_predictions, per_label_table
from taxonomist.evaluate.curves import one_vs_rest_roc, reliability_bins, roc_points
from taxonomist.evaluate.metrics import classification_metrics
from taxonomist.evaluate.outputs import evaluate_outputs
from taxonomist.taxonomy import Taxonomy, distance_matrix

DESIGN_KEYS = ("mhd", "top1", "log_loss", "macro_f1", "hierarchical_accuracy", "per_rank", "ece",
               "ece_uncalibrated", "n")


@pytest.fixture
def tree() -> Taxonomy:
    """R → {A → {a1, a2}, B → {b1, b2}}; lca distance 2 between siblings, 4 across genera."""
    return Taxonomy.from_parents({"R": None, "A": "R", "B": "R", "a1": "A", "a2": "A", "b1": "B", "b2": "B"})


def test_reliability_bins_by_hand():
    r = reliability_bins(np.array([0.05, 0.95, 0.95, 0.55]), np.array([0, 1, 0, 1]), bins=2)
    assert r["count"] == [1, 3]
    assert r["confidence"] == [0.05, pytest.approx((0.95 + 0.95 + 0.55) / 3)]
    assert r["accuracy"] == [0.0, pytest.approx(2 / 3)]
    empty = reliability_bins(np.array([0.9]), np.array([1]), bins=4)
    assert empty["accuracy"][:3] == [None, None, None]  # JSON null, not NaN


def test_binned_roc_matches_sklearn():
    rng = np.random.default_rng(0)
    n, c = 600, 5
    truth = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c)) + 2.0 * np.eye(c)[truth]
    scores = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    # the chunks add up to the whole
    roc = one_vs_rest_roc([(scores[:250], truth[:250]), (scores[250:], truth[250:])], c)
    onehot = np.eye(c)[truth]
    assert roc["auc"] == pytest.approx(roc_auc_score(onehot.ravel(), scores.ravel()), abs=2e-3)
    assert roc["macro_auc"] == pytest.approx(roc_auc_score(truth, scores, multi_class="ovr"), abs=2e-3)
    assert roc["classes"] == c
    assert roc["fpr"][0] == 0 and roc["tpr"][-1] == 1 and np.all(np.diff(roc["fpr"]) >= 0)
    perfect = one_vs_rest_roc([(onehot * 0.9 + 0.02, truth)], c)
    assert perfect["auc"] == pytest.approx(1.0) and perfect["macro_auc"] == pytest.approx(1.0)


def test_roc_points_of_ood_scores():
    known, unknown = np.array([0.1, 0.2, 0.3, 0.4]), np.array([0.35, 0.5, 0.6])
    r = roc_points(known, unknown)
    auc = np.sum(np.diff(r["fpr"]) * (np.array(r["tpr"][1:]) + np.array(r["tpr"][:-1])) / 2)
    assert auc == pytest.approx(ood_metrics(known, unknown)["auroc"])


def test_per_label_table_includes_internal_answers():
    table = per_label_table(["a1", "a1", "a2", "b1"], ["a1", "A", "a2", "a1"])
    assert table["a1"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert table["A"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert table["b1"]["recall"] == 0.0 and table["b1"]["support"] == 1


def test_answer_metrics_for_internal_nodes(tree):
    targets = np.array([0, 1, 2, 3])                      # a1 a2 b1 b2
    answers = tree.indices(["a1", "A", "R", "a1"])         # exact, right genus, root, wrong genus
    dist = distance_matrix(tree, "lca", tree.labels, tree.names)[targets, answers]
    m = answer_metrics(targets, answers, dist, tree)
    assert dist.tolist() == [0.0, 1.0, 2.0, 4.0]
    assert m["mhd"] == 1.75 and m["top1"] == 0.25
    assert m["answers"]["on_lineage"] == 0.75             # a1, A and R lie on the true lineages
    assert m["answers"]["label_share"] == 0.5
    assert m["answers"]["by_level"] == {"depth1": 0.25, "depth2": 0.5, "(other)": 0.25}  # the root has no level
    assert m["answers"]["coverage"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert m["distance_histogram"] == {"0": 1, "1": 1, "2": 1, "4": 1}


@pytest.fixture
def outputs(tree):
    """Six examples over a1 a2 b1 b2: sure, torn between siblings, and one confident mistake across genera."""
    probs = np.array([[0.9, 0.05, 0.03, 0.02],
                      [0.45, 0.45, 0.05, 0.05],
                      [0.05, 0.05, 0.85, 0.05],
                      [0.02, 0.02, 0.46, 0.50],
                      [0.8, 0.1, 0.05, 0.05],
                      [0.1, 0.5, 0.3, 0.1]])
    targets = np.array([0, 1, 2, 3, 3, 1])
    return np.log(probs), targets


@pytest.mark.parametrize("rule", ["argmax", "min-risk", "backoff", "selective"])
def test_evaluate_outputs_writes_the_design_keys_for_every_rule(tree, outputs, rule):
    logits, targets = outputs
    options = DecisionOptions(rule, candidates=list(tree.names) if rule == "min-risk" else None)
    res = evaluate_outputs(logits, targets, tree, "lca", options=options)
    m = res.metrics
    for key in DESIGN_KEYS:
        assert key in m, key
    for level in ("depth1", "depth2"):
        assert set(m["per_rank"][level]) >= {"top1", "top5", "macro_f1", "avg_confidence"}
    assert m["n"] == 6 and m["decision"] == rule
    # the answers' distances are the ones in predictions.csv, and their mean is the MHD
    assert np.mean(res.columns["distance"]) == pytest.approx(m["mhd"])
    assert sum(m["distance_histogram"].values()) == 6
    # per-rank columns agree with per_rank in metrics.json
    for level, v in m["per_rank"].items():
        right = res.columns[f"prediction_{level}"] == res.columns[f"label_{level}"]
        assert right.mean() == pytest.approx(v["top1"])
    assert set(m["curves"]) >= {"reliability", "roc", "coverage_risk"}
    assert ("argmax" in m) == (rule != "argmax")
    assert "ood" not in m


def test_min_risk_answers_the_genus_when_siblings_tie(tree, outputs):
    logits, targets = outputs
    argmax = evaluate_outputs(logits, targets, tree, "lca").metrics
    res = evaluate_outputs(logits, targets, tree, "lca", options=DecisionOptions("min-risk", candidates=tree.names))
    m = res.metrics
    assert res.columns["prediction"][1] == "A"            # 0.45/0.45 between a1 and a2: the genus is safer
    assert res.columns["distance"][1] == 1.0
    assert m["argmax"]["mhd"] == pytest.approx(argmax["mhd"])
    assert m["argmax"]["top1"] == pytest.approx(argmax["top1"])
    # model-level figures do not depend on the decision
    for key in ("log_loss", "ece", "hierarchical_accuracy", "per_rank"):
        assert m[key] == argmax[key]
    expected = distance_matrix(tree, "lca", tree.labels, tree.names)
    answers = tree.indices(list(res.columns["prediction"]))
    assert m["mhd"] == pytest.approx(expected[targets, answers].mean())
    assert m["per_label"]["A"]["support"] == 0


def test_temperature_changes_calibration_not_answers(tree, outputs):
    logits, targets = outputs
    cold = evaluate_outputs(logits, targets, tree, "lca").metrics
    hot = evaluate_outputs(logits, targets, tree, "lca", temperature=2.0).metrics
    assert hot["top1"] == cold["top1"] and hot["mhd"] == cold["mhd"]
    assert hot["ece_uncalibrated"] == pytest.approx(cold["ece"])  # before temperature = the raw softmax
    assert hot["ece"] != pytest.approx(cold["ece"])
    assert hot["temperature"] == 2.0
    reference = classification_metrics(np.exp(logits / 2) / np.exp(logits / 2).sum(1, keepdims=True), targets,
                                       tree, distance_matrix(tree, "lca", tree.labels, tree.labels))
    assert hot["log_loss"] == pytest.approx(reference["log_loss"])


def test_ood_keys_and_threshold_source(tree, outputs):
    logits, targets = outputs
    known, unknown = np.array([0.1, 0.2, 0.3, 0.4, 0.15, 0.25]), np.array([0.35, 0.5, 0.6])
    m = evaluate_outputs(logits, targets, tree, "lca", ood_scores={"energy": (known, unknown), "knn": (known, unknown)},
                         ood_thresholds={"energy": 0.3}).metrics
    e = m["ood"]["energy"]
    assert set(e) >= {"auroc", "fpr95", "threshold", "precision", "recall", "f1", "known_flagged", "unknown_missed"}
    assert e["auroc"] == pytest.approx(ood_metrics(known, unknown)["auroc"])
    assert e["threshold"] == 0.3 and e["threshold_source"] == "checkpoint"
    assert e["known_flagged"] == pytest.approx(2 / 6) and e["recall"] == 1.0
    assert m["ood"]["knn"]["threshold_source"].startswith("95 %")
    assert set(m["curves"]["ood_roc"]) == {"energy", "knn"}


def test_level_predictions_on_a_ranked_tree():
    tax = Taxonomy.from_parents({"Animalia": None, "Chordata": "Animalia", "Sebastes": "Chordata",
                                 "S. alpha": "Sebastes", "S. beta": "Sebastes", "Tunicata": "Chordata"},
                                labels=["S. alpha", "S. beta", "Tunicata"],
                                ranks={"Animalia": "kingdom", "Chordata": "phylum", "Sebastes": "genus",
                                       "S. alpha": "species", "S. beta": "species"})
    probs = np.array([[0.3, 0.3, 0.4], [0.1, 0.2, 0.7]])
    cols = level_predictions(probs, np.array([0, 2]), tax)
    assert list(cols["genus"]["prediction"]) == ["Sebastes", "Sebastes"]
    assert cols["genus"]["confidence"].tolist() == pytest.approx([0.6, 0.3])
    assert list(cols["genus"]["label"]) == ["Sebastes", ""]  # Tunicata has no genus
    assert list(cols["species"]["prediction"]) == ["S. alpha", "S. beta"]
