"""Candidate sets: labels, all nodes, the 79 FathomNet names, files with typos."""
from __future__ import annotations

import numpy as np
import pytest

from taxonomist.decide import candidate_mask, candidate_nodes
from taxonomist.errors import DataError, UnknownLabelError
from taxonomist.taxonomy import builtin_taxonomy


def test_keywords(tree):
    assert candidate_nodes(tree) == ["a1", "a2", "b1", "b2"]
    assert candidate_nodes(tree, "") == ["a1", "a2", "b1", "b2"]
    assert candidate_nodes(tree, "all") == list(tree.names)
    assert candidate_nodes(tree, ["A", "a1", "A"]) == ["A", "a1"]


def test_fathomnet2025_names():
    tax = builtin_taxonomy("fathomnet2025")
    names = candidate_nodes(tax, "fathomnet2025")
    assert len(names) == 79 and names == list(tax.labels)


def test_fathomnet2025_on_a_foreign_taxonomy_names_the_missing(tree):
    with pytest.raises(UnknownLabelError, match=r"79 of the 79 names are not nodes.*and 74 more"):
        candidate_nodes(tree, "fathomnet2025")


def test_file(tree, tmp_path):
    path = tmp_path / "cands.txt"
    path.write_text("# my list\nA\n\nb1\nA\n", encoding="utf-8")
    assert candidate_nodes(tree, path) == ["A", "b1"]
    assert candidate_nodes(tree, str(path)) == ["A", "b1"]


def test_file_with_a_typo_says_where_and_suggests(tree, tmp_path):
    path = tmp_path / "cands.txt"
    path.write_text("A\nb11\n", encoding="utf-8")
    with pytest.raises(UnknownLabelError, match=r"cands.txt, line 2: candidate 'b11' .*did you mean 'b1'"):
        candidate_nodes(tree, path)


def test_missing_or_empty_file(tree, tmp_path):
    with pytest.raises(DataError, match="candidates file not found"):
        candidate_nodes(tree, tmp_path / "nope.txt")
    with pytest.raises(DataError, match="did you mean 'fathomnet2025'"):
        candidate_nodes(tree, "fathomnet2205")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# nothing\n", encoding="utf-8")
    with pytest.raises(DataError, match="names no taxon"):
        candidate_nodes(tree, empty)


def test_mask(tree):
    assert candidate_mask(tree, None).all()
    assert candidate_mask(tree, ["A", "b2"]).tolist() == [n in ("A", "b2") for n in tree.names]
    with pytest.raises(DataError, match="candidates is empty"):
        candidate_mask(tree, [])
    with pytest.raises(UnknownLabelError, match="did you mean 'a1'"):
        candidate_mask(tree, ["a11"])
    assert isinstance(candidate_mask(tree, ["A"]), np.ndarray)
