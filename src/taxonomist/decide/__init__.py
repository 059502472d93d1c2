"""Decisions: from a model's logits/probabilities to answers — calibration, rules, ensembles, TTA views, OOD.

Works on numpy arrays only (no torch), so it serves any model's outputs. `answer(probs, taxonomy,
DecisionOptions(…), ood_scores)` is the one decision path of predict, serve and evaluate.

>>> import numpy as np
>>> from taxonomist.taxonomy import Taxonomy, lca_distance
>>> tax = Taxonomy.from_parents({"R": None, "A": "R", "B": "R", "a1": "A", "a2": "A", "b1": "B", "b2": "B"})
>>> probs = np.array([[0.4, 0.4, 0.1, 0.1]])
>>> choice, risk = min_risk_decision(probs, lca_distance(tax, tax.labels, tax.names))
>>> tax.names[int(choice[0])], round(float(risk[0]), 6)   # the genus beats either 0.4 species
('A', 1.4)
"""
from taxonomist.decide._arrays import log_softmax, softmax
from taxonomist.decide.calibration import (TEMPERATURE_OBJECTIVES, apply_temperature, check_temperature,
                                           expected_calibration_error, fit_temperature, fit_temperature_for)
from taxonomist.decide.candidates import CANDIDATE_KEYWORDS, candidate_mask, candidate_nodes
from taxonomist.decide.ensemble import (COMBINE_MODES, VIEW_MODES, aggregate_views, combine_probs,
                                        fit_ensemble_weights)
from taxonomist.decide.disagreement import (STACK_SCORES, ensemble_disagreement, mutual_information,
                                            predictive_entropy, stack_score, variation_ratio)
from taxonomist.decide.fallback import ood_fallback, parse_fallback, resolve_fallback
from taxonomist.decide.ood import (AUTO_OOD_METHOD, DEFAULT_OOD_TPR, ENSEMBLE_OOD_METHOD, MODEL_OOD_METHODS,
                                   OOD_METHODS, OOD_SCORERS, PREDICT_OOD_METHODS, EnergyScorer, KNNScorer,
                                   MahalanobisScorer, MaxLogitScorer, MSPScorer, OODScorer, build_ood_scorer,
                                   check_tpr, load_ood_scorer, ood_metrics, resolve_ood_method, threshold_for_tpr,
                                   threshold_metrics)
from taxonomist.decide.heuristics import common_ancestor_decision, rollup_decision
from taxonomist.decide.rules import (DECISIONS, Decisions, argmax_decision, backoff_decision, coverage_risk_curve,
                                     decide, default_thresholds, expected_distance, hierarchical_coverage,
                                     min_risk_decision, node_thresholds, selective_decision, undominated_candidates)
from taxonomist.decide.scores import macro_f1
from taxonomist.decide.tree_sums import ancestor_operator, answer_probability, node_probabilities
from taxonomist.decide.answer import Answers, DecisionOptions, answer, answer_levels, answer_records, parse_thresholds
from taxonomist.decide.priors import ContextPriors, PriorShift

__all__ = [
    "softmax", "log_softmax",
    "DecisionOptions", "Answers", "answer", "answer_levels", "answer_records", "parse_thresholds", "ContextPriors",
    "PriorShift", "answer_probability", "macro_f1",
    "fit_temperature", "fit_temperature_for", "TEMPERATURE_OBJECTIVES", "apply_temperature", "check_temperature",
    "expected_calibration_error",
    "CANDIDATE_KEYWORDS", "candidate_nodes", "candidate_mask",
    "COMBINE_MODES", "VIEW_MODES", "combine_probs", "fit_ensemble_weights", "aggregate_views",
    "OOD_METHODS", "OOD_SCORERS", "AUTO_OOD_METHOD", "MODEL_OOD_METHODS", "ENSEMBLE_OOD_METHOD", "PREDICT_OOD_METHODS",
    "DEFAULT_OOD_TPR", "check_tpr", "resolve_ood_method", "OODScorer", "MSPScorer", "MaxLogitScorer", "EnergyScorer",
    "MahalanobisScorer", "KNNScorer", "build_ood_scorer", "load_ood_scorer", "ood_metrics", "threshold_for_tpr",
    "threshold_metrics",
    "ood_fallback", "parse_fallback", "resolve_fallback",
    "STACK_SCORES", "predictive_entropy", "mutual_information", "variation_ratio", "stack_score",
    "ensemble_disagreement",
    "DECISIONS", "Decisions", "decide", "argmax_decision", "min_risk_decision", "expected_distance",
    "backoff_decision", "selective_decision", "rollup_decision", "common_ancestor_decision", "coverage_risk_curve",
    "hierarchical_coverage", "node_probabilities", "node_thresholds", "default_thresholds", "ancestor_operator",
    "undominated_candidates",
]
