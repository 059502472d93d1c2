"""Batch prediction: the three inputs, output columns, decisions, ensembles, OOD flags and Kaggle validation."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from taxonomist.errors import ConfigError, DataError, ModelError, SubmissionError
from taxonomist.inference import check_kaggle_submission, predict, read_images
from taxonomist.taxonomy import RANKS
from taxonomist.train.checkpoint import load_checkpoint

FAST = dict(device="cpu", num_workers=0, progress=False)


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory, tiny_data) -> Path:
    """12 images in two nested folders, plus a corrupt JPEG, a text file and a hidden folder to ignore."""
    root = tmp_path_factory.mktemp("photos")
    images = sorted((tiny_data / "images").rglob("*.jpg"))[::5][:12]
    for k, src in enumerate(images):
        dest = root / ("a" if k % 2 else "b/c") / f"{k:02d}.jpg"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
    (root / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "notes.txt").write_text("not an image")
    (root / ".cache").mkdir()
    shutil.copyfile(images[0], root / ".cache" / "thumb.jpg")
    return root


def test_read_images_folder_csv_and_dataset(photo_dir, tiny_data, tmp_path):
    folder = read_images(photo_dir)
    assert folder.kind == "folder" and len(folder.rows) == 13  # 12 + broken.jpg; no txt, no hidden folder
    assert folder.rows["path"].iloc[0] == "a/01.jpg" and not folder.rows["path"].str.startswith(".").any()
    (tmp_path / "list.csv").write_text("annotation_id,path\n7,x/1.jpg\n8,x/2.jpg\n")
    table = read_images(tmp_path / "list.csv")
    assert table.kind == "csv" and table.root == tmp_path and table.rows["annotation_id"].tolist() == ["7", "8"]
    data = read_images(tiny_data, split="test")
    assert data.kind == "dataset" and set(data.rows["split"]) == {"test"}
    (tmp_path / "bad.csv").write_text("file,label\na.jpg,x\n")
    with pytest.raises(DataError, match=r"bad.csv: no 'path' column \(header: file,label\)"):
        read_images(tmp_path / "bad.csv")
    (tmp_path / "empty_row.csv").write_text("path\na.jpg\n\"\"\n")
    with pytest.raises(DataError, match="empty_row.csv: row 3: empty path"):
        read_images(tmp_path / "empty_row.csv")
    with pytest.raises(DataError, match="nowhere: not found"):
        read_images(tmp_path / "nowhere")


def test_predict_a_folder_writes_decisions_with_rank_columns(tiny_run, photo_dir, tmp_path):
    out = tmp_path / "p.csv"
    summary = predict(tiny_run, photo_dir, out, **FAST)
    frame = pd.read_csv(out, keep_default_na=False)
    _, meta, taxonomy = load_checkpoint(tiny_run)
    ranks = [level.name for level in taxonomy.levels()]
    assert list(frame.columns) == ["path", "prediction", "confidence", *ranks, "expected_distance"]
    assert len(frame) == 12 and summary.n_predicted == 12 and summary.n_images == 13
    assert [p for p, _ in summary.skipped] == ["a/broken.jpg"]
    assert "skipped 1 unreadable image(s), left out of the output: a/broken.jpg" in summary.summary()
    assert set(frame["prediction"]) <= set(meta["labels"])
    for _, row in frame.iterrows():  # the column at the answer's own rank is the answer; the lineage is consistent
        rank = taxonomy.rank(row["prediction"])
        assert row[rank] == row["prediction"]
        assert [row[r] for r in ranks if row[r]] == [n for n in taxonomy.lineage(row["prediction"])
                                                      if taxonomy.rank(n) in RANKS]
    assert frame["confidence"].between(0, 1).all() and (frame["expected_distance"] >= 0).all()
    assert summary.images_per_s > 0


def test_predict_a_csv_keeps_its_columns_and_matches_the_folder(tiny_run, photo_dir, tmp_path):
    (photo_dir / "list.csv").write_text("annotation_id,path,site\n10,a/01.jpg,north\n11,b/c/00.jpg,south\n")
    try:
        predict(tiny_run, photo_dir / "list.csv", tmp_path / "c.csv", **FAST)
        predict(tiny_run, photo_dir, tmp_path / "f.csv", **FAST)
    finally:
        (photo_dir / "list.csv").unlink()
    by_csv = pd.read_csv(tmp_path / "c.csv", keep_default_na=False)
    by_folder = pd.read_csv(tmp_path / "f.csv", keep_default_na=False).set_index("path")
    assert by_csv["path"].tolist() == ["a/01.jpg", "b/c/00.jpg"]
    assert by_csv[["annotation_id", "site"]].values.tolist() == [[10, "north"], [11, "south"]]
    for _, row in by_csv.iterrows():
        assert row["prediction"] == by_folder.loc[row["path"], "prediction"]
        assert row["confidence"] == pytest.approx(by_folder.loc[row["path"], "confidence"], abs=1e-6)


@pytest.mark.parametrize("rule", ["argmax", "min-risk", "backoff", "selective"])
def test_each_rule_on_a_dataset_split(tiny_run, tiny_data, tmp_path, rule):
    out = tmp_path / f"{rule}.csv"
    summary = predict(tiny_run, tiny_data, out, decision=rule, split="test", **FAST)
    frame = pd.read_csv(out, keep_default_na=False)
    _, meta, taxonomy = load_checkpoint(tiny_run)
    assert summary.n_predicted == len(frame) == 10
    assert {"label", "split", "annotation_id"} <= set(frame.columns)  # the dataset's columns ride along
    if rule in ("argmax", "min-risk"):
        assert set(frame["prediction"]) <= set(meta["labels"])      # default candidates: the training labels
    else:
        assert set(frame["prediction"]) <= set(taxonomy.names)
    if rule == "min-risk":  # min-risk's expected distance is the least over the candidates
        argmax = pd.read_csv(tmp_path / "argmax.csv") if (tmp_path / "argmax.csv").exists() else None
        if argmax is None:
            predict(tiny_run, tiny_data, tmp_path / "argmax.csv", split="test", **FAST)
            argmax = pd.read_csv(tmp_path / "argmax.csv")
        assert (frame["expected_distance"].to_numpy() <= argmax["expected_distance"].to_numpy() + 1e-6).all()


def test_backoff_thresholds_and_selective_threshold_change_the_answers(tiny_run, tiny_data, tmp_path):
    _, _, taxonomy = load_checkpoint(tiny_run)
    predict(tiny_run, tiny_data, tmp_path / "strict.csv", decision="backoff", thresholds="1.0", split="test", **FAST)
    strict = pd.read_csv(tmp_path / "strict.csv", keep_default_na=False)
    assert set(strict["prediction"]) == set(taxonomy.roots)  # P = 1 only at the root
    predict(tiny_run, tiny_data, tmp_path / "loose.csv", decision="selective", selective_threshold=0.0,
            split="test", **FAST)
    loose = pd.read_csv(tmp_path / "loose.csv", keep_default_na=False)
    assert all(taxonomy.rank(n) == "species" for n in loose["prediction"])  # the deepest nodes reach P ≥ 0
    with pytest.raises(ConfigError, match="applies to backoff"):
        predict(tiny_run, tiny_data, tmp_path / "x.csv", decision="selective", thresholds="species=0.5", **FAST)


def test_ensemble_of_two_checkpoints(tiny_run, second_checkpoint, tiny_data, tmp_path):
    best = tiny_run / "checkpoints" / "best.safetensors"
    kw = dict(split="test", **FAST)
    predict(best, tiny_data, tmp_path / "one.csv", **kw)
    predict(second_checkpoint, tiny_data, tmp_path / "two.csv", **kw)
    s = predict([best, second_checkpoint], tiny_data, tmp_path / "both.csv", **kw)
    predict([best, second_checkpoint], tiny_data, tmp_path / "first.csv", weights=[1.0, 0.0], **kw)
    one, two, both, first = (pd.read_csv(tmp_path / f"{n}.csv") for n in ("one", "two", "both", "first"))
    assert len(s.checkpoints) == 2 and "2 checkpoints" in s.summary()
    assert first["prediction"].tolist() == one["prediction"].tolist()  # weight 0 silences a member
    np.testing.assert_allclose(first["confidence"], one["confidence"], atol=1e-6)
    assert not np.allclose(one["confidence"], two["confidence"], atol=1e-3)  # the members differ…
    # …the other weight silences the other member, equal weights are the plain mean, and the mean is neither
    # member (a confidence is P(answer) summed over the answer's subtree, so no bound between the members'
    # confidences holds in general when labels sit above other labels)
    predict([best, second_checkpoint], tiny_data, tmp_path / "second.csv", weights=[0.0, 1.0], **kw)
    predict([best, second_checkpoint], tiny_data, tmp_path / "equal.csv", weights=[2.0, 2.0], **kw)
    second, equal = (pd.read_csv(tmp_path / f"{n}.csv") for n in ("second", "equal"))
    assert second["prediction"].tolist() == two["prediction"].tolist()
    np.testing.assert_allclose(second["confidence"], two["confidence"], atol=1e-6)
    assert equal["prediction"].tolist() == both["prediction"].tolist()
    np.testing.assert_allclose(equal["confidence"], both["confidence"], atol=1e-6)
    conf = both["confidence"].to_numpy()
    assert not np.allclose(conf, one["confidence"], atol=1e-4) and not np.allclose(conf, two["confidence"], atol=1e-4)


def test_ensemble_members_must_share_labels(tiny_run, photo_dir, tmp_path):
    src = tiny_run / "checkpoints"
    shutil.copyfile(src / "best.safetensors", tmp_path / "other.safetensors")
    meta = json.loads((src / "best.json").read_text())
    meta["labels"] = meta["labels"][::-1]
    meta["taxonomy"]["labels"] = meta["labels"]
    (tmp_path / "other.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match=r"other.safetensors: its \d+ labels differ from those of .*best.safetensors"):
        predict([tiny_run, tmp_path / "other.safetensors"], photo_dir, tmp_path / "x.csv", **FAST)


def test_ood_columns_flags_and_fallback(tiny_run, tiny_data, tmp_path):
    _, _, taxonomy = load_checkpoint(tiny_run)
    summary = predict(tiny_run, tiny_data, tmp_path / "o.csv", decision="min-risk", candidates="all", ood="energy",
                      ood_tpr=0.9, **FAST)
    frame = pd.read_csv(tmp_path / "o.csv", keep_default_na=False)
    columns = list(frame.columns)
    assert columns[columns.index("expected_distance") + 1:][:2] == ["ood_score", "unknown"]
    assert summary.n_unknown == int(frame["unknown"].sum())
    # everything flagged (threshold below every score): every answer falls back to order or above
    predict(tiny_run, tiny_data, tmp_path / "all.csv", decision="min-risk", candidates="all", ood="knn",
            ood_threshold=-1.0, **FAST)
    flagged = pd.read_csv(tmp_path / "all.csv", keep_default_na=False)
    assert flagged["unknown"].all()
    coarse = {"kingdom", "phylum", "class", "order"}
    assert all(taxonomy.rank(n) in coarse for n in flagged["prediction"])
    predict(tiny_run, tiny_data, tmp_path / "plain.csv", decision="min-risk", candidates="all", **FAST)
    plain = pd.read_csv(tmp_path / "plain.csv", keep_default_na=False)
    # each answer at or below order climbs to its order (the synthetic tree names every rank); coarser ones stay
    expected = [row["order"] or row["prediction"] for _, row in plain.iterrows()]
    assert flagged["prediction"].tolist() == expected
    # argmax only flags
    predict(tiny_run, tiny_data, tmp_path / "arg.csv", ood="knn", ood_threshold=-1.0, **FAST)
    arg = pd.read_csv(tmp_path / "arg.csv", keep_default_na=False)
    assert arg["unknown"].all() and all(taxonomy.rank(n) in ("species", "genus") for n in arg["prediction"])


def test_ood_option_errors(tiny_run, second_checkpoint, tiny_data, tmp_path):
    with pytest.raises(ConfigError, match="needs an OOD method"):
        predict(tiny_run, tiny_data, tmp_path / "x.csv", ood_tpr=0.9, **FAST)
    with pytest.raises(ConfigError, match="with an ensemble use an OOD TPR"):
        predict([tiny_run, second_checkpoint], tiny_data, tmp_path / "x.csv", ood="msp", ood_threshold=0.1, **FAST)
    with pytest.raises(ConfigError, match=r"TPR must lie in \(0, 1\]"):
        predict(tiny_run, tiny_data, tmp_path / "x.csv", ood="msp", ood_tpr=95, **FAST)


def test_ensemble_ood_score_is_the_mean_margin(tiny_run, second_checkpoint, tiny_data, tmp_path):
    predict([tiny_run, second_checkpoint], tiny_data, tmp_path / "e.csv", ood="energy", split="test", **FAST)
    frame = pd.read_csv(tmp_path / "e.csv")
    assert ((frame["ood_score"] >= 0) == frame["unknown"]).all()


def test_tta_through_predict(tiny_run, tiny_data, tmp_path):
    s = predict(tiny_run, tiny_data, tmp_path / "t.csv", tta="rot2", split="test", **FAST)
    assert s.views == ("identity", "rot180") and "2 TTA views" in s.summary()
    assert len(pd.read_csv(tmp_path / "t.csv")) == 10


def test_kaggle_format_writes_every_annotation(tiny_run, tiny_data, tmp_path):
    out = tmp_path / "sub.csv"
    predict(tiny_run, tiny_data, out, decision="min-risk", fmt="kaggle", **FAST)
    frame = pd.read_csv(out, dtype=str)
    annotations = pd.read_csv(tiny_data / "annotations.csv", dtype=str)
    _, meta, _ = load_checkpoint(tiny_run)
    assert list(frame.columns) == ["annotation_id", "concept_name"]
    assert frame["annotation_id"].tolist() == annotations["annotation_id"].tolist()
    assert set(frame["concept_name"]) <= set(meta["labels"])


def test_kaggle_needs_annotation_ids(tiny_run, photo_dir, tmp_path):
    with pytest.raises(DataError, match="needs an annotation_id column"):
        predict(tiny_run, photo_dir, tmp_path / "sub.csv", fmt="kaggle", **FAST)
    assert not (tmp_path / "sub.csv").exists()


def test_kaggle_unreadable_image_is_an_error_unless_filled(tiny_run, photo_dir, tmp_path):
    (tmp_path / "list.csv").write_text(f"annotation_id,path\n1,{photo_dir}/a/01.jpg\n2,{photo_dir}/a/broken.jpg\n")
    with pytest.raises(DataError, match="broken.jpg: .*--fill-unreadable"):
        predict(tiny_run, tmp_path / "list.csv", tmp_path / "sub.csv", fmt="kaggle", **FAST)
    s = predict(tiny_run, tmp_path / "list.csv", tmp_path / "sub.csv", fmt="kaggle", fill_unreadable=True, **FAST)
    frame = pd.read_csv(tmp_path / "sub.csv", dtype=str)
    assert frame["annotation_id"].tolist() == ["1", "2"] and s.n_filled == 1 and "fill answer" in s.summary()


def test_kaggle_validation_lists_every_problem():
    frame = pd.DataFrame({"annotation_id": ["1", "1", "3"], "concept_name": ["Cod", "Hake", "Whale"]})
    with pytest.raises(SubmissionError) as info:
        check_kaggle_submission(frame, ["1", "2", "3"], ["Cod", "Hake"])
    problems = info.value.problems
    assert problems[0] == "annotation_id '1' appears 2 times (1 repeated ids)"
    assert problems[1] == "1 annotation id(s) have no answer, e.g. '2'"
    assert problems[2].startswith("row 4: concept_name 'Whale' (annotation_id '3') is not in the candidate set")
    with pytest.raises(SubmissionError, match="expected annotation_id,concept_name"):
        check_kaggle_submission(frame.rename(columns={"concept_name": "label"}), ["1"], ["Cod"])
    check_kaggle_submission(frame.iloc[[0, 2]].assign(concept_name=["Cod", "Hake"]), ["1", "3"], ["Cod", "Hake"])


def test_option_errors(tiny_run, photo_dir, tmp_path):
    with pytest.raises(ConfigError, match="unknown decision 'min_risk' \\(did you mean 'min-risk'"):
        predict(tiny_run, photo_dir, tmp_path / "x.csv", decision="min_risk", **FAST)
    with pytest.raises(ConfigError, match="2 weights for 1 checkpoints"):
        predict(tiny_run, photo_dir, tmp_path / "x.csv", weights=[1, 2], **FAST)
    with pytest.raises(ConfigError, match="item 'species' is not RANK=P"):
        predict(tiny_run, photo_dir, tmp_path / "x.csv", decision="backoff", thresholds="species,genus=0.5", **FAST)
    with pytest.raises(ConfigError, match="--selective-threshold applies to --decision selective only"):
        predict(tiny_run, photo_dir, tmp_path / "x.csv", selective_threshold=0.7, **FAST)
    with pytest.raises(ConfigError, match=r"thresholds\['all'\] must lie in \[0, 1\], got 1.5"):
        predict(tiny_run, photo_dir, tmp_path / "x.csv", decision="selective", selective_threshold=1.5, **FAST)
    with pytest.raises(ModelError, match="checkpoint not found"):
        predict(tmp_path / "nope.safetensors", photo_dir, tmp_path / "x.csv", **FAST)
