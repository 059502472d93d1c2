"""`taxonomist taxonomy resolve|distances` end to end, with a fake WoRMS client and no network."""
from __future__ import annotations

import csv

import pytest

from taxonomist.cli.main import main
from taxonomist.taxonomy import read_taxonomy
from taxonomist.taxonomy.worms import CACHE_FILE

RANKS = ["kingdom", "phylum", "class", "order", "family", "genus", "species"]
EXCEPTIONS = {"Caridea", "Acanthascinae", "Actinopterygii", "Zoantharia", "Tunicata"}

CHAINS = {
    "Tunicata": [("Biota", "Superdomain"), ("Animalia", "Kingdom"), ("Chordata", "Phylum"), ("Tunicata", "Subphylum")],
    "Sebastes": [("Animalia", "Kingdom"), ("Chordata", "Phylum"), ("Vertebrata", "Subphylum"),
                 ("Teleostei", "Class"), ("Eupercaria", "Infraclass"), ("Perciformes", "Order"),
                 ("Scorpaenoidei", "Suborder"), ("Scorpaenoidea", "Superfamily"), ("Sebastidae", "Family"),
                 ("Sebastes", "Genus")],
}


def fake_client(name):
    if name not in CHAINS:
        raise LookupError(name)
    return CHAINS[name]


@pytest.fixture
def worms(monkeypatch):
    monkeypatch.setattr("taxonomist.taxonomy.worms.fathomnet_client", fake_client)


def read_matrix(path):
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def test_resolve_writes_resolved_names_and_exits_1_for_the_rest(tmp_path, worms, capsys):
    out, cache = tmp_path / "taxonomy.csv", tmp_path / "cache"
    rc = main(["taxonomy", "resolve", "Sebastes", "Nessie", "Tunicata", "--out", str(out), "--cache", str(cache)])
    captured = capsys.readouterr()
    assert rc == 1
    assert captured.err.strip() == "unresolved: Nessie: not found in WoRMS"
    assert captured.out.strip() == f"wrote {out}: 2 of 3 names resolved"
    assert out.read_text(encoding="utf-8") == (
        "concept_name,kingdom,phylum,class,order,family,genus,species\n"
        "Sebastes,Animalia,Chordata,Teleostei,Perciformes,Sebastidae,Sebastes,\n"
        "Tunicata,Animalia,Chordata,,,,,\n")
    assert read_taxonomy(out).labels == ("Sebastes", "Tunicata")
    assert (cache / CACHE_FILE).is_file()


def test_resolve_names_file_and_offline_cache(tmp_path, worms, monkeypatch, capsys):
    names = tmp_path / "labels.txt"
    names.write_text("# FathomNet labels\nTunicata\n\nSebastes\nTunicata\n", encoding="utf-8")
    cache = tmp_path / "cache"
    assert main(["taxonomy", "resolve", "--names", str(names), "--out", str(tmp_path / "a.csv"),
                 "--cache", str(cache)]) == 0

    def no_network(name):
        raise AssertionError("--offline must not call WoRMS")

    monkeypatch.setattr("taxonomist.taxonomy.worms.fathomnet_client", no_network)
    out = tmp_path / "b.csv"
    assert main(["taxonomy", "resolve", "Tunicata", "Sebastes", "--out", str(out), "--cache", str(cache),
                 "--offline"]) == 0
    assert out.read_bytes() == (tmp_path / "a.csv").read_bytes()
    capsys.readouterr()
    rc = main(["taxonomy", "resolve", "Lithodidae", "--out", str(tmp_path / "c.csv"), "--cache", str(cache),
               "--offline"])
    err = capsys.readouterr().err
    assert rc == 1 and not (tmp_path / "c.csv").exists()
    assert "unresolved: Lithodidae: not in the cache (--offline)" in err
    assert f"no name could be resolved; {tmp_path / 'c.csv'} was not written" in err


def test_resolve_without_names_is_an_error(tmp_path, worms, capsys):
    assert main(["taxonomy", "resolve", "--out", str(tmp_path / "t.csv")]) == 2
    assert capsys.readouterr().err.strip() == "error: no names given: pass NAME… or --names FILE"
    assert main(["taxonomy", "resolve", "--names", str(tmp_path / "none.txt"), "--out", str(tmp_path / "t.csv")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'none.txt'}: names file not found"


def test_distances_fathomnet2025_equals_the_official_rule(tmp_path, fixtures_dir, capsys):
    out = tmp_path / "m.csv"
    assert main(["taxonomy", "distances", "fathomnet2025", "--metric", "fathomnet2025", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}: 79×79 fathomnet2025 distances (max 12)"
    header, rows = read_matrix(out)
    with open(fixtures_dir / "fathomnet2025_taxonomy.csv", encoding="utf-8", newline="") as f:
        lineage = {r["concept_name"]: [r[k] or None for k in RANKS] for r in csv.DictReader(f)}
    names = list(lineage)
    assert header == ["concept_name", *names]
    assert [r[0] for r in rows] == names

    def official(t, p):  # the README's rule, per pair
        d = sum(0 if a == b else 1 if (a is None or b is None) else 2 for a, b in zip(lineage[t], lineage[p]))
        return d + ((t in EXCEPTIONS) + (p in EXCEPTIONS) if t != p else 0)

    assert [[int(v) for v in r[1:]] for r in rows] == [[official(t, p) for p in names] for t in names]


def test_distances_lca_all_nodes_with_rank_weights(tmp_path, capsys):
    tax = tmp_path / "taxonomy.csv"
    tax.write_text("concept_name,parent,rank\nGadidae,,family\nGadus,Gadidae,genus\nG. morhua,Gadus,species\n"
                   "Merlangius,Gadidae,genus\n", encoding="utf-8")
    out = tmp_path / "m.csv"
    assert main(["taxonomy", "distances", str(tax), "--metric", "lca", "--nodes", "all",
                 "--rank-weights", "species=0.5, genus=0.25", "--out", str(out)]) == 0
    header, rows = read_matrix(out)
    assert header == ["concept_name", "Gadidae", "Gadus", "G. morhua", "Merlangius"]
    assert rows == [["Gadidae", "0", "0.25", "0.75", "0.25"],
                    ["Gadus", "0.25", "0", "0.5", "0.5"],
                    ["G. morhua", "0.75", "0.5", "0", "1"],
                    ["Merlangius", "0.25", "0.5", "1", "0"]]
    capsys.readouterr()
    assert main(["taxonomy", "distances", str(tax), "--metric", "lca", "--out", str(out)]) == 0
    header, rows = read_matrix(out)
    assert header == ["concept_name", "G. morhua", "Merlangius"] and rows[0] == ["G. morhua", "0", "3"]


@pytest.mark.parametrize("args, message", [
    (["--metric", "fathomnet2025", "--rank-weights", "species=1"], "--rank-weights applies to --metric lca only"),
    (["--metric", "lca", "--rank-weights", "species"], "--rank-weights 'species': expected RANK=WEIGHT"),
    (["--metric", "lca", "--rank-weights", "species=half"], "--rank-weights 'species=half': 'half' is not a number"),
    (["--metric", "lca", "--rank-weights", "specie=1"], "unknown rank 'specie' in rank weights"),
])
def test_distances_option_errors(tmp_path, capsys, args, message):
    rc = main(["taxonomy", "distances", "fathomnet2025", *args, "--out", str(tmp_path / "m.csv")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1
    assert not (tmp_path / "m.csv").exists()


def test_distances_of_a_broken_or_missing_table(tmp_path, capsys):
    bad = tmp_path / "taxonomy.csv"
    bad.write_text("concept_name,parent\nA,B\nB,A\n", encoding="utf-8")
    assert main(["taxonomy", "distances", str(bad), "--metric", "lca", "--out", str(tmp_path / "m.csv")]) == 2
    assert capsys.readouterr().err == f"error: {bad}: cycle in the taxonomy: A -> B -> A\n"
    assert main(["taxonomy", "distances", "fathomnet2026", "--metric", "lca", "--out", str(tmp_path / "m.csv")]) == 2
    assert capsys.readouterr().err == "error: fathomnet2026: taxonomy file not found (did you mean 'fathomnet2025'?)\n"
    flat = tmp_path / "flat.csv"
    flat.write_text("concept_name,parent\nA,\nB,\n", encoding="utf-8")
    assert main(["taxonomy", "distances", str(flat), "--metric", "fathomnet2025", "--out", str(tmp_path / "m.csv")]) == 2
    assert "needs a taxonomy with Linnaean ranks; use --metric lca" in capsys.readouterr().err
