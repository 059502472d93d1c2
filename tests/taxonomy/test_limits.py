"""Taxonomies that cost too much: lineages deeper than MAX_DEPTH are refused on reading (one line naming the file
and the chain); wide real-sized trees (100k nodes) load in bounded time and memory; the vectorised lookups agree
with the plain definitions on random trees."""
from __future__ import annotations

import csv
import time
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taxonomist.cli.main import main
from taxonomist.errors import TaxonomyError
from taxonomist.taxonomy import RANKS, Taxonomy, distance_matrix, lca_distance, read_taxonomy
from taxonomist.taxonomy.core import MAX_DEPTH
from taxonomist.taxonomy.io import parse_taxonomy

FUZZ = settings(deadline=None, derandomize=True, database=None, max_examples=30,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def write_chain(path, n: int, reverse: bool = False):
    rows = [(f"n{i}", f"n{i - 1}" if i else "") for i in range(n)]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["concept_name", "parent"])
        w.writerows(reversed(rows) if reverse else rows)
    return path


@settings(FUZZ)
@given(n=st.integers(1, 3 * MAX_DEPTH), reverse=st.booleans())
def test_lineages_deeper_than_max_depth_are_refused(tmp_path_factory, n, reverse):
    path = write_chain(tmp_path_factory.mktemp("chain") / "taxonomy.csv", n, reverse)
    if n <= MAX_DEPTH:
        tax = read_taxonomy(path)
        assert tax.max_depth == n - 1 and tax.lineage(f"n{n - 1}") == [f"n{i}" for i in range(n)]
        assert float(lca_distance(tax, ["n0"], [f"n{n - 1}"])[0, 0]) == n - 1
    else:
        with pytest.raises(TaxonomyError) as e:
            read_taxonomy(path)
        message = str(e.value)
        assert message.startswith(f"{path}: the lineage of 'n{n - 1}' ('n0' → ")
        assert f"holds {n} names; a lineage may hold at most {MAX_DEPTH}" in message
        assert "\n" not in message and len(message) < 300


def test_the_issue_chains_fail_fast_with_one_line(tmp_path, capsys):
    """10,000 nodes took 8 s and 2.5 GB; 25,000 gave a MemoryError traceback."""
    for n in (10_000, 25_000):
        path = write_chain(tmp_path / f"chain{n}.csv", n)
        start = time.perf_counter()
        with pytest.raises(TaxonomyError, match=f"'n{n - 1}'"):
            read_taxonomy(path)
        assert time.perf_counter() - start < 2.0
    code = main(["taxonomy", "distances", str(path), "--metric", "lca", "--out", str(tmp_path / "m.csv")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: {path}: the lineage of 'n24999'") and err.count("\n") == 1
    assert not (tmp_path / "m.csv").exists()


def wide_rank_rows(n_species: int) -> tuple[list[str], list[dict[str, str]]]:
    """A 7-rank table shaped like a real one: 1 kingdom, 10 phyla, 100 classes, … n_species species."""
    counts = [1, 10, 100, 1000, 5000, 20000, n_species]
    rows = []
    for s in range(n_species):
        lineage = {r: f"{r[:3]}{s * c // n_species}" for r, c in zip(RANKS, counts)}
        rows.append({"concept_name": lineage["species"], **lineage})
    return ["concept_name", *RANKS], rows


def test_a_wide_100k_node_taxonomy_loads_in_bounded_time_and_memory():
    """74,000 species under 26,111 higher taxa: reading, the per-rank levels, the arrays, the hash and a
    2,000 × 2,000 distance matrix each way stay far from quadratic (measured: ~1.5 s and ~90 MB at peak)."""
    header, rows = wide_rank_rows(74_000)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        tax = parse_taxonomy(header, rows, "<wide>")
        levels = tax.levels()
        tax.ancestor_table(), tax.rank_codes(), tax.hash
        labels = list(tax.labels[::37])
        d_lca = distance_matrix(tax, "lca", labels, labels)
        d_fn = distance_matrix(tax, "fathomnet2025", labels, labels)
        seconds = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(tax) == 100_111 and [lv.name for lv in levels] == list(RANKS)
    assert d_lca.shape == d_fn.shape == (2000, 2000) and d_lca.max() == 12 and d_fn.max() == 12
    assert seconds < 60, seconds                    # ~1.5 s alone; generous for a shared CI machine
    assert peak < 400 * 2**20, peak / 2**20         # the two (2000, 2000) float matrices alone are 64 MB


def test_a_deep_and_wide_tree_at_the_depth_limit():
    """The worst shape the limit allows: a trunk of MAX_DEPTH - 1 names with 20,000 leaves under it."""
    parent_of = {f"t{i}": (f"t{i - 1}" if i else None) for i in range(MAX_DEPTH - 1)}
    parent_of.update({f"leaf{j}": f"t{MAX_DEPTH - 2}" for j in range(20_000)})
    start = time.perf_counter()
    tax = Taxonomy.from_parents(parent_of)
    assert tax.max_depth == MAX_DEPTH - 1 and len(tax.levels()) == MAX_DEPTH - 1
    d = lca_distance(tax, tax.labels[:1000], tax.labels[:1000])
    assert time.perf_counter() - start < 30
    assert d.max() == 2 and np.all(np.diag(d) == 0)
    assert tax.ancestor_table().nbytes == len(tax) * MAX_DEPTH * 8


def test_a_huge_repeated_header_is_refused_at_once(tmp_path):
    path = tmp_path / "taxonomy.csv"
    path.write_text("concept_name" + ",parent" * 100_000 + "\nA,\n")
    start = time.perf_counter()
    with pytest.raises(TaxonomyError, match="column 'parent' appears twice"):
        read_taxonomy(path)
    assert time.perf_counter() - start < 2.0


def test_duplicate_names_in_a_large_taxonomy_are_reported_at_once():
    names = tuple(f"n{i}" for i in range(100_000)) + ("n5",)
    start = time.perf_counter()
    with pytest.raises(TaxonomyError, match="duplicate node names: n5"):
        Taxonomy(names, (-1,) * len(names), (None,) * len(names), ("n1",))
    assert time.perf_counter() - start < 2.0


# -------------------------------------------------------------------- the fast paths agree with the definitions
@st.composite
def random_tree(draw) -> dict[str, str | None]:
    n = draw(st.integers(1, 40))
    chain = draw(st.integers(0, 12))  # a trunk shared by all, which the distance code skips in one step
    parent_of: dict[str, str | None] = {f"t{i}": (f"t{i - 1}" if i else None) for i in range(chain)}
    names = list(parent_of)
    for i in range(n):
        parent = draw(st.one_of(st.none(), st.sampled_from(names))) if names else None
        if chain and parent is None and draw(st.booleans()):
            parent = names[-1] if chain else None
        parent_of[f"x{i}"] = parent
        names.append(f"x{i}")
    return parent_of


def _lineage(parent_of, name):
    out = []
    while name is not None:
        out.append(name)
        name = parent_of[name]
    return out[::-1]


@settings(FUZZ, max_examples=60)
@given(parent_of=random_tree(), weight=st.sampled_from([1.0, 0.5, 2.0]))
def test_lca_distance_descendants_and_levels_match_their_definitions(parent_of, weight):
    tax = Taxonomy.from_parents(parent_of)
    names = list(tax.names)
    d = lca_distance(tax, names, names, default_weight=weight)
    for a in names:
        la = _lineage(parent_of, a)
        for b in names:
            lb = _lineage(parent_of, b)
            shared = 0
            while shared < min(len(la), len(lb)) and la[shared] == lb[shared]:
                shared += 1
            assert d[names.index(a), names.index(b)] == pytest.approx(weight * (len(la) + len(lb) - 2 * shared))
        below = [n for n in names if n != a and a in _lineage(parent_of, n)]
        assert tax.descendants(a) == below
    for level in tax.levels():
        depth = int(level.name.removeprefix("depth"))
        for k, label in enumerate(tax.labels):
            lineage = _lineage(parent_of, label)
            expected = level.nodes.index(lineage[depth]) if depth < len(lineage) else -1
            assert level.label_to_node[k] == expected
