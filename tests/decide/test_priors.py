"""Context priors (`decide.priors`): reading the table, what a weight means for the labels under a taxon, the
Bayesian shift, and the decision it feeds (`decide.answer`)."""
from __future__ import annotations

import numpy as np
import pytest

from taxonomist.decide import ContextPriors, DecisionOptions, answer, answer_records
from taxonomist.decide.priors import APPLIED, CONFLICT, NOT_APPLIED, context_keys
from taxonomist.errors import ConfigError, DataError
from taxonomist.taxonomy import Taxonomy

# Sebastes: three rockfish; Merluccius: one hake; and a sea star far away
TAX = Taxonomy.from_parents({
    "Animalia": None, "Actinopterygii": "Animalia", "Sebastes": "Actinopterygii", "S. a": "Sebastes",
    "S. b": "Sebastes", "S. c": "Sebastes", "Merluccius": "Actinopterygii", "M. p": "Merluccius",
    "Asteroidea": "Animalia", "Star": "Asteroidea"})
LABELS = ["S. a", "S. b", "S. c", "M. p", "Star"]
TAX = TAX.with_labels(LABELS)


def write(tmp_path, text: str):
    path = tmp_path / "priors.csv"
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------- reading
def test_read_groups_rows_by_context_and_ignores_other_columns(tmp_path):
    priors = ContextPriors.read(write(tmp_path, "context,taxon,weight,note\nsite=A,S. a,0,gone\n"
                                                "site=A,Star,3,\n\nsite=B,Sebastes,1,\n"))
    assert priors.keys == {"site=A": (("S. a", 0.0, 2), ("Star", 3.0, 3)), "site=B": (("Sebastes", 1.0, 5),)}
    assert len(priors.digest) == 64 and priors.source.endswith("priors.csv")


@pytest.mark.parametrize("text, message", [
    ("", "empty priors file"),
    ("context,taxon\nA,S. a\n", "no column 'weight'"),
    ("context,taxon,weight\nsite=A,S. a,lots\n", "row 2: weight 'lots' is not a number"),
    ("context,taxon,weight\nsite=A,S. a,-1\n", "row 2: weight '-1' must be a finite number ≥ 0"),
    ("context,taxon,weight\nsite=A,S. a,inf\n", "row 2: weight 'inf' must be a finite number ≥ 0"),
    ("context,taxon,weight\n,S. a,1\n", "row 2: empty context"),
    ("context,taxon,weight\nsite=A,,1\n", "row 2: empty taxon"),
    ("context,taxon,weight\nsite=A;depth=9,S. a,1\n", "row 2: context 'site=A;depth=9' holds ';'"),
    ("context,taxon,weight\nsite=A,S. a,1\nsite=A,S. a,0\n", "row 3: site=A / S. a is given twice (first in row 2)"),
    ("context,taxon,weight\n", "the priors file has no rows"),
])
def test_bad_tables_name_the_file_and_row(tmp_path, text, message):
    with pytest.raises(DataError, match="priors.csv") as e:
        ContextPriors.read(write(tmp_path, text))
    assert message in str(e.value)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(DataError, match="priors file not found"):
        ContextPriors.read(tmp_path / "nope.csv")
    with pytest.raises(DataError, match="is a folder"):
        ContextPriors.read(tmp_path)


def test_context_keys():
    assert context_keys("region=Monterey; depth=200-400") == ["region=Monterey", "depth=200-400"]
    assert context_keys("") == [] and context_keys(None) == [] and context_keys(float("nan")) == []


# ---------------------------------------------------------------------------------------------- weights
def ratios(rows, **kw):
    shift = ContextPriors.from_rows(rows).resolve(TAX, **kw)
    return np.exp(shift.log_ratios)


def test_a_taxon_weight_covers_its_labels_and_deeper_rows_override():
    # allow the genus, but block one of its species: the rest of the list gets the floor
    r = ratios([("s", "Sebastes", 1), ("s", "S. b", 0)], floor=0.1)[0]
    assert r.tolist() == pytest.approx([1, 0, 1, 0.1, 0.1])


def test_a_block_list_leaves_the_other_labels_alone():
    assert ratios([("s", "Merluccius", 0)])[0].tolist() == [1, 1, 1, 0, 1]


def test_counts_are_relative_frequencies_and_the_floor_is_a_share_of_their_mean():
    r = ratios([("s", "S. a", 30), ("s", "Star", 10)], floor=0.5)[0]
    assert r.tolist() == pytest.approx([30, 10, 10, 10, 10])  # unlisted: 0.5 × mean(30, 10)


def test_the_training_prior_is_divided_out():
    r = ratios([("s", "S. a", 1), ("s", "S. b", 1)], floor=0.0, train_prior=[8, 2, 0, 0, 0])[0]
    assert r[0] / r[1] == pytest.approx(0.25) and r[2:].tolist() == [0, 0, 0]


def test_strength_scales_the_log_ratio():
    half = ratios([("s", "S. a", 4), ("s", "S. b", 1)], floor=1.0, strength=0.5)[0]
    assert half[0] / half[1] == pytest.approx(2.0)
    assert np.all(ratios([("s", "S. a", 0)], strength=0.0)[0] == 1)  # λ = 0: off, blocks too


def test_unknown_taxa_are_listed_and_a_key_blocking_everything_is_refused():
    shift = ContextPriors.from_rows([("s", "Nemo", 1), ("s", "S. a", 1)]).resolve(TAX)
    assert shift.unknown_taxa == ("Nemo",)
    with pytest.raises(DataError, match="context 'x' blocks every label"):
        ContextPriors.from_rows([("x", "Animalia", 0)]).resolve(TAX)


@pytest.mark.parametrize("kw, flag", [({"prior_strength": -1}, "--prior-strength"),
                                      ({"prior_floor": 1.5}, "--prior-floor"),
                                      ({"prior_floor": float("nan")}, "--prior-floor")])
def test_option_ranges(kw, flag):
    with pytest.raises(ConfigError, match=flag):
        DecisionOptions(priors=ContextPriors.from_rows([("s", "S. a", 1)]), **kw)


def test_strength_without_priors_is_refused():
    with pytest.raises(ConfigError, match="give --priors"):
        DecisionOptions(prior_strength=0.5)


# ---------------------------------------------------------------------------------------------- the shift
def test_bayes_rule_per_row_and_keys_multiply():
    priors = ContextPriors.from_rows([("site=A", "S. a", 3), ("site=A", "S. b", 1), ("depth=deep", "Sebastes", 0)])
    shift = priors.resolve(TAX, floor=1.0)
    p = np.full((4, 5), 0.2)
    out, status = shift.apply(p, ["site=A", "", "site=B", "site=A;depth=deep;site=Z"])
    w = np.array([3, 1, 2, 2, 2], dtype=float)          # unlisted: 1.0 × mean(3, 1)
    assert out[0] == pytest.approx(w / w.sum())
    assert out[1].tolist() == out[2].tolist() == [0.2] * 5                     # no key / a key not in the file
    w2 = w * np.array([0, 0, 0, 1, 1])
    assert out[3] == pytest.approx(w2 / w2.sum())
    assert status.tolist() == [APPLIED, NOT_APPLIED, NOT_APPLIED, APPLIED]


def test_keys_that_exclude_each_other_leave_the_row_unchanged():
    shift = ContextPriors.from_rows([("a", "Sebastes", 0), ("b", "Merluccius", 0), ("b", "Star", 0),
                                     ]).resolve(TAX)
    out, status = shift.apply(np.array([[0.1, 0.2, 0.3, 0.2, 0.2]]), ["a;b"])
    assert status.tolist() == [CONFLICT] and out[0].tolist() == [0.1, 0.2, 0.3, 0.2, 0.2]


def test_a_blocked_species_moves_up_to_its_genus_under_min_risk():
    """The model is sure of the genus but leans to S. a, which is not at this site: argmax jumps to a sibling,
    the prior shift with min-risk over every node answers the genus, as it should."""
    probs = np.array([[0.6, 0.19, 0.19, 0.01, 0.01]])
    priors = ContextPriors.from_rows([("site=A", "S. a", 0)])
    arg = answer(probs, TAX, DecisionOptions("argmax", priors=priors), contexts=["site=A"])
    assert arg.names == ["S. b"] and arg.raw_names == ["S. a"]
    mr = answer(probs, TAX, DecisionOptions("min-risk", candidates="all", metric="lca", priors=priors),
                contexts=["site=A"])
    assert mr.names == ["Sebastes"] and mr.raw_names == ["S. a"]
    assert mr.prior_applied.tolist() == [True] and mr.prior_conflict.tolist() == [False]
    assert mr.raw_probs[0].tolist() == probs[0].tolist() and mr.probs[0, 0] == 0


def test_answers_without_priors_keep_no_raw_fields_and_records_say_why():
    probs = np.array([[0.6, 0.19, 0.19, 0.01, 0.01], [0.1, 0.1, 0.1, 0.6, 0.1]])
    plain = answer(probs, TAX, DecisionOptions("argmax"))
    assert plain.raw_nodes is None and plain.prior_applied is None
    opts = DecisionOptions("argmax", priors=ContextPriors.from_rows([("site=A", "S. a", 0)]))
    a = answer(probs, TAX, opts, contexts=["site=A", None])
    records = answer_records(a, TAX, opts, top_k=2, contexts=["site=A", None])
    assert records[0]["priors"] == {"context": "site=A", "applied": True, "conflict": False}
    assert records[0]["raw"]["decision"] == "S. a" and records[0]["decision"] == "S. b"
    assert records[1]["priors"]["applied"] is False and records[1]["raw"]["decision"] == records[1]["decision"]
    assert records[0]["rule"] == {"decision": "argmax", "metric": "lca", "ood_fallback": False}
    assert "priors" not in answer_records(plain, TAX, DecisionOptions("argmax"))[0]


def test_resolve_keeps_the_label_prior_for_later_calls():
    opts = DecisionOptions("argmax", priors=ContextPriors.from_rows([("s", "S. a", 1), ("s", "S. b", 1)]),
                           prior_floor=0.0).resolve(TAX, label_prior=[9, 1, 1, 1, 1])
    a = answer(np.array([[0.5, 0.5, 0, 0, 0]]), TAX, opts, contexts=["s"])
    assert a.probs[0, :2] == pytest.approx([0.1, 0.9])   # S. a was 9× as frequent in training: divided out
