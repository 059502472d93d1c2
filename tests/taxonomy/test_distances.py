"""Distances: the FathomNet 2025 rule against an independent per-pair scorer, and LCA on hand-made trees."""
from __future__ import annotations

import csv

import numpy as np
import pytest

from taxonomist.errors import TaxonomyError, UnknownLabelError
from taxonomist.taxonomy import (FATHOMNET_MAX_DISTANCE, Taxonomy, builtin_taxonomy, default_metric, distance_matrix,
                                 fathomnet2025_distance, lca_distance, read_taxonomy)

RANK_NAMES = ["kingdom", "phylum", "class", "order", "family", "genus", "species"]
EXCEPTION_TAXA = {"Caridea", "Acanthascinae", "Actinopterygii", "Zoantharia", "Tunicata"}


def official_distance(lineages: dict[str, list[str | None]], truth: str, pred: str) -> int:
    """The rule exactly as the FathomNet 2025 README states it, one pair at a time."""
    if pred not in lineages:
        return 12
    total = 0
    for t, p in zip(lineages[truth], lineages[pred]):
        if t is None and p is None:
            total += 0
        elif p is None and t is not None:
            total += 1
        elif p is not None and t is None:
            total += 1
        elif t != p:
            total += 2
    if pred != truth:
        total += 1 if pred in EXCEPTION_TAXA else 0
        total += 1 if truth in EXCEPTION_TAXA else 0
    return total


@pytest.fixture(scope="module")
def official(request) -> dict[str, list[str | None]]:
    path = request.config.rootpath / "tests" / "fixtures" / "fathomnet2025_taxonomy.csv"
    with open(path, encoding="utf-8", newline="") as f:
        return {row["concept_name"]: [row[r] or None for r in RANK_NAMES] for row in csv.DictReader(f)}


def test_fathomnet2025_agrees_with_the_official_rule_on_all_pairs(official, fixtures_dir):
    names = list(official)
    expected = np.array([[official_distance(official, t, p) for p in names] for t in names], dtype=float)
    for tax in (builtin_taxonomy("fathomnet2025"), read_taxonomy(fixtures_dir / "fathomnet2025_taxonomy.csv")):
        assert list(tax.labels) == names
        D = distance_matrix(tax, "fathomnet2025")
        assert D.shape == (79, 79)
        np.testing.assert_array_equal(D, expected)
    assert expected.max() == 12 and np.count_nonzero(expected == 12) > 0


@pytest.mark.parametrize("truth, pred, distance", [
    ("Sebastolobus", "Sebastolobus", 0),
    ("Sebastolobus", "Sebastes", 2),
    ("Funiculina", "Umbellula", 4),
    ("Ophiuroidea", "Funiculina", 7),
    ("Actinopterygii", "Sebastolobus", 5),
    ("Tunicata", "Ophiuroidea", 4),
])
def test_readme_worked_examples(official, truth, pred, distance):
    tax = builtin_taxonomy()
    assert fathomnet2025_distance(tax, [truth], [pred])[0, 0] == distance
    assert fathomnet2025_distance(tax, [pred], [truth])[0, 0] == distance  # symmetric
    assert official_distance(official, truth, pred) == distance


def test_fathomnet2025_matrix_properties():
    D = distance_matrix(builtin_taxonomy(), "fathomnet2025")
    np.testing.assert_array_equal(D, D.T)
    assert np.all(np.diag(D) == 0)
    assert D.max() == FATHOMNET_MAX_DISTANCE == 12
    off = D[~np.eye(79, dtype=bool)]
    assert off.min() >= 1  # distinct labels never tie
    assert D.dtype == np.float64


def test_fathomnet2025_on_a_hand_made_ranked_tree_and_internal_nodes(tmp_path):
    path = tmp_path / "taxonomy.csv"
    path.write_text("concept_name,kingdom,phylum,class,order,family,genus,species\n"
                    "Gadus morhua,Animalia,Chordata,Actinopteri,Gadiformes,Gadidae,Gadus,Gadus morhua\n"
                    "Gadus,Animalia,Chordata,Actinopteri,Gadiformes,Gadidae,Gadus,\n"
                    "Merluccius,Animalia,Chordata,Actinopteri,Gadiformes,Merlucciidae,Merluccius,\n"
                    "Tunicata,Animalia,Chordata,,,,,\n"
                    "Porifera,Animalia,Porifera,,,,,\n", encoding="utf-8")
    tax = read_taxonomy(path)
    D = fathomnet2025_distance(tax)
    # rows/cols: Gadus morhua, Gadus, Merluccius, Tunicata, Porifera
    assert D.tolist() == [
        [0, 1, 5, 5 + 1, 2 + 5],   # Tunicata: class…species one side 5, exception 1; Porifera: phylum 2 + 5
        [1, 0, 4, 4 + 1, 2 + 4],
        [5, 4, 0, 4 + 1, 2 + 4],
        [6, 5, 5, 0, 2 + 1],        # Tunicata vs Porifera: phylum 2 + exception 1
        [7, 6, 6, 3, 0],
    ]
    # any node, not only labels: Animalia (a kingdom) vs the phylum-level label Porifera
    assert fathomnet2025_distance(tax, ["Animalia", "Gadidae"], ["Porifera"]).tolist() == [[1.0], [2.0 + 3]]


# Animalia(kingdom) ─ Chordata(phylum) ─┬─ Actinopteri(class) ─ Gadiformes(order) ─ Gadidae(family) ─┬─ Gadus(genus) ─┬─ G. morhua
#                                       └─ Tunicata (no rank)                                          │                └─ G. chalcogrammus
#                                                                                                      └─ Melanogrammus ── M. aeglefinus
# Plantae(kingdom) ─ Kelp (no rank)
PARENTS = {"Animalia": None, "Chordata": "Animalia", "Actinopteri": "Chordata", "Gadiformes": "Actinopteri",
           "Gadidae": "Gadiformes", "Gadus": "Gadidae", "G. morhua": "Gadus", "G. chalcogrammus": "Gadus",
           "Melanogrammus": "Gadidae", "M. aeglefinus": "Melanogrammus", "Tunicata": "Chordata",
           "Plantae": None, "Kelp": "Plantae"}
RANK_OF = {"Animalia": "kingdom", "Chordata": "phylum", "Actinopteri": "class", "Gadiformes": "order",
           "Gadidae": "family", "Gadus": "genus", "G. morhua": "species", "G. chalcogrammus": "species",
           "Melanogrammus": "genus", "M. aeglefinus": "species", "Plantae": "kingdom"}


@pytest.fixture
def gadids() -> Taxonomy:
    return Taxonomy.from_parents(PARENTS, ranks=RANK_OF)


def test_lca_counts_edges_to_the_lowest_common_ancestor(gadids):
    names = ["G. morhua", "G. chalcogrammus", "M. aeglefinus", "Gadus", "Tunicata", "Kelp"]
    D = lca_distance(gadids, names, names)
    assert D.tolist() == [
        [0, 2, 4, 1, 6, 9],   # to Kelp: 7 edges up to the virtual root + 2 down
        [2, 0, 4, 1, 6, 9],
        [4, 4, 0, 3, 6, 9],
        [1, 1, 3, 0, 5, 8],
        [6, 6, 6, 5, 0, 5],
        [9, 9, 9, 8, 5, 0],
    ]
    assert lca_distance(gadids, ["Gadidae"], ["Gadidae", "Animalia", "Plantae"]).tolist() == [[0, 4, 6]]


def test_lca_rank_weights(gadids):
    weights = {"species": 0.5, "genus": 0.75}
    names = ["G. morhua", "G. chalcogrammus", "M. aeglefinus", "Gadus", "Kelp"]
    D = lca_distance(gadids, names, names, rank_weights=weights)
    assert D[0, 1] == 0.5 + 0.5                 # sibling species
    assert D[0, 2] == 2 * (0.5 + 0.75)          # cousins through Gadidae
    assert D[0, 3] == 0.5                       # species to its genus
    # morhua to the virtual root: 0.5 + 0.75 + 5 ranks at 1 = 6.25; Kelp: Plantae 1 + unranked Kelp 1
    assert D[0, 4] == 6.25 + 2
    # nodes without a rank, or whose rank has no weight, cost `default_weight`
    ranked = {"kingdom": 1, "phylum": 1, "class": 1}
    D2 = lca_distance(gadids, ["Tunicata"], ["Actinopteri", "Kelp"], rank_weights=ranked, default_weight=2.0)
    assert D2.tolist() == [[2 + 1, 2 + 1 + 1 + 1 + 2]]
    D3 = lca_distance(gadids, ["Tunicata"], ["Actinopteri", "Kelp"], default_weight=2.0)
    assert D3.tolist() == [[2 * 2, 2 * 5]]
    np.testing.assert_array_equal(D, D.T)


def test_lca_forest_from_a_flat_taxonomy_is_twice_the_error():
    flat = Taxonomy.flat(["a", "b", "c"])
    assert distance_matrix(flat, "lca").tolist() == [[0, 2, 2], [2, 0, 2], [2, 2, 0]]
    two_roots = Taxonomy.from_parents({"A": None, "B": None})
    assert lca_distance(two_roots).tolist() == [[0, 2], [2, 0]]


def test_lca_on_the_fathomnet_table():
    tax = builtin_taxonomy()
    D = lca_distance(tax)
    np.testing.assert_array_equal(D, D.T)
    assert np.all(np.diag(D) == 0)
    # Sebastolobus and Sebastes are sibling genera of Sebastidae
    assert lca_distance(tax, ["Sebastolobus"], ["Sebastes", "Sebastes diploproa"]).tolist() == [[2.0, 3.0]]


def test_metric_selection_and_errors(gadids):
    assert default_metric(builtin_taxonomy()) == "fathomnet2025"
    assert default_metric(Taxonomy.flat(["a", "b"])) == "lca"
    with pytest.raises(TaxonomyError, match="unknown metric 'hops'; choose one of fathomnet2025, lca"):
        distance_matrix(gadids, "hops")
    with pytest.raises(TaxonomyError, match="needs a taxonomy with Linnaean ranks"):
        distance_matrix(Taxonomy.flat(["a", "b"]), "fathomnet2025")
    with pytest.raises(TaxonomyError, match="takes no options"):
        distance_matrix(gadids, "fathomnet2025", rank_weights={"species": 1})
    with pytest.raises(TaxonomyError, match="unknown rank 'specis' in rank weights \\(did you mean 'species'\\?\\)"):
        lca_distance(gadids, rank_weights={"specis": 0.5})
    with pytest.raises(TaxonomyError, match="rank weight of 'genus' must be a finite number >= 0, got -1"):
        lca_distance(gadids, rank_weights={"genus": -1})
    with pytest.raises(UnknownLabelError, match="'Gadus morua' is not a node"):
        distance_matrix(gadids, "lca", ["Gadus morua"])
