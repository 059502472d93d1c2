"""WoRMS resolution with recorded chains: seven-rank filtering, the JSON cache, offline mode, unresolved names."""
from __future__ import annotations

import json
import sys
import types
from dataclasses import dataclass, field

import pytest

from taxonomist.errors import TaxonomistError
from taxonomist.taxonomy import RANKS, builtin_taxonomy
from taxonomist.taxonomy.worms import CACHE_FILE, fathomnet_client, resolve_names, seven_ranks

# Ancestor chains as the FathomNet WoRMS service answers them (root first), sub-ranks included.
CHAINS = {
    "Sebastolobus": [("Biota", "Superdomain"), ("Animalia", "Kingdom"), ("Chordata", "Phylum"),
                     ("Vertebrata", "Subphylum"), ("Actinopterygii", "Superclass"), ("Teleostei", "Class"),
                     ("Acanthopterygii", "Superorder"), ("Perciformes", "Order"), ("Scorpaenoidei", "Suborder"),
                     ("Sebastidae", "Family"), ("Sebastolobus", "Genus")],
    "Lithodidae": [("Biota", "Superdomain"), ("Animalia", "Kingdom"), ("Arthropoda", "Phylum"),
                   ("Crustacea", "Subphylum"), ("Multicrustacea", "Superclass"), ("Malacostraca", "Class"),
                   ("Eumalacostraca", "Subclass"), ("Eucarida", "Superorder"), ("Decapoda", "Order"),
                   ("Pleocyemata", "Suborder"), ("Anomura", "Infraorder"), ("Lithodoidea", "Superfamily"),
                   ("Lithodidae", "Family")],
    # a label at a rank outside the seven: stays a node below its deepest Linnaean ancestor
    "Tunicata": [("Biota", "Superdomain"), ("Animalia", "Kingdom"), ("Chordata", "Phylum"),
                 ("Tunicata", "Subphylum")],
    "Caridea": [("Animalia", "Kingdom"), ("Arthropoda", "Phylum"), ("Crustacea", "Subphylum"),
                ("Malacostraca", "Class"), ("Eumalacostraca", "Subclass"), ("Decapoda", "Order"),
                ("Pleocyemata", "Suborder"), ("Caridea", "Infraorder")],
}


class FakeClient:
    """Answers from CHAINS, raises LookupError for other names; counts the calls."""

    def __init__(self, chains=CHAINS, failing=()):
        self.chains, self.failing, self.calls = chains, set(failing), []

    def __call__(self, name):
        self.calls.append(name)
        if name in self.failing:
            raise ConnectionError("connection reset")
        if name not in self.chains:
            raise LookupError(name)
        return self.chains[name]


def test_seven_ranks_drops_sub_and_super_ranks():
    chain = [("Biota", "Superdomain"), ("Animalia", "Kingdom"), ("Chordata", "Phylum"), ("Vertebrata", "Subphylum"),
             ("Actinopteri", "Class"), ("Teleostei", "Infraclass"), ("Perciformes", "Order"),
             ("Scorpaenoidei", "Suborder"), ("Scorpaenoidea", "Superfamily"), ("Sebastidae", "Family"),
             ("Sebastinae", "Subfamily"), ("Sebastes", "Genus"), ("Sebastes diploproa", "Species")]
    assert seven_ranks(chain) == {"kingdom": "Animalia", "phylum": "Chordata", "class": "Actinopteri",
                                  "order": "Perciformes", "family": "Sebastidae", "genus": "Sebastes",
                                  "species": "Sebastes diploproa"}
    assert seven_ranks(CHAINS["Tunicata"]) == {"kingdom": "Animalia", "phylum": "Chordata"}
    assert seven_ranks([("X", ""), ("Y", "Clade")]) == {}


def test_resolve_matches_the_official_rows_and_lists_unresolved(tmp_path):
    client = FakeClient()
    res = resolve_names(["Sebastolobus", "Nessie", "Tunicata", "Lithodidae", "Caridea", " Tunicata "],
                        client=client, cache_dir=tmp_path)
    assert list(res.lineages) == ["Sebastolobus", "Tunicata", "Lithodidae", "Caridea"]
    assert res.unresolved == {"Nessie": "not found in WoRMS"}
    assert client.calls == ["Sebastolobus", "Nessie", "Tunicata", "Lithodidae", "Caridea"]  # each name once
    # the resolved lineages are exactly the rows of the official FathomNet 2025 table
    official = {row["concept_name"]: row for row in builtin_taxonomy().to_rows()}
    rows = res.to_taxonomy().to_rows()
    assert [r["concept_name"] for r in rows] == list(res.lineages)
    for row in rows:
        assert row == official[row["concept_name"]]
    tax = res.to_taxonomy()
    assert tax.rank("Tunicata") is None and tax.parent("Tunicata") == "Chordata"
    assert tax.parent("Caridea") == "Decapoda"


def test_cache_is_written_and_offline_reads_only_the_cache(tmp_path):
    resolve_names(["Sebastolobus", "Tunicata", "Nessie"], client=FakeClient(), cache_dir=tmp_path)
    cache = json.loads((tmp_path / CACHE_FILE).read_text(encoding="utf-8"))
    assert sorted(cache) == ["Sebastolobus", "Tunicata"]  # failures are not cached
    assert cache["Tunicata"] == [list(pair) for pair in CHAINS["Tunicata"]]

    def no_network(name):
        raise AssertionError(f"offline mode called the client for {name}")

    res = resolve_names(["Tunicata", "Lithodidae", "Sebastolobus"], client=no_network, cache_dir=tmp_path,
                        offline=True)
    assert list(res.lineages) == ["Tunicata", "Sebastolobus"]
    assert res.lineages["Sebastolobus"]["order"] == "Perciformes"
    assert res.unresolved == {"Lithodidae": "not in the cache (--offline)"}
    # online again: cached names are not fetched twice
    client = FakeClient()
    resolve_names(["Tunicata", "Lithodidae"], client=client, cache_dir=tmp_path)
    assert client.calls == ["Lithodidae"]


def test_network_failures_and_bad_answers_are_unresolved_not_fatal(tmp_path):
    chains = {**CHAINS, "Broken": [("Animalia",)], "Nameless": [("Life", "Clade")]}
    res = resolve_names(["Sebastolobus", "Tunicata", "Broken", "Nameless"],
                        client=FakeClient(chains, failing={"Tunicata"}), cache_dir=tmp_path)
    assert list(res.lineages) == ["Sebastolobus"]
    assert res.unresolved == {
        "Tunicata": "lookup failed (connection reset)",
        "Broken": "malformed answer from the WoRMS client (expected (name, rank) pairs)",
        "Nameless": "WoRMS gave no kingdom…species ranks",
    }


def test_corrupt_cache_is_a_one_line_error(tmp_path):
    (tmp_path / CACHE_FILE).write_text("[1, 2", encoding="utf-8")
    with pytest.raises(TaxonomistError, match="the WoRMS cache is corrupt; delete it"):
        resolve_names(["Tunicata"], client=FakeClient(), cache_dir=tmp_path)


def test_a_single_name_string_is_one_name(tmp_path):
    res = resolve_names("Tunicata", client=FakeClient(), cache_dir=tmp_path)
    assert list(res.lineages) == ["Tunicata"]


@dataclass
class Node:  # the shape of fathomnet-py's WormsNode
    name: str
    rank: str
    children: list = field(default_factory=list)


def fake_fathomnet(monkeypatch, get_ancestors):
    worms = types.SimpleNamespace(get_ancestors=get_ancestors)
    api = types.ModuleType("fathomnet.api")
    api.worms = worms
    package = types.ModuleType("fathomnet")
    package.api = api
    monkeypatch.setitem(sys.modules, "fathomnet", package)
    monkeypatch.setitem(sys.modules, "fathomnet.api", api)


def test_fathomnet_client_walks_the_ancestor_tree(monkeypatch):
    def get_ancestors(name):
        if name == "Nessie":
            raise ValueError("Nessie not found")
        if name == "Timeout":
            raise OSError("timed out")
        return Node("Biota", "Superdomain", [Node("Animalia", "Kingdom", [Node("Chordata", "Phylum", [
            Node("Sebastes", "Genus", [Node("Sebastes alutus", "Species")])])])])

    fake_fathomnet(monkeypatch, get_ancestors)
    assert fathomnet_client("Sebastes alutus") == [("Biota", "Superdomain"), ("Animalia", "Kingdom"),
                                                   ("Chordata", "Phylum"), ("Sebastes", "Genus"),
                                                   ("Sebastes alutus", "Species")]
    # a synonym answers with the accepted name; the name asked for is kept at the same rank
    assert fathomnet_client("Sebastodes alutus")[-2:] == [("Sebastes alutus", "Species"),
                                                          ("Sebastodes alutus", "Species")]
    with pytest.raises(LookupError):
        fathomnet_client("Nessie")
    with pytest.raises(ConnectionError, match="WoRMS request for 'Timeout' failed"):
        fathomnet_client("Timeout")


def test_fathomnet_client_without_fathomnet_py(monkeypatch):
    # the import fails as if fathomnet-py were not installed, even after another test imported it
    for name in ("fathomnet", "fathomnet.api", "fathomnet.api.worms"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(TaxonomistError, match=r"pip install 'taxonomist\[worms\]'"):
        fathomnet_client("Tunicata")


def test_every_rank_name_is_known():
    assert set(seven_ranks([(r.title(), r.title()) for r in RANKS])) == set(RANKS)
