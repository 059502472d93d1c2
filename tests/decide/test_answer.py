"""`DecisionOptions` (checked once, each message naming its flag) and `decide.answer` (the one decision path of
predict, serve and evaluate) on hand-made probabilities."""
from __future__ import annotations

import math

import numpy as np
import pytest

from taxonomist.config import DecideConfig
from taxonomist.decide import (DecisionOptions, answer, answer_probability, decide, node_probabilities,
                               parse_fallback, parse_thresholds, resolve_fallback)
from taxonomist.errors import ConfigError, DataError
from taxonomist.taxonomy import Taxonomy, distance_matrix

# Fish ─ Gadidae ─ {Cod, Haddock}; Fish ─ Hake; Crab (a second root)
TREE = Taxonomy.from_parents({"Fish": None, "Gadidae": "Fish", "Cod": "Gadidae", "Haddock": "Gadidae",
                              "Hake": "Fish", "Crab": None})
RANKED = Taxonomy.from_parents({"Animalia": None, "Chordata": "Animalia", "Gadus": "Chordata", "Gadus morhua": "Gadus",
                                "Gadus chalcogrammus": "Gadus"},
                               ranks={"Animalia": "kingdom", "Chordata": "phylum", "Gadus": "genus",
                                      "Gadus morhua": "species", "Gadus chalcogrammus": "species"})
# labels: Cod, Haddock, Hake, Crab
PROBS = np.array([[0.40, 0.40, 0.15, 0.05],
                  [0.90, 0.05, 0.03, 0.02],
                  [0.10, 0.10, 0.10, 0.70]])


@pytest.mark.parametrize("options, message", [
    (dict(decision="min_risk"), r"^--decision: unknown decision 'min_risk' \(did you mean 'min-risk'"),
    (dict(top_k=3), r"^--top-k applies to --decision rollup and common-ancestor only$"),
    (dict(decision="rollup", top_k=0), r"^--top-k must be a whole number of at least 1, got 0$"),
    (dict(selective_threshold=0.5), r"^--selective-threshold applies to --decision selective only$"),
    (dict(decision="selective", selective_threshold=1.5), r"thresholds\['all'\] must lie in \[0, 1\], got 1.5"),
    (dict(decision="selective", thresholds="species=0.5"), r"^--thresholds RANK=P applies to backoff; the selective "),
    (dict(decision="rollup", thresholds="genus=0.5"), r"^--thresholds RANK=P applies to backoff; rollup takes one"),
    (dict(decision="backoff", thresholds="species=high"), r"^--thresholds 'species=high': species='high' is not a"),
    (dict(decision="backoff", thresholds="species=1.2"), r"thresholds\['species'\] must lie in \[0, 1\], got 1.2"),
    (dict(metric="cosine"), r"^metric 'cosine': choose one of auto, fathomnet2025, lca"),
    (dict(ood="enrgy"), r"^--ood: unknown OOD method 'enrgy' \(did you mean 'energy'"),
    (dict(ood="energy", ood_threshold=1.0, ood_tpr=0.9), r"^--ood-threshold, --ood-tpr: give either"),
    (dict(ood_tpr=0.9), r"needs an OOD method \(--ood METHOD\)$"),
    (dict(ood="energy", ood_tpr=95), r"^--ood-tpr: the OOD TPR must lie in \(0, 1\], got 95$"),
    (dict(ood="energy", ood_threshold=math.inf), r"^--ood-threshold must be a finite number"),
    (dict(ood="ensemble"), r"^--ood ensemble needs --ood-threshold T"),
    (dict(ood="energy", ood_fallback="ordr"), r"^--ood-fallback 'ordr': give a rank .*did you mean 'order'"),
    (dict(ood="energy", ood_fallback="1.5"), r"^--ood-fallback '1.5': a probability must lie in \[0, 1\]"),
    (dict(tta_mode="median"), r"^--tta-mode 'median': TTA mode must be one of mean_probs, mean_logits"),
])
def test_every_wrong_option_is_one_line_naming_its_flag(options, message):
    with pytest.raises(ConfigError, match=message) as info:
        DecisionOptions(**options)
    assert "\n" not in str(info.value)


def test_options_are_normalised_once():
    o = DecisionOptions("backoff", candidates=["Cod", "Gadidae"], thresholds="species=0.6,genus=0.7", ood="auto",
                        ood_tpr=0.9, ood_fallback="2", tta=True)
    assert o.candidates == ("Cod", "Gadidae") and o.thresholds == {"species": 0.6, "genus": 0.7}
    assert o.ood == "mahalanobis" and o.ood_fallback == 2 and o.tta == "default" and o.needs_torch is None
    assert DecisionOptions(ood="odin", ood_threshold=0.1).needs_torch == "--ood odin"
    assert DecisionOptions("selective", thresholds=0.6).rule_thresholds == 0.6
    assert DecisionOptions("selective", thresholds=0.6, selective_threshold=0.8).rule_thresholds == 0.8
    assert DecisionOptions("selective").rule_thresholds == 0.5
    with pytest.raises(Exception):  # frozen
        o.decision = "argmax"
    assert o.replace(decision="min-risk").thresholds == o.thresholds
    with pytest.raises(ConfigError, match="--top-k"):
        o.replace(top_k=3)  # checked again


def test_parse_thresholds_and_fallback():
    assert parse_thresholds("species=0.6, genus=0.65") == {"species": 0.6, "genus": 0.65}
    assert parse_thresholds(" 0.7 ") == 0.7 and parse_thresholds("") is None and parse_thresholds(0.3) == 0.3
    with pytest.raises(ConfigError, match="is not RANK=P"):
        parse_thresholds("species=0.6,genus")
    assert [parse_fallback(v) for v in ("family", "depth2", "3", "0.8", None, "auto", 2, 0.5)] == \
        ["family", "depth2", 3, 0.8, "auto", "auto", 2, 0.5]
    assert resolve_fallback("auto", RANKED) == "order" and resolve_fallback("auto", TREE) == 1
    with pytest.raises(ConfigError, match="--ood-fallback 'order' is a rank but the taxonomy has no ranks"):
        resolve_fallback("order", TREE)


def test_from_config_takes_the_given_values_over_the_run_config():
    cfg = DecideConfig(decision="min-risk", candidates="all")
    assert DecisionOptions.from_config(cfg, ranked=True).decision == "min-risk"
    o = DecisionOptions.from_config(cfg, ranked=True, decision="backoff", candidates=None)
    assert o.decision == "backoff" and o.candidates == "all" and o.thresholds == dict(DecideConfig().thresholds)
    assert DecisionOptions.from_config(cfg, ranked=False, decision="backoff").thresholds is None  # per-depth defaults
    assert DecisionOptions.from_config(DecideConfig(), ranked=True, candidates="").candidates is None


def test_resolve_makes_the_options_concrete_for_a_taxonomy():
    o = DecisionOptions("min-risk", candidates="all", ood="energy").resolve(TREE)
    assert o.candidates == tuple(TREE.names) and o.metric == "lca" and o.ood_fallback == 1
    assert o.resolve(TREE) is o                                      # resolving again is free
    assert DecisionOptions().resolve(RANKED).metric == "fathomnet2025"
    assert DecisionOptions().resolve(RANKED, model_metric="lca").metric == "lca"   # the model's own distance
    assert DecisionOptions(metric="lca").resolve(RANKED, model_metric="fathomnet2025").metric == "lca"
    assert DecisionOptions(ood_fallback="order").resolve(TREE).ood_fallback == "order"  # no --ood: not used
    with pytest.raises(ConfigError, match="thresholds are given per rank but the taxonomy has no ranks"):
        DecisionOptions("backoff", thresholds="species=0.6").resolve(TREE)
    with pytest.raises(Exception, match="Cood"):
        DecisionOptions(candidates=["Cood"]).resolve(TREE)


@pytest.mark.parametrize("rule", ["argmax", "min-risk", "backoff", "selective", "rollup", "common-ancestor"])
def test_answer_is_the_rule_with_its_probability_lineage_and_expected_distance(rule):
    options = DecisionOptions(rule) if rule == "argmax" else DecisionOptions(rule, candidates="all")
    a = answer(PROBS, TREE, options)
    expected = decide(PROBS, TREE, rule, candidates=None if rule == "argmax" else list(TREE.names), metric="lca")
    assert a.nodes.tolist() == expected.nodes.tolist() == a.decided.tolist() and a.names == expected.names
    node_p = node_probabilities(PROBS, TREE)
    assert a.confidence.tolist() == pytest.approx(node_p[np.arange(3), a.nodes].tolist(), abs=1e-12)
    for level, names in a.levels.items():
        for i, name in enumerate(names):
            p = a.level_probabilities[level][i]
            assert (name == "" and np.isnan(p)) or p == pytest.approx(node_p[i, TREE.index(name)], abs=1e-12)
    assert a.ood_score is None and a.unknown is None and len(a) == 3


def test_answer_values_on_a_hand_made_case():
    a = answer(PROBS, TREE, DecisionOptions("min-risk", candidates="all"))
    assert a.names == ["Gadidae", "Cod", "Crab"]                      # row 0: the family beats either 0.4 species
    assert a.levels == {"depth0": ["Fish", "Fish", "Crab"], "depth1": ["Gadidae", "Gadidae", ""],
                        "depth2": ["", "Cod", ""]}
    assert a.confidence.round(6).tolist() == [0.8, 0.9, 0.7]
    d = distance_matrix(TREE, "lca", TREE.labels, ["Gadidae"])[:, 0]  # expected distance: Σ p · D(label, Gadidae)
    assert a.expected_distance[0] == pytest.approx(float(PROBS[0] @ d))


def test_unknowns_fall_back_unless_the_rule_is_argmax():
    scores = np.array([0.2, 0.9, 0.95])
    flagged = answer(PROBS, TREE, DecisionOptions("min-risk", candidates="all", ood="energy", ood_threshold=0.5),
                     scores)
    assert flagged.unknown.tolist() == [False, True, True] and flagged.ood_score.tolist() == scores.tolist()
    assert flagged.decided.tolist() == TREE.indices(["Gadidae", "Cod", "Crab"]).tolist()
    assert flagged.names == ["Gadidae", "Gadidae", "Crab"]            # auto fallback: the ancestor at depth 1
    assert flagged.confidence[1] == pytest.approx(0.95)
    argmax = answer(PROBS, TREE, DecisionOptions(ood="energy"), scores, ood_threshold=0.5)
    assert argmax.unknown.tolist() == [False, True, True] and argmax.names == ["Cod", "Cod", "Crab"]
    depth2 = answer(PROBS, TREE, DecisionOptions("backoff", candidates="all", ood="energy", ood_threshold=0.5,
                                                 ood_fallback="depth0"), scores)
    assert depth2.names[1] == "Fish"
    with pytest.raises(ConfigError, match="OOD scores need a threshold"):
        answer(PROBS, TREE, DecisionOptions(ood="energy"), scores)
    with pytest.raises(DataError, match="one score per row"):
        answer(PROBS, TREE, DecisionOptions(ood="energy", ood_threshold=0.5), scores[:2])


def test_answer_probability_is_the_one_p_of_an_answer():
    nodes = TREE.indices(["Fish", "Gadidae", "Crab"])
    assert answer_probability(PROBS, TREE, nodes).round(6).tolist() == [0.95, 0.95, 0.7]
    assert decide(PROBS, TREE, "argmax").confidence.tolist() == \
        answer_probability(PROBS, TREE, decide(PROBS, TREE, "argmax").nodes).tolist()
