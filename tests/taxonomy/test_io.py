"""taxonomy.csv in both layouts: reading, writing, and one-line errors naming the file and row."""
from __future__ import annotations

from importlib import resources

import pytest

from taxonomist.data import load_dataset
from taxonomist.errors import DataError, TaxonomyError
from taxonomist.taxonomy import builtin_taxonomy, lca_distance, read_taxonomy, write_taxonomy

RANK_TABLE = """\
concept_name,kingdom,phylum,class,order,family,genus,species
Gadus morhua,Animalia,Chordata,Actinopteri,Gadiformes,Gadidae,Gadus,Gadus morhua
Gadus,Animalia,Chordata,Actinopteri,Gadiformes,Gadidae,Gadus,
Merluccius,Animalia,Chordata,Actinopteri,Gadiformes,Merlucciidae,Merluccius,
Tunicata,Animalia,Chordata,,,,,
Porifera,Animalia,Porifera,,,,,
"""

# a forest: two roots joined under a virtual root; the labels are the leaves
PARENT_TABLE = """\
concept_name,parent
Animalia,
Fish,Animalia
Cod,Fish
Hake,Fish
Squid,Animalia
Plantae,
Kelp,Plantae
"""


def write(tmp_path, text: str, name: str = "taxonomy.csv"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_rank_table(tmp_path):
    tax = read_taxonomy(write(tmp_path, RANK_TABLE))
    assert tax.source_format == "ranks"
    assert tax.labels == ("Gadus morhua", "Gadus", "Merluccius", "Tunicata", "Porifera")
    assert tax.lineage("Gadus morhua") == ["Animalia", "Chordata", "Actinopteri", "Gadiformes", "Gadidae", "Gadus",
                                           "Gadus morhua"]
    assert tax.rank("Actinopteri") == "class" and tax.rank("Tunicata") is None
    assert tax.parent("Tunicata") == "Chordata"  # a label at no rank sits below its deepest named rank
    assert tax.roots == ["Animalia"] and len(tax) == 11


def test_rank_table_with_a_subset_of_rank_columns(tmp_path):
    tax = read_taxonomy(write(tmp_path, "concept_name,family,genus\nCod,Gadidae,Gadus\nHake,Merlucciidae,\n"))
    assert tax.lineage("Cod") == ["Gadidae", "Gadus", "Cod"]
    assert tax.rank("Gadus") == "genus" and tax.rank("Cod") is None
    assert tax.roots == ["Gadidae", "Merlucciidae"]


def test_parent_table_forest(tmp_path):
    tax = read_taxonomy(write(tmp_path, PARENT_TABLE))
    assert tax.source_format == "parents" and not tax.has_ranks
    assert tax.roots == ["Animalia", "Plantae"]
    assert tax.labels == ("Cod", "Hake", "Squid", "Kelp")
    # Cod → Fish → Animalia → virtual root ← Plantae ← Kelp: 3 + 2 edges
    assert lca_distance(tax, ["Cod"], ["Hake", "Squid", "Kelp"]).tolist() == [[2.0, 3.0, 5.0]]


def test_parent_table_with_rank_column(tmp_path):
    text = "concept_name,parent,rank\nAnimalia,,kingdom\nChordata,Animalia,phylum\nTunicata,Chordata,\n"
    tax = read_taxonomy(write(tmp_path, text))
    assert tax.has_ranks and tax.ranks == ("kingdom", "phylum", None)
    assert tax.deepest_rank("Tunicata") == "phylum"


def test_parent_table_rows_may_come_in_any_order(tmp_path):
    tax = read_taxonomy(write(tmp_path, "concept_name,parent\nCod,Fish\nFish,\n"))
    assert tax.names == ("Fish", "Cod") and tax.lineage("Cod") == ["Fish", "Cod"]


def test_bom_and_spaces_are_tolerated(tmp_path):
    path = tmp_path / "taxonomy.csv"
    path.write_bytes("\ufeffconcept_name , parent\n Fish ,\nCod, Fish \n".encode("utf-8"))
    assert read_taxonomy(path).lineage("Cod") == ["Fish", "Cod"]


@pytest.mark.parametrize("text", [RANK_TABLE, PARENT_TABLE,
                                  "concept_name,parent,rank\nAnimalia,,kingdom\nSponge,Animalia,\n"])
def test_write_then_read_gives_the_same_taxonomy(tmp_path, text):
    tax = read_taxonomy(write(tmp_path, text))
    out = write_taxonomy(tax, tmp_path / "out" / "taxonomy.csv")
    again = read_taxonomy(out)
    assert again == tax and again.hash == tax.hash
    assert not list((tmp_path / "out").glob(".*.tmp"))  # the atomic write left no temporary file


def test_builtin_table_is_the_official_one(fixtures_dir):
    shipped = resources.files("taxonomist.taxonomy").joinpath("data/fathomnet2025.csv").read_bytes()
    official = (fixtures_dir / "fathomnet2025_taxonomy.csv").read_bytes()
    assert shipped.replace(b"\r\n", b"\n") == official.replace(b"\r\n", b"\n")
    assert read_taxonomy("fathomnet2025") == builtin_taxonomy() == read_taxonomy(fixtures_dir /
                                                                                  "fathomnet2025_taxonomy.csv")


@pytest.mark.parametrize("text, message", [
    ("concept_name,genus\nGadus,Gadus\nGadus,Gadus\n", "row 3: duplicate concept_name 'Gadus' (first at row 2)"),
    ("concept_name,family,genus\nX,F,X\nY,X,G\n", "row 3: 'X' appears at two ranks (genus and family)"),
    ("concept_name,family,genus\nCod,Gadidae,Gadus\nGadus,Lotidae,Gadus\n",
     "row 3: 'Gadus' has two different parents ('Gadidae' and 'Lotidae')"),
    ("concept_name,kingdom,genuss\nA,K,A\n", "unknown column 'genuss' (did you mean 'genus'?)"),
    ("concept_name,kingdom,kingdom\nA,K,A\n", "column 'kingdom' appears twice in the header"),
    ("", "empty file"),
    ("  \n\n", "empty file"),
    ("concept_name,kingdom\n", "no rows below the header"),
    ("name,kingdom\nA,K\n", "no 'concept_name' column (header: name,kingdom)"),
    ("concept_name\nA\n", "no rank columns"),
    ("concept_name,genus\nA,\n", "row 2: 'A' has no name at any rank"),
    ("concept_name,genus\n,G\n", "row 2: empty concept_name"),
    ("concept_name,parent\nA,,extra\n", "row 2 has more cells than the header"),
    ("concept_name,parent\nA,B\nB,C\nC,A\n", "cycle in the taxonomy: A -> B -> C -> A"),
    ("concept_name,parent\nA,A\n", "row 2: 'A' is its own parent"),
    ("concept_name,parent\nFish,\nCod,Fsh\n", "row 3: parent 'Fsh' of 'Cod' is not a concept_name of the table "
                                              "(did you mean 'Fish'?)"),
    ("concept_name,parent\nA,\n\nB,A\nB,A\n", "row 5: duplicate concept_name 'B' (first at row 4)"),
    ("concept_name,parent,rank\nA,,kingdm\n", "row 2: unknown rank 'kingdm' (did you mean 'kingdom'?)"),
    ("concept_name,parent,rank\nG,,genus\nF,G,family\n", "'F' (family) sits below 'G' (genus)"),
    ("concept_name,parent,depth\nA,,1\n", "unknown column 'depth'"),
])
def test_malformed_tables_give_one_line_errors(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(TaxonomyError) as info:
        read_taxonomy(path)
    text = str(info.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text


def test_non_utf8_missing_and_directory(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("concept_name,parent\nA,\nBé,A\n".encode("latin-1"))
    with pytest.raises(TaxonomyError, match="latin1.csv: not UTF-8 text \\(invalid byte at line 3\\)"):
        read_taxonomy(path)
    with pytest.raises(TaxonomyError, match="nope.csv: taxonomy file not found"):
        read_taxonomy(tmp_path / "nope.csv")
    with pytest.raises(TaxonomyError, match="is a directory"):
        read_taxonomy(tmp_path)
    with pytest.raises(TaxonomyError, match="unknown built-in taxonomy 'fathomnet2024'"):
        builtin_taxonomy("fathomnet2024")


def test_misspelled_dataset_label_gets_did_you_mean(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    (root / "taxonomy.csv").write_text(RANK_TABLE, encoding="utf-8")
    (root / "annotations.csv").write_text("path,label\nimages/a.png,Gadus\nimages/b.png,Merlucius\n"
                                          "images/c.png,Tunicata\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_dataset(root)
    assert str(info.value) == (f"{root / 'annotations.csv'}: row 3: label 'Merlucius' is not in the taxonomy "
                               "(did you mean 'Merluccius' or 'Merlucciidae'?)")
    (root / "annotations.csv").write_text("path,label\nimages/a.png,Gadus\nimages/b.png,Tunicata\n", encoding="utf-8")
    ds = load_dataset(root)
    assert ds.taxonomy.labels == ("Gadus", "Tunicata")  # the labels present, in taxonomy order
