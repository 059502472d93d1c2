"""The output formats of `predict`: Darwin Core (every column a Darwin Core term, open-nomenclature qualifiers,
lineage, the model's identity), JSON lines (the serve answer per image) and the embeddings' Parquet file (the
model's own pooled features, one row per answered image)."""
from __future__ import annotations

import importlib
import json
import re
import shutil
import sys
import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from taxonomist.decide import DecisionOptions
from taxonomist.errors import ConfigError
from taxonomist.inference import predict
from taxonomist.inference.formats import (CF_BELOW, DWC_COLUMNS, FORMATS, ModelIdentity, Provenance, dwc_table,
                                          read_embeddings_metadata, specific_epithet)
from taxonomist.inference.model_file import read_card
from taxonomist.inference.sharding import ChunkResult, parts_folder
from taxonomist.taxonomy import Taxonomy, builtin_taxonomy
from taxonomist.utils.files import file_sha256

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
FAST = dict(device="cpu", num_workers=0, progress=False)
predict_module = importlib.import_module("taxonomist.inference.predict")
_PREDICT_CHUNK = predict_module._predict_chunk


def dwc_terms() -> set[str]:
    lines = (FIXTURES / "dwc_terms.txt").read_text().splitlines()
    return {line.strip() for line in lines if line.strip() and not line.startswith("#")}


def best(run: Path) -> Path:
    return run / "checkpoints" / "best.safetensors"


@pytest.fixture(scope="module")
def photo_rows(tmp_path_factory, tiny_data) -> Path:
    """A CSV of six of the dataset's images (with annotation ids) and one that cannot be read."""
    root = tmp_path_factory.mktemp("rows")
    lines = ["annotation_id,path"]
    for k, src in enumerate(sorted((tiny_data / "images").rglob("*.jpg"))[::10][:6]):
        shutil.copyfile(src, root / f"{k}.jpg")
        lines.append(f"{100 + k},{k}.jpg")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    lines.append("199,broken.jpg")
    (root / "rows.csv").write_text("\n".join(lines) + "\n")
    return root / "rows.csv"


# ---------------------------------------------------------------------------------------------- Darwin Core
def test_the_term_list_is_darwin_core_and_every_column_is_a_term():
    terms = dwc_terms()
    assert len(terms) > 150 and {"occurrenceID", "scientificName", "identificationQualifier", "taxonRank"} <= terms
    assert set(DWC_COLUMNS) <= terms, sorted(set(DWC_COLUMNS) - terms)
    assert len(set(DWC_COLUMNS)) == len(DWC_COLUMNS)


def test_format_choices_of_the_cli_match_the_library():
    from taxonomist.cli.predict import FORMAT_CHOICES

    assert FORMAT_CHOICES == FORMATS


def _result(taxonomy: Taxonomy, names, confidence, unknown=None, ood_score=None, threshold=None) -> ChunkResult:
    n = len(names)
    f = np.zeros(0)
    return ChunkResult(np.arange(n, dtype=np.int64), taxonomy.indices(names).astype(np.int64),
                       np.asarray(confidence, dtype=np.float64), np.full(n, 1.5),
                       f if ood_score is None else np.asarray(ood_score, dtype=np.float64),
                       np.zeros(0, dtype=bool) if unknown is None else np.asarray(unknown, dtype=bool),
                       np.zeros(0, dtype=np.int64), np.zeros(0, dtype=str),
                       ood_threshold=f if threshold is None else np.full(n, threshold))


def _provenance(options=None, digest="ab" * 32, when=datetime(2025, 3, 4, 5, 6, 7, tzinfo=timezone.utc)):
    identity = ModelIdentity(("first/checkpoints/best.safetensors",), (digest,), ("test_efficientnet",))
    options = (options or DecisionOptions("min-risk", candidates="all")).resolve(builtin_taxonomy("fathomnet2025"))
    return Provenance(identity, options, {"decision": options.decision}, when)


def test_open_nomenclature_lineage_and_epithet_on_a_ranked_taxonomy():
    tax = builtin_taxonomy("fathomnet2025")
    names = ["Sebastes diploproa", "Sebastes diploproa", "Sebastes", "Asteroidea", "Acanthascinae",
             "Sebastes diploproa"]
    rows = pd.DataFrame({"path": [f"img/{k}.jpg" for k in range(6)],
                         "annotation_id": ["11", "12", "", "14", "15", "16"],
                         "url": ["https://media.example/1.jpg", "", "", "", "", ""], "site": ["a"] * 6})
    result = _result(tax, names, [0.91, CF_BELOW - 0.01, 0.7, 0.8, 0.6, 0.95])
    frame = dwc_table(rows, result, tax, _provenance())
    assert list(frame.columns) == list(DWC_COLUMNS) and "site" not in frame.columns  # Darwin Core terms only
    sure, doubt, genus, klass, unranked, _ = frame.to_dict("records")
    assert (sure["scientificName"], sure["taxonRank"], sure["specificEpithet"], sure["identificationQualifier"]) == \
        ("Sebastes diploproa", "species", "diploproa", "")
    assert [sure[r] for r in ("kingdom", "phylum", "class", "order", "family", "genus")] == \
        [tax.ancestor_at("Sebastes diploproa", r) for r in ("kingdom", "phylum", "class", "order", "family", "genus")]
    assert sure["kingdom"] == "Animalia" and sure["genus"] == "Sebastes"
    # a doubtful species is published at its genus, the doubt in the qualifier (OBIS; Darwin Core's example)
    assert (doubt["scientificName"], doubt["taxonRank"], doubt["identificationQualifier"],
            doubt["specificEpithet"], doubt["verbatimIdentification"]) == \
        ("Sebastes", "genus", "cf. diploproa", "", "Sebastes cf. diploproa")
    assert (genus["scientificName"], genus["taxonRank"], genus["identificationQualifier"],
            genus["verbatimIdentification"], genus["specificEpithet"]) == \
        ("Sebastes", "genus", "sp.", "Sebastes sp.", "")
    assert (klass["taxonRank"], klass["identificationQualifier"], klass["class"], klass["genus"]) == \
        ("class", "indet.", "Asteroidea", "")
    assert (unranked["taxonRank"], unranked["identificationQualifier"]) == ("", "indet.")  # a subfamily, unranked
    # occurrenceID: annotation_id, else the path; associatedMedia: url, else the path
    assert frame["occurrenceID"].tolist() == ["11", "12", "img/2.jpg", "14", "15", "16"]
    assert frame["associatedMedia"].tolist()[:2] == ["https://media.example/1.jpg", "img/1.jpg"]
    assert sure["identifiedBy"] == ("taxonomist 0.1.0, model first/checkpoints/best.safetensors "
                                    "(test_efficientnet, sha256 abababababab)")
    assert sure["dateIdentified"] == "2025-03-04T05:06:07Z"
    assert sure["identificationRemarks"] == ("min-risk decision (fathomnet2025 distance); P(answer)=0.910; "
                                             "expected distance 1.5")


def test_identification_ids_are_stable_and_name_model_rules_and_occurrence():
    tax = builtin_taxonomy("fathomnet2025")
    rows = pd.DataFrame({"path": ["a.jpg", "b.jpg"]})
    result = _result(tax, ["Sebastes", "Sebastes"], [0.9, 0.9])
    ids = dwc_table(rows, result, tax, _provenance())["identificationID"].tolist()
    assert len(set(ids)) == 2 and all(uuid.UUID(i).version == 5 for i in ids)
    later = _provenance(when=datetime(2030, 1, 1, tzinfo=timezone.utc))
    assert dwc_table(rows, result, tax, later)["identificationID"].tolist() == ids  # a rerun: the same ids
    other_model = dwc_table(rows, result, tax, _provenance(digest="cd" * 32))["identificationID"].tolist()
    other_rule = dwc_table(rows, result, tax, _provenance(DecisionOptions("argmax")))["identificationID"].tolist()
    assert not set(other_model) & set(ids) and not set(other_rule) & set(ids)


def test_flagged_unknowns_are_doubtful_and_the_remarks_say_why():
    tax = builtin_taxonomy("fathomnet2025")
    rows = pd.DataFrame({"path": ["a.jpg", "b.jpg"]})
    options = DecisionOptions("argmax", ood="energy")
    result = _result(tax, ["Sebastes diploproa", "Sebastes diploproa"], [0.95, 0.95], unknown=[True, False],
                     ood_score=[-1.25, -3.5], threshold=-2.0)
    a, b = dwc_table(rows, result, tax, _provenance(options)).to_dict("records")
    assert (a["scientificName"], a["identificationQualifier"]) == ("Sebastes", "cf. diploproa")
    assert (b["scientificName"], b["identificationQualifier"]) == ("Sebastes diploproa", "")
    assert a["identificationRemarks"].endswith("flagged unknown by energy (score -1.25 >= threshold -2)")
    assert b["identificationRemarks"].endswith("OOD score (energy) -3.5 < threshold -2")
    fallback = DecisionOptions("min-risk", candidates="all", ood="energy", ood_fallback="order").resolve(tax)
    order = _result(tax, ["Scleractinia"], [0.8], unknown=[True], ood_score=[0.0], threshold=-2.0)
    remark = dwc_table(rows.iloc[:1], order, tax, _provenance(fallback))["identificationRemarks"][0]
    assert "flagged unknown by energy (score 0 >= threshold -2), answered at its ancestor at order" in remark


def test_the_remarks_say_what_the_context_priors_did():
    tax = builtin_taxonomy("fathomnet2025")
    result = _result(tax, ["Sebastes", "Sebastes", "Sebastes", "Sebastes"], [0.9] * 4)
    result.raw_nodes = tax.indices(["Sebastes diploproa", "Sebastes", "Sebastes", "Sebastes"]).astype(np.int64)
    result.prior_applied = np.array([1, 1, -1, 0], dtype=np.int8)  # applied, applied, conflict, no context
    rows = pd.DataFrame({"path": list("abcd")})
    remarks = dwc_table(rows, result, tax, _provenance())["identificationRemarks"].tolist()
    assert remarks[0].endswith("; context priors applied, without them Sebastes diploproa")
    assert remarks[1].endswith("; context priors applied")
    assert remarks[2].endswith("; context priors not applied (its context's keys block every label together)")
    assert "priors" not in remarks[3]


def test_an_unranked_tree_leaves_the_rank_columns_empty():
    tax = Taxonomy.from_parents({"Plankton": None, "Copepod": "Plankton", "Calanus-like": "Copepod",
                                 "Diatom": "Plankton"})
    rows = pd.DataFrame({"path": ["a.png", "b.png"]})
    frame = dwc_table(rows, _result(tax, ["Calanus-like", "Copepod"], [0.4, 0.9]), tax, _provenance())
    assert frame["scientificName"].tolist() == ["Calanus-like", "Copepod"]
    for col in ("taxonRank", "identificationQualifier", "kingdom", "genus", "specificEpithet"):
        assert frame[col].tolist() == ["", ""], col
    assert frame["verbatimIdentification"].tolist() == ["Calanus-like", "Copepod"]


def test_specific_epithet():
    assert specific_epithet("Sebastes diploproa") == "diploproa"
    assert specific_epithet("Chionoecetes tanneri") == "tanneri"
    assert specific_epithet("Sebastes sp.") == specific_epithet("Sebastes") == specific_epithet("Sebastes Cf") == ""
    assert specific_epithet("Quercus agrifolia var. oxyadenia") == "agrifolia"
    assert specific_epithet("Pseudo-nitzschia multi-striata") == "multi-striata"


def test_predict_dwc_agrees_with_the_csv_and_names_the_model(tiny_run, tiny_data, tmp_path):
    kw = dict(split="test", decision="min-risk", candidates="all", **FAST)
    csv = pd.read_csv(predict(tiny_run, tiny_data, tmp_path / "p.csv", **kw).out, keep_default_na=False,
                      dtype=str)
    summary = predict(tiny_run, tiny_data, tmp_path / "occurrences.csv", fmt="dwc", **kw)
    dwc = pd.read_csv(summary.out, keep_default_na=False, dtype=str)
    assert summary.fmt == "dwc" and "(dwc)" in summary.summary()
    assert list(dwc.columns) == list(DWC_COLUMNS) and set(dwc.columns) <= dwc_terms()
    assert len(dwc) == len(csv) and dwc["occurrenceID"].tolist() == csv["annotation_id"].tolist()
    assert dwc["associatedMedia"].tolist() == csv["path"].tolist()
    digest = file_sha256(best(tiny_run))
    assert dwc["identifiedBy"].nunique() == 1
    assert f"sha256 {digest[:12]}" in dwc["identifiedBy"][0] and "best.safetensors" in dwc["identifiedBy"][0]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", dwc["dateIdentified"][0])
    taxonomy = read_card(tiny_run).taxonomy
    for (_, c), (_, d) in zip(csv.iterrows(), dwc.iterrows()):
        rank = taxonomy.rank(c["prediction"])
        sure = float(c["confidence"]) >= CF_BELOW
        if rank == "species" and sure:
            assert (d["scientificName"], d["taxonRank"], d["identificationQualifier"]) == (c["prediction"], "species",
                                                                                           "")
            assert d["specificEpithet"] == c["prediction"].split()[1]
        elif rank == "species":
            assert d["scientificName"] == c["genus"] and d["identificationQualifier"].startswith("cf. ")
        else:
            assert d["scientificName"] == c["prediction"] and d["identificationQualifier"] in ("sp.", "indet.")
        for r in ("kingdom", "phylum", "class", "order", "family", "genus"):
            assert d[r] == c[r]
        assert f"P(answer)={float(c['confidence']):.3f}" in d["identificationRemarks"]


# ---------------------------------------------------------------------------------------------- JSON lines
def test_jsonl_lines_are_the_answers_of_the_csv(tiny_run, tiny_data, tmp_path):
    kw = dict(split="test", decision="min-risk", candidates="all", ood="energy", **FAST)
    csv = pd.read_csv(predict(tiny_run, tiny_data, tmp_path / "p.csv", **kw).out, keep_default_na=False, dtype=str)
    summary = predict(tiny_run, tiny_data, tmp_path / "answers.jsonl", fmt="jsonl", **kw)
    lines = summary.out.read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert summary.fmt == "jsonl" and len(records) == len(csv) == summary.n_predicted
    taxonomy = read_card(tiny_run).taxonomy
    for rec, (_, row) in zip(records, csv.iterrows()):
        assert list(rec)[:1] == ["path"] and rec["path"] == row["path"]
        assert rec["decision"] == row["prediction"] and rec["confidence"] == float(row["confidence"])
        assert rec["rank"] == taxonomy.rank(row["prediction"])
        assert {level: v["name"] for level, v in rec["lineage"].items()} == \
            {r: row[r] for r in ("kingdom", "phylum", "class", "order", "family", "genus", "species") if row[r]}
        assert len(rec["top"]) == 5 and rec["top"][0]["p"] >= rec["top"][-1]["p"]
        assert rec["ood"]["method"] == "energy" and rec["ood"]["unknown"] == (row["unknown"] == "True")
        assert rec["ood"]["score"] == pytest.approx(float(row["ood_score"]), rel=1e-12)
        assert rec["ood"]["threshold"] is not None and rec["rule"]["decision"] == "min-risk"
        inputs = list(csv.columns[list(csv.columns).index("unknown") + 1:])  # the csv keeps them after its own
        assert list(rec["input"]) == inputs and all(str(rec["input"][c]) == row[c] for c in inputs)


def test_jsonl_with_priors_keeps_the_raw_answer(tiny_run, photo_rows, tmp_path):
    rows = pd.read_csv(photo_rows, dtype=str, keep_default_na=False)
    listed = photo_rows.with_name("with_context.csv")  # beside the images: the paths stay relative to it
    rows.assign(context="site=A").to_csv(listed, index=False)
    first = read_card(tiny_run).taxonomy.labels[0]
    (tmp_path / "priors.csv").write_text(f"context,taxon,weight\nsite=A,{first},0\n")
    summary = predict(tiny_run, listed, tmp_path / "a.jsonl", fmt="jsonl", priors=tmp_path / "priors.csv", **FAST)
    records = [json.loads(line) for line in summary.out.read_text().splitlines()]
    assert len(records) == summary.n_predicted == 6
    for rec in records:
        assert rec["priors"] == {"context": "site=A", "applied": True, "conflict": False}
        assert rec["decision"] != first and "decision" in rec["raw"] and rec["input"]["context"] == "site=A"


# ---------------------------------------------------------------------------------------------- embeddings
def _direct_features(run: Path, image_paths, views=None) -> np.ndarray:
    """The pooled features of a plain forward pass through the one loader (PyTorch), one image at a time."""
    import torch

    from taxonomist.data.loading import read_image
    from taxonomist.inference.model_file import load_model
    from taxonomist.inference.run_model import eval_transform

    model, card, _ = load_model(run)
    transform = eval_transform(card)
    out = []
    with torch.inference_mode():
        for path in image_paths:
            x = transform(read_image(path))[None]
            batches = [x] if views is None else [v.apply(x) for v in views]
            out.append(torch.stack([model(b)["features"][0] for b in batches]).mean(0).numpy())
    return np.stack(out)


def test_embeddings_are_the_models_pooled_features(tiny_run, tiny_data, tmp_path):
    import pyarrow.parquet as pq

    emb = tmp_path / "emb.parquet"
    summary = predict(tiny_run, tiny_data, tmp_path / "p.csv", split="test", embeddings=emb, engine="torch",
                      chunk_size=5, **FAST)
    table = pq.read_table(emb)
    frame = pd.read_csv(summary.out, keep_default_na=False, dtype=str)
    assert table.column_names == ["path", "annotation_id", "image_id", "embedding"]
    assert table.num_rows == summary.n_predicted == len(frame)
    assert table.column("path").to_pylist() == frame["path"].tolist()
    assert table.column("annotation_id").to_pylist() == frame["annotation_id"].tolist()
    features = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    assert str(table.schema.field("embedding").type) == f"fixed_size_list<element: float>[{features.shape[1]}]"
    direct = _direct_features(tiny_run, [tiny_data / p for p in frame["path"]])
    assert features.shape == direct.shape and features.dtype == np.float32
    np.testing.assert_allclose(features, direct, rtol=1e-4, atol=1e-5)
    meta = read_embeddings_metadata(emb)
    assert meta["models"] == [{"column": "embedding", "model": "run/checkpoints/best.safetensors",
                               "sha256": file_sha256(best(tiny_run)), "backbone": "test_efficientnet",
                               "feature_dim": direct.shape[1]}]
    assert meta["rows"] == len(frame) and meta["tta"] is None
    assert f"wrote the pooled features of {len(frame)} images ({direct.shape[1]} per image) to {emb}" in \
        summary.summary()
    assert not parts_folder(summary.out).exists()


def test_embeddings_with_tta_are_the_mean_over_the_views(tiny_run, photo_rows, tmp_path):
    import pyarrow.parquet as pq

    from taxonomist.inference.tta import views_for

    emb = tmp_path / "tta.parquet"
    predict(tiny_run, photo_rows, tmp_path / "p.csv", embeddings=emb, tta="hflip", engine="torch", **FAST)
    table = pq.read_table(emb)
    features = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    paths = [photo_rows.parent / p for p in table.column("path").to_pylist()]
    np.testing.assert_allclose(features, _direct_features(tiny_run, paths, views_for("hflip")), rtol=1e-4,
                               atol=1e-5)
    assert read_embeddings_metadata(emb)["tta"] == ["identity", "hflip"]


def test_an_ensemble_has_one_embedding_column_per_member(tiny_run, second_checkpoint, photo_rows, tmp_path):
    import pyarrow.parquet as pq

    emb = tmp_path / "ens.parquet"
    summary = predict([tiny_run, second_checkpoint], photo_rows, tmp_path / "p.csv", embeddings=emb, **FAST)
    table = pq.read_table(emb)
    assert table.column_names == ["path", "annotation_id", "embedding_0", "embedding_1"]
    meta = read_embeddings_metadata(emb)
    assert [m["column"] for m in meta["models"]] == ["embedding_0", "embedding_1"]
    assert [m["sha256"] for m in meta["models"]] == [file_sha256(best(tiny_run)), file_sha256(second_checkpoint)]
    dims = [m["feature_dim"] for m in meta["models"]]
    assert summary.embedding_dims == tuple(dims)
    for k, dim in enumerate(dims):
        assert len(table.column(f"embedding_{k}")[0]) == dim


def test_unreadable_images_get_no_embedding_row(tiny_run, photo_rows, tmp_path):
    import pyarrow.parquet as pq

    emb = tmp_path / "e.parquet"
    summary = predict(tiny_run, photo_rows, tmp_path / "p.csv", embeddings=emb, **FAST)
    table = pq.read_table(emb)
    assert summary.n_predicted == table.num_rows == 6 and "199" not in table.column("annotation_id").to_pylist()


# ---------------------------------------------------------------------------------------------- resume, errors
class Killed(BaseException):
    """Stands for SIGKILL (a BaseException: no `except Exception` stops it)."""


def _chunks_run(monkeypatch, die_at: int | None = None) -> list:
    """Record the chunk offsets `predict` runs; with `die_at`, die when starting that many-th chunk."""
    started = []

    def chunk(*args):
        if die_at is not None and len(started) == die_at:
            raise Killed
        started.append(args[2])
        return _PREDICT_CHUNK(*args)

    monkeypatch.setattr(predict_module, "_predict_chunk", chunk)
    return started


def test_resume_never_mixes_parts_with_and_without_features(tiny_run, photo_rows, tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    out, emb, kw = tmp_path / "p.csv", tmp_path / "e.parquet", dict(chunk_size=4, **FAST)  # 7 rows: 2 chunks
    _chunks_run(monkeypatch, die_at=1)
    with pytest.raises(Killed):
        predict(tiny_run, photo_rows, out, **kw)  # leaves chunk 0's part, without features
    started = _chunks_run(monkeypatch)
    summary = predict(tiny_run, photo_rows, out, resume=True, embeddings=emb, **kw)
    assert started == [0, 4] and summary.chunks_resumed == 0 and emb.is_file()

    _chunks_run(monkeypatch, die_at=1)
    with pytest.raises(Killed):
        predict(tiny_run, photo_rows, out, embeddings=emb, **kw)  # chunk 0's part, with features
    started = _chunks_run(monkeypatch)
    other = tmp_path / "other.parquet"  # features do not depend on the file they go to: the part is kept
    summary = predict(tiny_run, photo_rows, out, resume=True, embeddings=other, fmt="dwc", **kw)
    assert started == [4] and summary.chunks_resumed == 1
    assert pq.read_table(other).equals(pq.read_table(emb))

    _chunks_run(monkeypatch, die_at=1)
    with pytest.raises(Killed):
        predict(tiny_run, photo_rows, out, embeddings=emb, **kw)
    started = _chunks_run(monkeypatch)
    summary = predict(tiny_run, photo_rows, out, resume=True, **kw)  # no features asked: predicted again
    assert started == [0, 4] and summary.chunks_resumed == 0

    answers = tmp_path / "answers.txt"
    _chunks_run(monkeypatch, die_at=1)
    with pytest.raises(Killed):
        predict(tiny_run, photo_rows, answers, **kw)  # a csv run's part has no answer records
    started = _chunks_run(monkeypatch)
    summary = predict(tiny_run, photo_rows, answers, resume=True, fmt="jsonl", **kw)
    assert started == [0, 4] and len(summary.out.read_text().splitlines()) == 6


def test_embeddings_path_errors_are_one_line_and_come_first(tiny_run, photo_rows, tmp_path, monkeypatch):
    def never(*args):
        raise AssertionError("no image may be predicted")

    monkeypatch.setattr(predict_module, "_predict_chunk", never)
    out = tmp_path / "p.csv"
    with pytest.raises(ConfigError, match=r"--embeddings .*e\.csv: the embeddings are written as Parquet; give a file "
                                          r"name ending in \.parquet"):
        predict(tiny_run, photo_rows, out, embeddings=tmp_path / "e.csv", **FAST)
    (tmp_path / "dir.parquet").mkdir()
    with pytest.raises(ConfigError, match="dir.parquet: is a folder"):
        predict(tiny_run, photo_rows, out, embeddings=tmp_path / "dir.parquet", **FAST)
    with pytest.raises(ConfigError, match="is also --out; give the embeddings a file of their own"):
        predict(tiny_run, photo_rows, tmp_path / "x.parquet", embeddings=tmp_path / "x.parquet", **FAST)
    candidates = tmp_path / "names.parquet"
    candidates.write_text("Draezaua\n")
    with pytest.raises(ConfigError, match=r"--embeddings .*names\.parquet is the candidates file"):
        predict(tiny_run, photo_rows, out, embeddings=candidates, candidates=str(candidates), **FAST)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if pyarrow were not installed
    with pytest.raises(ConfigError) as e:
        predict(tiny_run, photo_rows, out, embeddings=tmp_path / "e.parquet", **FAST)
    assert str(e.value) == "--embeddings writes Parquet, which needs pyarrow: pip install 'taxonomist[parquet]'"
    assert not out.exists() and not parts_folder(out).exists()


def test_cli_errors_are_one_line(tiny_run, photo_rows, tmp_path, capsys, monkeypatch):
    from taxonomist.cli.main import main

    monkeypatch.setitem(sys.modules, "pyarrow", None)
    code = main(["predict", str(tiny_run), "--images", str(photo_rows), "--out", str(tmp_path / "p.csv"),
                 "--embeddings", str(tmp_path / "e.parquet"), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == "error: --embeddings writes Parquet, which needs pyarrow: pip install " \
                                "'taxonomist[parquet]'"
    with pytest.raises(SystemExit):
        main(["predict", str(tiny_run), "--images", str(photo_rows), "--out", "x", "--format", "darwin"])
    err = capsys.readouterr().err
    assert "--format: invalid choice: 'darwin'" in err and all(f in err for f in FORMATS)
