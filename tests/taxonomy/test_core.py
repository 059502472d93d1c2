"""Taxonomy: lineages, ancestors, descendants, ranks, levels and the ancestor matrix on hand-made trees."""
from __future__ import annotations

import csv

import numpy as np
import pytest

from taxonomist.errors import TaxonomyError, UnknownLabelError
from taxonomist.taxonomy import RANKS, Taxonomy, builtin_taxonomy, suggest

# Animalia ─┬─ Chordata ─┬─ Fish ─┬─ Cod          Plantae ── Kelp
#           │            │        └─ Hake
#           │            └─ Bird
#           └─ Mollusca ── Squid
FOREST = {"Animalia": None, "Chordata": "Animalia", "Fish": "Chordata", "Cod": "Fish", "Hake": "Fish",
          "Bird": "Chordata", "Mollusca": "Animalia", "Squid": "Mollusca", "Plantae": None, "Kelp": "Plantae"}


@pytest.fixture
def forest() -> Taxonomy:
    return Taxonomy.from_parents(FOREST)


@pytest.fixture
def ranked() -> Taxonomy:
    """Labels at several ranks: a species, its genus, an unranked subphylum (Tunicata), a phylum."""
    rows = {
        "Gadus morhua": ("Animalia", "Chordata", "Actinopteri", "Gadiformes", "Gadidae", "Gadus", "Gadus morhua"),
        "Gadus": ("Animalia", "Chordata", "Actinopteri", "Gadiformes", "Gadidae", "Gadus", ""),
        "Merluccius": ("Animalia", "Chordata", "Actinopteri", "Gadiformes", "Merlucciidae", "Merluccius", ""),
        "Tunicata": ("Animalia", "Chordata", "", "", "", "", ""),
        "Porifera": ("Animalia", "Porifera", "", "", "", "", ""),
    }
    parent_of, rank_of = {}, {}
    for label, cells in rows.items():
        parent = None
        for rank, cell in zip(RANKS, cells):
            if cell:
                parent_of[cell], rank_of[cell], parent = parent, rank, cell
        if label not in rank_of:
            parent_of[label], rank_of[label] = parent, None
    return Taxonomy.from_parents(parent_of, labels=list(rows), ranks=rank_of, source_format="ranks")


def test_lineage_ancestors_descendants(forest):
    assert forest.labels == ("Cod", "Hake", "Bird", "Squid", "Kelp")  # the leaves by default
    assert forest.lineage("Cod") == ["Animalia", "Chordata", "Fish", "Cod"]
    assert forest.ancestors("Cod") == ["Animalia", "Chordata", "Fish"]
    assert forest.ancestors("Plantae") == []
    assert forest.parent("Cod") == "Fish" and forest.parent("Animalia") is None
    assert forest.children("Chordata") == ["Fish", "Bird"]
    assert forest.descendants("Chordata") == ["Fish", "Cod", "Hake", "Bird"]
    assert forest.descendants("Animalia") == ["Chordata", "Fish", "Cod", "Hake", "Bird", "Mollusca", "Squid"]
    assert forest.descendants("Cod") == []
    assert forest.roots == ["Animalia", "Plantae"]
    assert forest.internal_nodes == ["Animalia", "Chordata", "Fish", "Mollusca", "Plantae"]
    assert forest.leaves == ["Cod", "Hake", "Bird", "Squid", "Kelp"]
    assert forest.depths.tolist() == [0, 1, 2, 3, 3, 2, 1, 2, 0, 1]
    assert forest.max_depth == 3
    assert not forest.has_ranks and forest.deepest_rank("Cod") is None
    assert "Cod" in forest and "Cdo" not in forest and len(forest) == 10


def test_ancestor_matrix_sums_label_probabilities_into_nodes(forest):
    M = forest.ancestor_matrix()  # labels × nodes
    assert M.shape == (5, 10)
    assert forest.names[:4] == ("Animalia", "Chordata", "Fish", "Cod")
    assert M[0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]  # Cod: itself and its 3 ancestors
    assert M.sum(axis=1).tolist() == [4, 4, 3, 3, 2]       # depth + 1 per label
    probs = np.array([[0.1, 0.2, 0.3, 0.15, 0.25]])         # Cod, Hake, Bird, Squid, Kelp
    node_p = dict(zip(forest.names, (probs @ M)[0]))
    assert node_p["Chordata"] == pytest.approx(0.6)
    assert node_p["Animalia"] == pytest.approx(0.75)
    assert node_p["Plantae"] == pytest.approx(0.25)
    sub = forest.ancestor_matrix(rows=["Cod", "Fish"], cols=["Fish", "Hake", "Animalia"])
    assert sub.tolist() == [[1, 0, 1], [1, 0, 1]]


def test_levels_of_a_forest_start_at_the_roots(forest):
    levels = forest.levels()
    assert [lv.name for lv in levels] == ["depth0", "depth1", "depth2", "depth3"]
    assert levels[0].nodes == ("Animalia", "Plantae")
    assert levels[0].label_to_node.tolist() == [0, 0, 0, 0, 1]
    assert levels[2].nodes == ("Fish", "Bird", "Squid")
    assert levels[2].label_to_node.tolist() == [0, 0, 1, 2, -1]  # Kelp has no depth-2 ancestor
    assert levels[3].label_to_node.tolist() == [0, 1, -1, -1, -1]


def test_levels_of_a_single_tree_skip_its_root():
    tax = Taxonomy.from_parents({"Life": None, "A": "Life", "B": "Life", "a1": "A"})
    assert [lv.name for lv in tax.levels()] == ["depth1", "depth2"]
    assert tax.labels == ("B", "a1")  # leaves, in taxonomy order (parents before children)
    assert tax.levels()[0].nodes == ("A", "B")
    assert tax.levels()[0].label_to_node.tolist() == [1, 0]
    assert tax.levels()[1].label_to_node.tolist() == [-1, 0]


def test_ranks_deepest_rank_and_labels_at_internal_ranks(ranked):
    assert ranked.has_ranks
    assert ranked.rank("Gadidae") == "family" and ranked.rank("Tunicata") is None
    assert ranked.deepest_rank("Gadus morhua") == "species"
    assert ranked.deepest_rank("Gadus") == "genus"
    assert ranked.deepest_rank("Tunicata") == "phylum"  # no rank itself: the finest rank above it
    assert ranked.ancestor_at("Gadus morhua", "family") == "Gadidae"
    assert ranked.ancestor_at("Tunicata", "class") is None
    assert ranked.lineage("Tunicata") == ["Animalia", "Chordata", "Tunicata"]
    internal = set(ranked.internal_nodes)
    assert [lab for lab in ranked.labels if lab in internal] == ["Gadus"]
    with pytest.raises(TaxonomyError, match="unknown rank 'genera'"):
        ranked.ancestor_at("Gadus", "genera")


def test_rank_codes_and_ranked_levels(ranked):
    codes = ranked.rank_codes(["Tunicata", "Gadus"])
    idx = ranked.index
    assert codes[0].tolist() == [idx("Animalia"), idx("Chordata"), -1, -1, -1, -1, -1]
    assert codes[1].tolist() == [idx(n) for n in ("Animalia", "Chordata", "Actinopteri", "Gadiformes", "Gadidae",
                                                  "Gadus")] + [-1]
    levels = {lv.name: lv for lv in ranked.levels()}
    assert list(levels) == list(RANKS)
    assert levels["phylum"].nodes == ("Chordata", "Porifera")
    assert levels["phylum"].label_to_node.tolist() == [0, 0, 0, 0, 1]
    assert levels["family"].label_to_node.tolist() == [0, 0, 1, -1, -1]
    assert levels["species"].label_to_node.tolist() == [0, -1, -1, -1, -1]


def test_ranks_must_get_finer_down_a_lineage():
    with pytest.raises(TaxonomyError, match="'F' \\(family\\) sits below 'G' \\(genus\\)"):
        Taxonomy.from_parents({"G": None, "F": "G"}, ranks={"G": "genus", "F": "family"})
    # an unranked node between two ranked ones is fine
    tax = Taxonomy.from_parents({"K": None, "sub": "K", "P": "sub"}, ranks={"K": "kingdom", "P": "phylum"})
    assert tax.ancestor_at("P", "kingdom") == "K"


def test_from_parents_rejects_cycles_unknown_parents_and_bad_labels():
    with pytest.raises(TaxonomyError, match="cycle in the taxonomy: A -> B -> A"):
        Taxonomy.from_parents({"A": "B", "B": "A"})
    with pytest.raises(TaxonomyError, match="unknown parent 'Fsh' \\(did you mean 'Fish'\\?\\)"):
        Taxonomy.from_parents({"Fish": None, "Cod": "Fsh"})
    with pytest.raises(TaxonomyError, match="its own parent"):
        Taxonomy.from_parents({"A": "A"})
    with pytest.raises(UnknownLabelError, match="label 'Cdo' is not a node.*did you mean 'Cod'"):
        Taxonomy.from_parents(FOREST, labels=["Cdo"])
    with pytest.raises(TaxonomyError, match="duplicate labels: Cod"):
        Taxonomy.from_parents(FOREST, labels=["Cod", "Cod"])
    with pytest.raises(TaxonomyError, match="unknown rank 'genera'"):
        Taxonomy.from_parents({"A": None}, ranks={"A": "genera"})


def test_unknown_names_get_a_suggestion(forest):
    with pytest.raises(UnknownLabelError, match="'Hak' is not a node of the taxonomy \\(did you mean 'Hake'\\?\\)"):
        forest.index("Hak")
    with pytest.raises(UnknownLabelError, match="label 'Sqid' in x.csv is not a node.*'Squid'.* and 1 more"):
        forest.check_names(["Cod", "Sqid", "Zebra"], what="label", where="x.csv")
    assert suggest("sebastes", ["Sebastes", "Sebastolobus"]) == " (did you mean 'Sebastes' or 'Sebastolobus'?)"
    assert suggest("Zebra", ["Cod"]) == ""


def test_flat_subtree_and_with_labels(forest):
    flat = Taxonomy.flat(["b", "a", "b"])
    assert flat.names == ("Organism", "b", "a") and flat.labels == ("b", "a")
    assert Taxonomy.flat(["Organism", "x"]).roots == ["<root>"]
    sub = forest.subtree(["Cod", "Bird"])
    assert sub.names == ("Animalia", "Chordata", "Fish", "Cod", "Bird")
    assert sub.labels == ("Cod", "Bird")
    relabelled = forest.with_labels(["Fish", "Kelp", "Fish"])
    assert relabelled.labels == ("Fish", "Kelp") and relabelled.names == forest.names
    with pytest.raises(UnknownLabelError, match="did you mean 'Kelp'"):
        forest.with_labels(["Kelpp"])


def test_hash_ignores_layout_but_not_content(forest):
    same = Taxonomy.from_parents(dict(FOREST))
    assert same.hash == forest.hash and same == forest
    assert forest.with_labels(["Cod"]).hash != forest.hash
    moved = Taxonomy.from_parents({**FOREST, "Bird": "Animalia"})
    assert moved.hash != forest.hash


def test_builtin_fathomnet2025_table(fixtures_dir):
    tax = builtin_taxonomy("fathomnet2025")
    with open(fixtures_dir / "fathomnet2025_taxonomy.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tax.labels == tuple(r["concept_name"] for r in rows) and len(tax.labels) == 79
    # 12 of the 79 labels are also ancestors of other labels (e.g. Sebastes, Porifera, Ophiuroidea)
    internal = set(tax.internal_nodes)
    ancestor_labels = [lab for lab in tax.labels if lab in internal]
    assert len(ancestor_labels) == 12
    assert {"Sebastes", "Porifera", "Ophiuroidea", "Lithodidae", "Hexactinellida"} <= set(ancestor_labels)
    # the five exception taxa are exactly the labels at no Linnaean rank
    assert sorted(n for n, r in zip(tax.names, tax.ranks) if r is None) == \
        ["Acanthascinae", "Actinopterygii", "Caridea", "Tunicata", "Zoantharia"]
    # each rank holds the distinct names of its column
    for level in tax.levels():
        assert len(level.nodes) == len({r[level.name] for r in rows if r[level.name]})
    for r in rows:  # every label's ranked lineage is its row
        assert [tax.ancestor_at(r["concept_name"], k) or "" for k in RANKS] == [r[k] for k in RANKS]
    assert tax.deepest_rank("Sebastes") == "genus" and tax.deepest_rank("Tunicata") == "phylum"
    assert tax.descendants("Sebastes") == ["Sebastes diploproa"]
    assert repr(tax) == "Taxonomy(192 nodes, 79 labels, 1 roots, max depth 6, ranked)"
